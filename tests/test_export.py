"""Export: the ensemble as a Keras 3 model and a SavedModel, checked against a
per-sample loop of the Keras model, ART's FGSM and a fresh process."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import subprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

import keras  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from tfp_bnn_adv import attacks  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfp_bnn_adv import export  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=g-import-not-at-top,wrong-import-position

L = keras.layers


def _mlp():
    return keras.Sequential([keras.Input((4,)), L.Dense(8, activation="relu"),
                             L.Dense(3)])


def _cnn():
    return keras.Sequential([keras.Input((6, 6, 1)),
                             L.Conv2D(2, 3, activation="relu"), L.Flatten(),
                             L.Dense(5, activation="tanh"), L.Dense(3)])


def _case(build, num_samples, seed):
    """An ensemble, inputs, labels and the Keras model's per-sample logits."""
    model = build()
    net = Network.from_keras(model)
    ens = PosteriorEnsemble(net, net.init_params(seed=seed,
                                                 num_samples=num_samples),
                            metadata={"method": "test", "seed": seed})
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(7,) + net.input_shape).astype(np.float32)
    y = rng.integers(0, 3, size=7)
    per_sample = []
    for s in range(num_samples):
        model.set_weights([p[s].numpy() for p in ens.params])
        per_sample.append(model(x).numpy().astype(np.float64))
    return ens, x, y, np.stack(per_sample)  # [S, B, C]


@pytest.fixture(scope="module")
def cases():
    return {"mlp": _case(_mlp, 4, 0), "cnn": _case(_cnn, 3, 1)}


def _expected(output, ref):
    """The three outputs from per-sample logits ``[S, B, C]``, in float64."""
    if output == "logits_stack":
        return ref.transpose(1, 0, 2)
    if output == "mean_logits":
        return ref.mean(axis=0)
    def logsumexp(v, axis):
        m = v.max(axis=axis, keepdims=True)
        return np.squeeze(m, axis) + np.log(np.exp(v - m).sum(axis=axis))

    log_softmax = ref - logsumexp(ref, -1)[..., None]
    return logsumexp(log_softmax, 0) - np.log(len(ref))


# ------------------------------------------------------------- Keras model
@pytest.mark.parametrize("kind, chunks", [("mlp", (1, 3)), ("cnn", (None, 2))])
def test_keras_outputs_equal_a_per_sample_keras_loop(cases, kind, chunks):
    ens, x, _, ref = cases[kind]
    s = ens.num_samples
    log_p = np.log(ens.predict_proba(x))
    for chunk in chunks:
        for output in export.OUTPUTS:
            model = ens.to_keras(output, chunk_size=chunk)
            eager = model(x).numpy()
            graph = model.predict(x, batch_size=4, verbose=0)
            want = _expected(output, ref)
            assert eager.shape == want.shape == (
                (7, s, 3) if output == "logits_stack" else (7, 3))
            np.testing.assert_allclose(eager, want, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(graph, eager, rtol=1e-6, atol=1e-6)
            if output == "log_predictive":
                np.testing.assert_allclose(eager, log_p, rtol=1e-5, atol=1e-6)
            layer = model.layers[-1]
            assert isinstance(layer, export.PosteriorEnsembleLayer)
            assert layer.chunk_size == (chunk or layer.chunk_size) <= s
            assert not model.trainable_weights
            assert len(model.non_trainable_weights) == len(ens.params)


def test_log_predictive_stays_finite_where_probabilities_underflow():
    net = Network.from_keras(_mlp())
    params = [p * 60.0 for p in net.init_params(seed=3, num_samples=2)]
    ens = PosteriorEnsemble(net, params)
    x = np.random.default_rng(3).uniform(size=(16, 4)).astype(np.float32)
    model = export.to_keras(ens, chunk_size=1)
    out = model(x).numpy()
    ref = np.stack([net.apply([p[s] for p in params], x).numpy()
                    for s in range(2)]).astype(np.float64)
    assert np.isinf(np.log(ens.predict_proba(x))).any()  # float32 underflow
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, _expected("log_predictive", ref),
                               rtol=1e-5, atol=1e-4)


