"""Atomic, pickle-free writes."""

import json

import numpy as np
import pytest

from tfp_bnn_adv import files


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "r.json"
    files.write_json(path, {"a": np.float32(1.5), "b": np.arange(3)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2]}
    with pytest.raises(RuntimeError):
        with files.atomic_write(path, "w") as f:
            f.write('{"half": ')
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text())["a"] == 1.5
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp left


def test_arrays_round_trip_and_refuse_objects(tmp_path):
    path = tmp_path / "a.npz"
    arrays = {"w": np.arange(6.0).reshape(2, 3), "i": np.array([1, 2], np.int32)}
    files.save_arrays(path, arrays, {"k": [1, "x"]})
    back, meta = files.load_arrays(path)
    assert meta == {"k": [1, "x"]}
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype
    with pytest.raises(TypeError, match="dtype object"):
        files.save_arrays(path, {"o": np.array([{}], dtype=object)})


def test_read_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        files.read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        files.read_json(tmp_path / "bad.json")
