"""PosteriorEnsemble: predictions, slicing and pickle-free persistence."""

import keras
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from tfp_bnn_adv import files  # pylint: disable=wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position

L = keras.layers


def _model():
    return keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(2, 3, activation="relu"),
                             L.Flatten(), L.Dense(5, activation="tanh"), L.Dense(3)])


@pytest.fixture(scope="module")
def setup():
    model = _model()
    net = Network.from_keras(model)
    ens = PosteriorEnsemble(net, net.init_params(seed=1, num_samples=6),
                            metadata={"method": "test", "note": [1, 2]})
    x = np.random.default_rng(0).uniform(size=(11, 6, 6, 1)).astype(np.float32)
    per_sample = []
    for s in range(6):
        model.set_weights([p[s].numpy() for p in ens.params])
        per_sample.append(model(x).numpy())
    return ens, x, np.stack(per_sample)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_logits_and_predictive_equal_a_keras_loop(setup):
    ens, x, ref_logits = setup
    np.testing.assert_allclose(ens.logits(x), ref_logits, rtol=1e-5, atol=1e-6)
    ref_probs = _softmax(ref_logits.astype(np.float64)).mean(axis=0)
    for chunk, batch in [(None, None), (1, 4), (4, 5), (6, 11)]:
        probs = ens.predict_proba(x, chunk_size=chunk, batch_size=batch)
        assert probs.shape == (11, 3)
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ens.predict(x), ref_probs.argmax(-1))
    y = ref_probs.argmax(-1)
    y[:3] = (y[:3] + 1) % 3
    assert ens.accuracy(x, y) == pytest.approx(8 / 11)


