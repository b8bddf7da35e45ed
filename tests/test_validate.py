"""The shared boundary checks: types, ranges and messages."""

import math

import numpy as np
import pytest

from tfp_bnn_adv import validate


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3)])
def test_integer_accepts_python_and_numpy_ints(value):
    out = validate.positive_int(value, "n")
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 2.0, "2", None, [2]])
def test_integer_refuses_non_ints_with_type_error(value):
    with pytest.raises(TypeError, match=r"^n must be an int, got "):
        validate.integer(value, "n")


def test_integer_bounds_are_inclusive_and_named():
    assert validate.integer(0, "n", minimum=0, maximum=0) == 0
    with pytest.raises(ValueError, match=r"^n must be >= 1, got 0\.$"):
        validate.positive_int(0, "n")
    with pytest.raises(ValueError, match=r"^n must be <= 4, got 5\.$"):
        validate.integer(5, "n", maximum=4)
    with pytest.raises(ValueError, match=r"^n must be in \[0, 4\], got -1\.$"):
        validate.integer(-1, "n", minimum=0, maximum=4)


def test_optional_positive_int():
    assert validate.optional_positive_int(None, "chunk") is None
    assert validate.optional_positive_int(2, "chunk") == 2
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        validate.optional_positive_int(0, "chunk")


def test_int_sequence():
    assert validate.int_sequence([4, np.int64(2)], "hidden") == (4, 2)
    assert validate.int_sequence((), "hidden", allow_empty=True) == ()
    with pytest.raises(ValueError, match="hidden must not be empty"):
        validate.int_sequence([], "hidden")
    with pytest.raises(ValueError, match=r"hidden\[1\] must be >= 1, got 0"):
        validate.int_sequence([3, 0], "hidden")
    with pytest.raises(TypeError, match="hidden must be a sequence"):
        validate.int_sequence(3, "hidden")
    with pytest.raises(TypeError, match="hidden must be a sequence"):
        validate.int_sequence("32", "hidden")


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.5), np.int64(1)])
def test_reals_accept_numbers(value):
    out = validate.positive_real(value, "lr")
    assert out == float(value) and type(out) is float


@pytest.mark.parametrize("check", [validate.real, validate.positive_real,
                                   validate.nonnegative_real, validate.fraction])
@pytest.mark.parametrize("value", [True, "1", None, 1j])
def test_reals_refuse_non_numbers(check, value):
    with pytest.raises(TypeError, match=r"^x must be a real number, got "):
        check(value, "x")


@pytest.mark.parametrize("check", [validate.real, validate.positive_real,
                                   validate.nonnegative_real, validate.fraction])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_reals_refuse_non_finite(check, value):
    with pytest.raises(ValueError, match=r"^x must be .*finite"):
        check(value, "x")


def test_real_ranges():
    assert validate.nonnegative_real(0, "eps") == 0.0
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        validate.nonnegative_real(-0.1, "eps")
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        validate.positive_real(0.0, "lr")
    assert validate.fraction(0.0, "split") == 0.0
    with pytest.raises(ValueError, match=r"split must be in \[0.0, 1.0\)"):
        validate.fraction(1.0, "split")
    with pytest.raises(ValueError, match=r"t must be > 0.0, got 0"):
        validate.real(0, "t", minimum=0.0, min_open=True)


def test_choice():
    assert validate.choice("hmc", ("hmc", "nuts"), "kernel") == "hmc"
    with pytest.raises(ValueError, match=r"kernel must be one of \('hmc', "
                                         r"'nuts'\), got 'mh'\."):
        validate.choice("mh", ("hmc", "nuts"), "kernel")
    with pytest.raises(ValueError, match="verbose must be one of"):
        validate.choice(True, (0, 1, 2), "verbose")  # True == 1, but a bool
    with pytest.raises(ValueError, match="kernel must be one of"):
        validate.choice(["hmc"], ("hmc",), "kernel")
    with pytest.raises(ValueError, match="kernel must be one of"):
        validate.choice({}, {"hmc"}, "kernel")  # unhashable against a set


def test_seed_int():
    assert validate.seed_int(2**31 - 1) == 2**31 - 1
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2147483647\]"):
        validate.seed_int(2**31)
    with pytest.raises(ValueError, match="seed must be in"):
        validate.seed_int(-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        validate.seed_int(1.0)


def test_instance():
    assert validate.instance(3, int, "n") == 3
    with pytest.raises(TypeError, match=r"^ens must be a dict, got list\.$"):
        validate.instance([], dict, "ens")
    with pytest.raises(TypeError, match=r"must be a dict or tuple, got list"):
        validate.instance([], (dict, tuple), "ens")


def test_directory(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert validate.directory(None, "ckpt", optional=True) is None
    assert validate.directory(tmp_path / "new" / "d", "ckpt") == str(
        tmp_path / "new" / "d")
    assert not (tmp_path / "new").exists()  # checked, not created
    with pytest.raises(TypeError, match="ckpt must be a directory path, got"):
        validate.directory(None, "ckpt")
    with pytest.raises(TypeError, match="ckpt must be a directory path or "
                                        "None, got 3"):
        validate.directory(3, "ckpt", optional=True)
    with pytest.raises(ValueError, match="ckpt must be a non-empty"):
        validate.directory("", "ckpt")
    with pytest.raises(ValueError, match=r"ckpt=.*a_file' cannot be a "
                                         r"directory: it is an existing file"):
        validate.directory(f, "ckpt")
    with pytest.raises(ValueError, match=r"lies under .*a_file', an existing"):
        validate.directory(f / "sub" / "dir", "ckpt")


def test_value_range():
    assert validate.value_range((0, 1)) == (0.0, 1.0)
    assert validate.value_range(None) is None
    with pytest.raises(TypeError, match=r"box must be a pair \(low, high\), "
                                        "got None"):
        validate.value_range(None, "box", optional=False)
    with pytest.raises(TypeError, match=r"clip must be None or a pair"):
        validate.value_range(0.5)
    with pytest.raises(ValueError, match=r"clip must satisfy low < high, got "
                                         r"\(1, 0\)"):
        validate.value_range((1, 0))
    with pytest.raises(ValueError, match=r"clip\[1\]"):
        validate.value_range((0, float("nan")))