def test_keras_file_round_trip(cases, tmp_path):
    ens, x, _, ref = cases["cnn"]
    for output in ("log_predictive", "logits_stack"):
        model = export.to_keras(ens, output, chunk_size=2)
        path = str(tmp_path / f"{output}.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        layer = loaded.layers[-1]
        assert isinstance(layer, export.PosteriorEnsembleLayer)
        config = layer.get_config()
        assert (config["num_samples"], config["output"],
                config["chunk_size"]) == (3, output, 2)
        assert config["network"] == ens.network.get_config()
        np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
        np.testing.assert_allclose(loaded(x).numpy(), _expected(output, ref),
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- ART
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_art_fgsm_on_the_export_is_the_predictive_fgsm(cases, kind):
    from art.attacks.evasion import FastGradientMethod  # pylint: disable=g-import-not-at-top
    from art.estimators.classification import TensorFlowV2Classifier  # pylint: disable=g-import-not-at-top
    from tfp_bnn_adv import gradients  # pylint: disable=g-import-not-at-top
    ens, x, y, _ = cases[kind]
    eps = 0.1
    clf = TensorFlowV2Classifier(
        model=ens.to_keras(), nb_classes=3, input_shape=ens.network.input_shape,
        loss_object=keras.losses.CategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 1.0))
    art_adv = FastGradientMethod(clf, eps=eps, norm=np.inf).generate(x, y=y)
    ours = attacks.fgsm(ens, x, y, eps, gradient="predictive", clip=(0, 1))
    assert np.abs(ours - x).max() == pytest.approx(eps)
    differ = art_adv != ours
    if differ.any():
        # Only a gradient component within rounding of zero may flip its sign.
        g = np.abs(gradients.predictive_loss_gradient(ens, x, y))
        scale = g.reshape(len(x), -1).max(axis=1).reshape(
            (-1,) + (1,) * (x.ndim - 1))
        assert (g[differ] <= 1e-5 * np.broadcast_to(scale, g.shape)[differ]).all()
        assert differ.mean() <= 0.01
        assert np.abs(art_adv - ours).max() <= 2 * eps + 1e-6


# ------------------------------------------------------------- SavedModel
_RELOAD = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np, tensorflow as tf
x = np.load(sys.argv[1])
for path, name, out in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
    serve = tf.saved_model.load(path).signatures["serving_default"]
    result = serve(x=tf.constant(x))
    assert list(result) == [name], list(result)
    np.save(out, result[name].numpy())
assert "tfp_bnn_adv" not in sys.modules
"""


def test_saved_model_reloads_in_a_fresh_process(cases, tmp_path):
    ens, x, _, ref = cases["mlp"]
    first = str(tmp_path / "sm_log")
    assert ens.export(first) == first
    second = export.export(ens, str(tmp_path / "sm_stack"),
                           output="logits_stack", chunk_size=3)
    x_path = str(tmp_path / "x.npy")
    np.save(x_path, x)
    args = [x_path]
    for path, name in ((first, "log_predictive"), (second, "logits_stack")):
        args += [path, name, str(tmp_path / f"{name}.npy")]
    # The SavedModel needs neither tfp_bnn_adv nor Keras: run it elsewhere.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _RELOAD] + args, check=True,
                   cwd=str(tmp_path), env=env, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "log_predictive.npy"),
                               np.log(ens.predict_proba(x)), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "logits_stack.npy"),
                               _expected("logits_stack", ref), rtol=1e-5,
                               atol=1e-5)
    meta = export.load_metadata(second)
    with open(os.path.join(second, "assets", export.METADATA_FILE),
              encoding="utf-8") as f:
        assert json.load(f) == meta
    assert (meta["output"], meta["chunk_size"], meta["num_samples"],
            meta["input_shape"], meta["num_classes"]) == (
                "logits_stack", 3, 4, [4], 3)
    assert meta["metadata"] == {"method": "test", "seed": 0}
    assert meta["param_shapes"] == [list(s) for s in ens.network.param_shapes]
    rebuilt = Network.from_config(meta["network"])
    assert rebuilt.param_shapes == ens.network.param_shapes
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["sm_log", "sm_stack", "x.npy", "log_predictive.npy",
         "logits_stack.npy"])


def test_export_is_atomic_and_refuses_to_overwrite(cases, tmp_path,
                                                   monkeypatch):
    ens, x, _, _ = cases["mlp"]
    path = str(tmp_path / "sm")
    export.export(ens, path)
    before = sorted(os.listdir(path))
    with pytest.raises(FileExistsError, match="non-empty directory.*overwrite"):
        export.export(ens[:1], path)
    assert sorted(os.listdir(path)) == before
    export.export(ens[:1], path, overwrite=True)
    assert export.load_metadata(path)["num_samples"] == 1
    assert os.listdir(tmp_path) == ["sm"]  # no temporary siblings left

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export(ens, path, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export(ens, str(tmp_path / "new"))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["sm"]
    assert export.load_metadata(path)["num_samples"] == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    export.export(ens, str(empty), output="mean_logits")
    assert export.load_metadata(str(empty))["output"] == "mean_logits"


# ---------------------------------------------------------------- bad input
def test_bad_arguments_name_the_argument(cases, tmp_path):
    ens, _, _, _ = cases["mlp"]
    with pytest.raises(ValueError, match=r"output must be one of .*'probs'"):
        export.to_keras(ens, "probs")
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        ens.to_keras(chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int, got 1.5"):
        export.to_keras(ens, chunk_size=1.5)
    with pytest.raises(TypeError, match="ensemble must be a PosteriorEnsemble"):
        export.to_keras(ens.network)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="path=.*file.*existing file"):
        export.export(ens, str(a_file))
    with pytest.raises(TypeError, match="path must be a directory path"):
        export.export(ens, 3)
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        export.export(ens, str(tmp_path / "a"), overwrite="yes")
    with pytest.raises(ValueError, match="output must be one of"):
        ens.export(str(tmp_path / "b"), output="logits")
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got -2"):
        export.export(ens, str(tmp_path / "c"), chunk_size=-2)
    assert sorted(os.listdir(tmp_path)) == ["file"]  # nothing written
    with pytest.raises(TypeError, match="network must be a Network or its "
                                        "config dict, got str"):
        export.PosteriorEnsembleLayer("mlp", 2)
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        export.PosteriorEnsembleLayer(ens.network, 0)
    layer = export.PosteriorEnsembleLayer(ens.network, 2)
    with pytest.raises(ValueError, match=r"input_shape is \(None, 5\)"):
        layer(keras.Input((5,)))
    layer(keras.Input((4,)))
    with pytest.raises(ValueError, match="params has 4 samples; the layer "
                                         "holds 2"):
        layer.set_params(ens.params)
