"""Atomic, pickle-free writes."""

import json
import os
import stat

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


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores it afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_new_files_get_the_mode_open_would_give(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "reference", "w", encoding="utf-8"):
        pass
    expected = stat.S_IMODE(os.stat(tmp_path / "reference").st_mode)
    assert expected == 0o666 & ~mask
    files.write_json(tmp_path / "r.json", {"a": 1})
    files.save_arrays(tmp_path / "a.npz", {"w": np.zeros(2)})
    for name in ("r.json", "a.npz"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == expected, name


@pytest.mark.parametrize("proc", [True, False])
def test_umask_is_read_and_left_unchanged(umask, monkeypatch, proc):
    if not proc:  # no /proc (not Linux): the set-and-restore fallback
        def no_proc(*args, **kwargs):
            raise FileNotFoundError("/proc/self/status")
        monkeypatch.setattr(files, "open", no_proc, raising=False)
    umask(0o037)
    assert files._umask() == 0o037  # pylint: disable=protected-access
    assert os.umask(0o037) == 0o037


def test_overwriting_keeps_an_existing_files_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "r.txt"
    path.write_text("old")
    os.chmod(path, 0o640)
    files.write_text(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


@pytest.mark.parametrize("meta", [b"[1, 2]", b'"text"', b"3"])
def test_load_arrays_refuses_metadata_that_is_not_an_object(tmp_path, meta):
    path = tmp_path / "crafted.npz"
    np.savez(path, w=np.zeros(2),
             __metadata_json__=np.frombuffer(meta, dtype=np.uint8))
    with pytest.raises(ValueError, match="must be a JSON object") as info:
        files.load_arrays(path)
    assert "crafted.npz" in str(info.value)
