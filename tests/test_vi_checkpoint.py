"""Checkpoints of tfp_bnn_adv.inference.vi.fit: interrupt, resume, refuse.

The reference for every resumed run is the same call run without
interruption (in a directory of its own): the trained posterior (``loc`` and
the raw ``rho``), the history and the last checkpoint, Adam's moments and
the early-stopping state included, must be equal bit for bit.
"""

import os

import signal
import subprocess  # pylint: disable=wrong-import-position
import sys  # pylint: disable=wrong-import-position
import textwrap  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position

import keras  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
import tf_keras  # pylint: disable=wrong-import-position

from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import files  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import vi  # pylint: disable=wrong-import-position

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dropout_mlp():
    return keras.Sequential([
        keras.Input((2,)), keras.layers.Dense(8, activation="relu"),
        keras.layers.Dropout(0.2), keras.layers.Dense(2)])


@pytest.fixture(scope="module")
def moons():
    return data.half_moons(n=250, seed=5)


def _assert_same_fit(a, b, dir_a=None, dir_b=None):
    for get in ("posterior_loc", "posterior_untransformed_scale"):
        for pa, pb in zip(getattr(a, get)(), getattr(b, get)()):
            np.testing.assert_array_equal(pa, pb)
    assert a.history == b.history
    strip = lambda s: {k: v for k, v in s.items() if k != "train_seconds"}
    assert strip(a.settings) == strip(b.settings)
    if dir_a is not None:
        arrays_a, meta_a = files.load_arrays(os.path.join(dir_a, vi.CHECKPOINT_FILE))
        arrays_b, meta_b = files.load_arrays(os.path.join(dir_b, vi.CHECKPOINT_FILE))
        assert sorted(arrays_a) == sorted(arrays_b)
        assert any(k.startswith("optimizer_") for k in arrays_a)
        for key in arrays_a:
            np.testing.assert_array_equal(arrays_a[key], arrays_b[key], key)
        for meta in (meta_a, meta_b):
            del meta["train_seconds"]
        assert meta_a == meta_b


# ------------------------------------------------------------------- resume
def test_fit_interrupted_mid_epoch_resumes_to_the_uninterrupted_posterior(
        moons, tmp_path, monkeypatch):
    # Dropout, Flipout, a validation split and early stopping that does stop
    # (after 12 of 30 epochs, best epoch 10): the resumed run must replay
    # every batch order, noise draw, Adam step and stopping decision.
    kwargs = dict(epochs=30, batch_size=50, learning_rate=0.1,
                  validation_split=0.2, early_stopping_patience=2, seed=2,
                  verbose=0)
    reference = vi.fit(_dropout_mlp(), moons.train_x, moons.train_y,
                       checkpoint_dir=str(tmp_path / "reference"), **kwargs)
    assert reference.settings["epochs_run"] < 30
    assert reference.settings["best_epoch"] < reference.settings["epochs_run"] - 1

    def interrupt(self, batch, logs=None):
        # Ctrl-C in the middle of the sixth epoch (4 steps per epoch).
        if int(self.model.optimizer.iterations) == 22:
            raise KeyboardInterrupt

    ckpt = str(tmp_path / "interrupted")
    with monkeypatch.context() as m:
        m.setattr(vi._EpochEnd, "on_train_batch_end", interrupt, raising=False)  # pylint: disable=protected-access
        with pytest.raises(KeyboardInterrupt):
            vi.fit(_dropout_mlp(), moons.train_x, moons.train_y,
                   checkpoint_dir=ckpt, **kwargs)
    _, meta = files.load_arrays(os.path.join(ckpt, vi.CHECKPOINT_FILE))
    assert meta["epochs_done"] == 5
    resumed = vi.fit(_dropout_mlp(), moons.train_x, moons.train_y,
                     checkpoint_dir=ckpt, **kwargs)
    _assert_same_fit(resumed, reference, ckpt, str(tmp_path / "reference"))


def test_a_finished_run_extended_equals_the_longer_run(moons, tmp_path):
    # (Flipout is resumed in the test above.)
    kwargs = dict(batch_size=64, learning_rate=1e-2,
                  estimator="reparameterization", seed=7, verbose=0)
    model = models.mlp((2,), 2, hidden=(8,))
    reference = vi.fit(model, moons.train_x, moons.train_y, epochs=4,
                       checkpoint_dir=str(tmp_path / "reference"), **kwargs)
    ckpt = str(tmp_path / "extended")
    short = vi.fit(model, moons.train_x, moons.train_y, epochs=2,
                   checkpoint_dir=ckpt, **kwargs)
    assert len(short.history["loss"]) == 2
    extended = vi.fit(model, moons.train_x, moons.train_y, epochs=4,
                      checkpoint_dir=ckpt, **kwargs)
    _assert_same_fit(extended, reference, ckpt, str(tmp_path / "reference"))


def test_a_finished_run_is_returned_without_training(moons, tmp_path,
                                                     monkeypatch):
    kwargs = dict(epochs=2, batch_size=64, seed=1, verbose=0,
                  checkpoint_dir=str(tmp_path))
    model = models.mlp((2,), 2, hidden=(4,))
    first = vi.fit(model, moons.train_x, moons.train_y, **kwargs)

    def no_training(*args, **unused):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(tf_keras.Model, "fit", no_training)
    _assert_same_fit(vi.fit(model, moons.train_x, moons.train_y, **kwargs),
                     first)
    with pytest.raises(ValueError, match="has 2 epochs, more than epochs=1"):
        vi.fit(model, moons.train_x, moons.train_y, **{**kwargs, "epochs": 1})