def test_slicing_thinning_and_concatenation(setup):
    ens, x, ref_logits = setup
    assert ens.num_samples == len(ens) == 6
    np.testing.assert_allclose(ens[::2].logits(x), ref_logits[::2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ens.thin(3).logits(x), ref_logits[::3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ens[-1].logits(x), ref_logits[5:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ens[[4, 0]].logits(x), ref_logits[[4, 0]], rtol=1e-5, atol=1e-6)
    mask = np.array([True, False, False, True, False, False])
    assert ens[mask].num_samples == 2
    both = PosteriorEnsemble.concatenate([ens[:2], ens[4:]])
    np.testing.assert_allclose(both.logits(x), ref_logits[[0, 1, 4, 5]], rtol=1e-5, atol=1e-6)
    with pytest.raises(IndexError, match="out of range"):
        ens[6]  # pylint: disable=pointless-statement
    with pytest.raises(IndexError, match="selects no samples"):
        ens[6:]  # pylint: disable=pointless-statement
    with pytest.raises(ValueError, match="every must be >= 1, got 0"):
        ens.thin(0)


def test_deterministic_keras_model_is_an_ensemble_of_one():
    model = _model()
    ens = PosteriorEnsemble.from_keras(model)
    x = np.random.default_rng(1).uniform(size=(4, 6, 6, 1)).astype(np.float32)
    assert ens.num_samples == 1
    np.testing.assert_allclose(ens.predict_proba(x), _softmax(model(x).numpy()),
                               rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(setup, tmp_path):
    ens, x, _ = setup
    path = tmp_path / "post.npz"
    ens.save(path)
    back = PosteriorEnsemble.load(path)
    assert back.metadata == ens.metadata
    for a, b in zip(ens.params, back.params):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(back.predict_proba(x), ens.predict_proba(x), rtol=1e-6)
    # The file is a plain npz that numpy reads without pickle.
    with np.load(path, allow_pickle=False) as data:
        assert sorted(k for k in data.files if k.startswith("param_")) == [
            f"param_{i}" for i in range(6)]


def test_missing_corrupt_and_mismatched_files_fail_clearly(setup, tmp_path):
    ens, _, _ = setup
    with pytest.raises(FileNotFoundError, match="nothere"):
        PosteriorEnsemble.load(tmp_path / "nothere.npz")
    path = tmp_path / "post.npz"
    ens.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PosteriorEnsemble.load(tmp_path / "trunc.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PosteriorEnsemble.load(tmp_path / "junk.npz")
    arrays, meta = files.load_arrays(path)
    arrays["param_2"] = arrays["param_2"][:, :-1]
    files.save_arrays(tmp_path / "shape.npz", arrays, meta)
    with pytest.raises(ValueError, match="param_2"):
        PosteriorEnsemble.load(tmp_path / "shape.npz")
    arrays, meta = files.load_arrays(path)
    del arrays["param_5"]
    files.save_arrays(tmp_path / "missing.npz", arrays, meta)
    with pytest.raises(ValueError, match="expected arrays param_0..param_5"):
        PosteriorEnsemble.load(tmp_path / "missing.npz")
    arrays, meta = files.load_arrays(path)
    files.save_arrays(tmp_path / "foreign.npz", arrays, {"format": "other"})
    with pytest.raises(ValueError, match="not a saved PosteriorEnsemble"):
        PosteriorEnsemble.load(tmp_path / "foreign.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="no metadata"):
        PosteriorEnsemble.load(tmp_path / "plain.npz")


def test_constructor_validates(setup):
    ens, _, _ = setup
    with pytest.raises(TypeError, match="Network"):
        PosteriorEnsemble(ens.params, ens.params)
    with pytest.raises(ValueError, match="shape"):
        PosteriorEnsemble(ens.network, [p[0] for p in ens.params])
    with pytest.raises(ValueError, match="inconsistent sample axis"):
        PosteriorEnsemble(ens.network, [ens.params[0]] + [p[:2] for p in ens.params[1:]])


def test_non_finite_params_are_refused_naming_the_tensor_and_count(setup):
    ens, _, _ = setup
    params = [p.numpy().copy() for p in ens.params]
    params[2][1, 0, :3] = [np.nan, np.inf, -np.inf]
    name = ens.network.param_specs[2].name
    with pytest.raises(ValueError, match=rf"params\[2\] \({name}.*: 3 of 960 entries"):
        PosteriorEnsemble(ens.network, params)
    # float64 weights beyond the float32 range would become inf in the cast.
    params = [p.numpy().astype(np.float64) for p in ens.params]
    params[0][0, 0, 0, 0, 0] = 1e300
    with pytest.raises(ValueError, match=r"params\[0\].*1 of"):
        PosteriorEnsemble(ens.network, params)


def _rewrite(tmp_path, source, name, edit_meta=None, edit_arrays=None):
    arrays, meta = files.load_arrays(source)
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(arrays)
    path = tmp_path / name
    files.save_arrays(path, arrays, meta)
    return path


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(format_version="1"), "'format_version' must be an int"),
    (lambda m: m.update(format_version=[1]), "'format_version' must be an int"),
    (lambda m: m.update(format_version=1.5), "'format_version' must be an int"),
    (lambda m: m.update(metadata=["method", "hmc"]), "'metadata' must be a JSON object"),
    (lambda m: m.update(metadata="hmc"), "'metadata' must be a JSON object"),
    (lambda m: m.update(network=[1, 2]), "'network' must be a JSON object"),
    (lambda m: m.update(network={"keras_model": 7}), "field 'network'"),
])
def test_crafted_metadata_fails_clearly_naming_field_and_file(setup, tmp_path,
                                                              edit, field):
    ens, _, _ = setup
    ens.save(tmp_path / "post.npz")
    path = _rewrite(tmp_path, tmp_path / "post.npz", "crafted.npz", edit_meta=edit)
    with pytest.raises(ValueError, match=field) as info:
        PosteriorEnsemble.load(path)
    assert "crafted.npz" in str(info.value)


def test_float64_params_beyond_float32_are_refused_on_load(setup, tmp_path):
    ens, _, _ = setup
    ens.save(tmp_path / "post.npz")

    def blow_up(arrays):
        arrays["param_3"] = arrays["param_3"].astype(np.float64)
        arrays["param_3"][2, 1] = -1e300

    path = _rewrite(tmp_path, tmp_path / "post.npz", "huge.npz",
                    edit_arrays=blow_up)
    with pytest.raises(ValueError, match=r"param_3 .*1e\+300.*float32 range") as info:
        PosteriorEnsemble.load(path)
    assert "huge.npz" in str(info.value)

    def nan(arrays):
        arrays["param_1"][0, 0] = np.nan

    path = _rewrite(tmp_path, tmp_path / "post.npz", "nan.npz", edit_arrays=nan)
    with pytest.raises(ValueError, match="param_1 .* holds 1 NaN or infinite"):
        PosteriorEnsemble.load(path)
    # float64 values inside the float32 range still load (as float32).
    path = _rewrite(tmp_path, tmp_path / "post.npz", "f64.npz", edit_arrays=lambda a: a.update(
        param_0=a["param_0"].astype(np.float64)))
    np.testing.assert_array_equal(PosteriorEnsemble.load(path).params[0].numpy(),
                                  ens.params[0].numpy())