_CHILD = textwrap.dedent("""
    import os, signal, sys
    # Ctrl-C raises KeyboardInterrupt, as in a terminal, even where the
    # parent ignores SIGINT (pytest-xdist workers do, and children inherit it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.path.insert(0, {repo!r})
    import time
    from tfp_bnn_adv import data, models
    from tfp_bnn_adv.inference import vi
    # A pause after each checkpoint, so the parent's SIGINT lands mid-run on
    # a fast CPU too (60 short epochs can otherwise end before it arrives);
    # it changes no result.
    save = vi._Checkpoint.save
    def slow_save(self, *args, **kwargs):
        save(self, *args, **kwargs)
        time.sleep(0.1)
    vi._Checkpoint.save = slow_save
    ds = data.half_moons(n=250, seed=5)
    vi.fit(models.mlp((2,), 2, hidden=(8,)), ds.train_x, ds.train_y,
           **{kwargs!r})
""")


def test_resume_in_a_new_process_after_sigint(moons, tmp_path):
    # A fresh process starts every RNG, name counter and traced function
    # anew; the run it resumes must still end where the uninterrupted one
    # (here without a checkpoint_dir) does.  Where exactly SIGINT lands does
    # not matter.
    ckpt = str(tmp_path / "ckpt")
    kwargs = dict(epochs=60, batch_size=100, learning_rate=1e-2, seed=4,
                  verbose=0)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(
            repo=_REPO, kwargs={**kwargs, "checkpoint_dir": ckpt})],
        stderr=subprocess.PIPE, text=True)
    path = os.path.join(ckpt, vi.CHECKPOINT_FILE)
    deadline = time.monotonic() + 300
    while child.poll() is None and time.monotonic() < deadline:
        if os.path.exists(path):
            _, meta = files.load_arrays(path)
            if meta["epochs_done"] >= 2:
                break
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode != 0 and "KeyboardInterrupt" in stderr, stderr[-2000:]
    _, meta = files.load_arrays(path)
    assert 2 <= meta["epochs_done"] < 60
    model = models.mlp((2,), 2, hidden=(8,))
    resumed = vi.fit(model, moons.train_x, moons.train_y, checkpoint_dir=ckpt,
                     **kwargs)
    _assert_same_fit(resumed, vi.fit(model, moons.train_x, moons.train_y,
                                     **kwargs))


# ------------------------------------------------------------------- refuse
def test_a_checkpoint_of_another_configuration_is_refused(moons, tmp_path):
    kwargs = dict(epochs=1, batch_size=64, learning_rate=1e-2, seed=3,
                  verbose=0, checkpoint_dir=str(tmp_path))
    model = models.mlp((2,), 2, hidden=(4,))
    vi.fit(model, moons.train_x, moons.train_y, **kwargs)
    for change, field in ((dict(learning_rate=2e-2), "learning_rate"),
                          (dict(seed=4), "seed"),
                          (dict(estimator="reparameterization"), "estimator"),
                          (dict(validation_split=0.2), "train_data")):
        with pytest.raises(ValueError, match=f"different configuration: {field}"):
            vi.fit(model, moons.train_x, moons.train_y, **{**kwargs, **change})
    with pytest.raises(ValueError, match="different configuration: train_data"):
        vi.fit(model, moons.train_x[::-1], moons.train_y[::-1], **kwargs)
    with pytest.raises(ValueError, match="different configuration: architecture"):
        vi.fit(models.mlp((2,), 2, hidden=(5,)), moons.train_x, moons.train_y,
               **kwargs)


def test_a_corrupt_checkpoint_is_refused(moons, tmp_path):
    model = models.mlp((2,), 2, hidden=(4,))
    kwargs = dict(epochs=2, batch_size=64, seed=3, verbose=0)
    good = str(tmp_path / "good")
    vi.fit(model, moons.train_x, moons.train_y, epochs=1, batch_size=64, seed=3,
           verbose=0, checkpoint_dir=good)
    arrays, meta = files.load_arrays(os.path.join(good, vi.CHECKPOINT_FILE))

    def crafted(name, arrays, meta):
        directory = str(tmp_path / name)
        files.save_arrays(os.path.join(directory, vi.CHECKPOINT_FILE), arrays,
                          meta)
        return directory

    nan = dict(arrays, optimizer_1=np.full_like(arrays["optimizer_1"], np.nan))
    missing = {k: v for k, v in arrays.items() if k != "untransformed_scale_0"}
    cases = [(crafted("nan", nan, meta), "optimizer_1 holds NaN"),
             (crafted("missing", missing, meta), "untransformed_scale_0 is missing"),
             (crafted("version", arrays, dict(meta, format_version="1")),
              "format version"),
             (crafted("no_epochs", arrays,
                      {k: v for k, v in meta.items() if k != "epochs_done"}),
              "corrupt checkpoint metadata")]
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    raw = open(os.path.join(good, vi.CHECKPOINT_FILE), "rb").read()
    (truncated / vi.CHECKPOINT_FILE).write_bytes(raw[:len(raw) // 2])
    cases.append((str(truncated), "corrupt or truncated"))
    for directory, match in cases:
        with pytest.raises(ValueError, match=match):
            vi.fit(model, moons.train_x, moons.train_y, checkpoint_dir=directory,
                   **kwargs)


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_training(
        moons, tmp_path, monkeypatch):
    path = tmp_path / "not_a_dir"
    path.write_text("x")

    def no_training(*args, **unused):
        raise AssertionError("training started")

    monkeypatch.setattr(tf_keras.Model, "fit", no_training)
    with pytest.raises(ValueError, match=f"checkpoint_dir='{path}' cannot be a "
                                         "directory: it is an existing file"):
        vi.fit(models.mlp((2,), 2, hidden=(4,)), moons.train_x, moons.train_y,
               epochs=1, checkpoint_dir=str(path), verbose=0)
