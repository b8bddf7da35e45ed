"""VI of any Keras 3 model with a layer graph: residual, normalised, merged.

The independent reference is the Network's own evaluation of the Keras model
(``network.apply``, on the fast path or Keras' ``stateless_call`` path), never
the tf_keras variational model under test; sampling is checked against the
definition of a point estimate (the same value in every sample).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from tfp_bnn_adv import files  # pylint: disable=wrong-import-position
from tfp_bnn_adv import seeds  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import vi  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position

L = keras.layers


# ------------------------------------------------------------------ fixtures
def _resnet():
    """Conv2D, BatchNormalization, ReLU, a residual Add, global pooling and a
    Dense softmax head (stripped); BatchNorm with non-trivial statistics."""
    x = keras.Input((6, 6, 2))
    h = L.Conv2D(4, 3, padding="same", name="stem")(x)
    h = L.BatchNormalization(name="stem_bn")(h)
    h = L.ReLU(name="stem_relu")(h)
    r = L.Conv2D(4, 3, padding="same", use_bias=False, name="res_conv")(h)
    r = L.BatchNormalization(name="res_bn")(r)
    h = L.Add(name="res_add")([h, r])
    h = L.ReLU(name="res_relu")(h)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    out = L.Dense(3, activation="softmax", name="head")(h)
    model = keras.Model(x, out, name="tiny_resnet")
    rng = np.random.default_rng(0)
    for bn in (model.get_layer("stem_bn"), model.get_layer("res_bn")):
        bn.moving_mean.assign(rng.normal(size=4).astype(np.float32))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=4).astype(np.float32))
    return model


def _norm_concat_mlp():
    """LayerNormalization (generic path), Concatenate, Dropout and a final
    Activation('softmax') layer (dropped)."""
    x = keras.Input((5,))
    a = L.Dense(6, activation="tanh", name="hidden")(x)
    b = L.LayerNormalization(name="norm")(a)
    c = L.Concatenate(name="concat")([x, b])
    c = L.Dropout(0.25, name="drop")(c)
    out = L.Dense(3, name="logits")(c)
    out = L.Activation("softmax", name="probs")(out)
    return keras.Model(x, out, name="norm_concat_mlp")


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.dense = L.Dense(2)

    def call(self, x):
        return self.dense(x)


# Which parameter tensors are variational, in model.trainable_variables order.
_RESNET_MASK = (True, True, False, False, True, False, False, True, True)
_MLP_MASK = (True, True, False, False, True, True)
_MODELS = {"resnet": (_resnet, _RESNET_MASK), "mlp": (_norm_concat_mlp, _MLP_MASK)}


@pytest.fixture(scope="module", params=sorted(_MODELS))
def case(request):
    make, mask = _MODELS[request.param]
    return Network.from_keras(make()), mask


def _random_loc(net, seed):
    """Initialiser draws moved off their defaults (BatchNorm gamma != 1)."""
    rng = np.random.default_rng(seed)
    return [p.numpy() + rng.normal(0, 0.3, p.shape).astype(np.float32)
            for p in net.init_params(seed)]


def _scales(net, mask, value):
    return [np.full(s, value, np.float32) if v else None
            for s, v in zip(net.param_shapes, mask)]


def _inputs(net, n, seed):
    return np.random.default_rng(seed).uniform(
        0, 1, (n,) + net.input_shape).astype(np.float32)


def _data(net, n, seed):
    """An easy 3-class task: the class is set by two input coordinates."""
    x = _inputs(net, n, seed)
    flat = x.reshape(n, -1)
    y = (flat[:, 0] > 0.5).astype(np.int32) + (flat[:, 1] > 0.5)
    return x, y


# ------------------------------------------------------- the variational model
def test_paths_and_masks(case):
    net, mask = case
    assert net.path == ("fast" if len(mask) == 9 else "generic")
    post = vi.VIPosterior(net, _random_loc(net, 0), _scales(net, mask, 0.1))
    assert post.variational == mask
    # Only Dense/Conv2D became tfp.layers; every other layer is an adapter.
    kinds = {type(l).__name__ for l in post.variational_model.layers}
    assert {"DenseFlipout", "_KerasLayerAdapter"} <= kinds
    assert kinds <= {"InputLayer", "DenseFlipout", "Conv2DFlipout",
                     "_KerasLayerAdapter"}


@pytest.mark.parametrize("estimator", vi.ESTIMATORS)
def test_noise_free_variational_model_is_the_network(case, estimator):
    net, mask = case
    loc = _random_loc(net, 1)
    # A negligible scale switches the layers' noise off.
    post = vi.VIPosterior(net, loc, _scales(net, mask, 1e-7), estimator=estimator)
    x = _inputs(net, 8, seed=2)
    logits = post.variational_model(x, training=False).numpy()
    expected = net.apply(loc, x).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # Logits, not probabilities: the stripped softmax is not applied.
    assert np.abs(logits.sum(-1) - 1).max() > 1e-2
    # And the check has power: the model's own (non-trivial) BatchNorm
    # statistics or LayerNorm parameters matter.
    moved = [m + 0.5 if not v else m for m, v in zip(loc, mask)]
    assert np.abs(net.apply(moved, x).numpy() - expected).max() > 1e-2


def test_keras_dropout_in_an_adapter_follows_the_training_flag_and_seed():
    net = Network.from_keras(_norm_concat_mlp())
    loc = _random_loc(net, 2)
    model = vi.VIPosterior(net, loc, _scales(net, _MLP_MASK, 1e-7)
                           ).variational_model
    x = _inputs(net, 16, seed=3)

    def run(seed):
        with model.vi_noise.scope(seeds.stateless(seed)):
            return model(x, training=True).numpy()

    a, b = run(1), run(1)
    np.testing.assert_array_equal(a, b)  # a stateless function of the seed
    assert np.abs(run(2) - a).max() > 1e-2  # the Keras Dropout is on
    # Off in inference mode: the network's function.
    np.testing.assert_allclose(model(x, training=False).numpy(),
                               net.apply(loc, x).numpy(), rtol=1e-5, atol=1e-5)


def test_sample_ensemble_point_estimates_repeat_variational_ones_vary(case):
    net, mask = case
    loc = _random_loc(net, 3)
    post = vi.VIPosterior(net, loc, _scales(net, mask, 0.2))
    ens = post.sample_ensemble(4, seed=5)
    for p, m, v, sd in zip(ens.params, loc, mask, post.posterior_scale()):
        p = p.numpy()
        assert p.shape == (4,) + m.shape
        if v:
            assert np.abs(p[1:] - p[:1]).min() > 0  # every entry differs
            np.testing.assert_allclose(sd, 0.2, rtol=1e-6)
        else:
            np.testing.assert_array_equal(p, np.broadcast_to(m, p.shape))
            np.testing.assert_array_equal(sd, 0.0)
    assert [r is None for r in post.posterior_untransformed_scale()] == [
        not v for v in mask]
    # The KL counts the variational tensors only: the closed form over them.
    total = 0.0
    for m, v in zip(loc, mask):
        if v:
            m = m.astype(np.float64)
            total += np.sum(np.log(1 / 0.2) + (0.2**2 + m**2) / 2 - 0.5)
    np.testing.assert_allclose(post.kl_divergence(), total, rtol=1e-4)


def test_graph_builder_equals_the_chain_builder():
    # A chain of Dense layers forced onto the generic path is built by the
    # graph builder; the fast path's chain builder builds the Sequential.
    # Both share the variational-layer construction, so under the same noise
    # scope they draw the same Flipout noise and compute the same output.
    model = keras.Sequential([keras.Input((4,)), L.Dense(6, activation="relu"),
                              L.Dense(3)])
    chain_net = Network.from_keras(model)
    graph_net = Network.from_keras(model, path="generic")
    loc, scale = _random_loc(chain_net, 4), _scales(chain_net, (True,) * 4, 0.3)
    chain = vi.VIPosterior(chain_net, loc, scale)
    graph = vi.VIPosterior(graph_net, loc, scale)
    assert isinstance(chain.variational_model, vi._VariationalModel)  # pylint: disable=protected-access
    assert isinstance(graph.variational_model, vi._VariationalGraphModel)  # pylint: disable=protected-access
    x = _inputs(chain_net, 6, seed=1)
    outs = []
    for post in (chain, graph):
        model = post.variational_model
        with model.vi_noise.scope(seeds.stateless(9)):
            outs.append(model(x, training=True).numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    assert np.abs(outs[0] - chain_net.apply(loc, x).numpy()).max() > 1e-2


# ---------------------------------------------------------------- training
@pytest.fixture(scope="module")
def mlp_fit(tmp_path_factory):
    model = _norm_concat_mlp()
    net = Network.from_keras(model)
    x, y = _data(net, 64, seed=0)
    kwargs = dict(epochs=2, batch_size=32, learning_rate=2e-2, kl_weight=1e-3,
                  seed=1, verbose=0)
    directory = str(tmp_path_factory.mktemp("reference"))
    post = vi.fit(model, x, y, checkpoint_dir=directory, **kwargs)
    return model, x, y, kwargs, directory, post


def test_fit_trains_point_estimates_and_posteriors(mlp_fit):
    model, x, y, _, _, post = mlp_fit
    net = post.network
    loss = post.history["loss"]
    assert len(loss) == 2 and loss[1] < loss[0]
    init = net.init_params(1)  # fit's initial loc (init="default", seed=1)
    for m, m0, v in zip(post.posterior_loc(), init, post.variational):
        assert np.abs(m - m0.numpy()).max() > 1e-3  # every tensor was trained
    # Adam holds moments of the point estimates too (they are trained).
    vmodel = post.variational_model
    points = [w for l in vmodel.layers if isinstance(l, vi._KerasLayerAdapter)  # pylint: disable=protected-access
              for w in l.point_weights]
    assert len(points) == 2 and all(
        any(w is t for t in vmodel.trainable_variables) for w in points)
    # No stateful random op in the training step: Flipout noise and the
    # Keras Dropout's seed both come from the pass's stateless seed.
    types = set()
    for concrete in vmodel.train_function._list_all_concrete_functions():  # pylint: disable=protected-access
        graph_def = concrete.graph.as_graph_def()
        types.update(n.op for n in graph_def.node)
        for fn in graph_def.library.function:
            types.update(n.op for n in fn.node_def)
    assert not {t for t in types if t.startswith(("Random", "Stateful"))}
    assert any(t.startswith("StatelessRandom") for t in types)
    del model, x, y


def test_fit_of_a_resnet_lowers_the_loss_and_keeps_the_state():
    model = _resnet()
    net = Network.from_keras(model)
    x, y = _data(net, 64, seed=1)
    post = vi.fit(model, x, y, epochs=2, batch_size=64, learning_rate=2e-2,
                  kl_weight=1e-3, seed=0, verbose=0)
    loss = post.history["loss"]
    assert loss[1] < loss[0]
    assert post.variational == _RESNET_MASK
    # The BatchNorm moving statistics are the model's constants, untouched:
    # the trained variational model is still network.apply at its loc.
    for a, b in zip(post.network.state, net.state):
        np.testing.assert_array_equal(a, b)
    loc = post.posterior_loc()
    sharp = vi.VIPosterior(post.network, loc, _scales(net, _RESNET_MASK, 1e-7))
    np.testing.assert_allclose(sharp.variational_model(x[:8]).numpy(),
                               net.apply(loc, x[:8]).numpy(), rtol=1e-5,
                               atol=1e-5)


def test_a_generic_fit_resumes_from_its_checkpoint(mlp_fit, tmp_path):
    model, x, y, kwargs, reference_dir, reference = mlp_fit
    directory = str(tmp_path / "resumed")
    vi.fit(model, x, y, checkpoint_dir=directory, **{**kwargs, "epochs": 1})
    arrays, _ = files.load_arrays(os.path.join(directory, vi.CHECKPOINT_FILE))
    assert sorted(k for k in arrays if k.startswith("untransformed")) == [
        f"untransformed_scale_{i}" for i, v in enumerate(_MLP_MASK) if v]
    resumed = vi.fit(model, x, y, checkpoint_dir=directory, **kwargs)
    assert resumed.history == reference.history
    for a, b in zip(resumed.posterior_loc(), reference.posterior_loc()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(resumed.posterior_untransformed_scale(),
                    reference.posterior_untransformed_scale()):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
    ours, _ = files.load_arrays(os.path.join(directory, vi.CHECKPOINT_FILE))
    theirs, _ = files.load_arrays(os.path.join(reference_dir, vi.CHECKPOINT_FILE))
    assert sorted(ours) == sorted(theirs)
    for key in ours:  # Adam's moments of the point estimates included
        np.testing.assert_array_equal(ours[key], theirs[key], key)


def test_paper_init_draws_the_variational_tensors_only():
    net = Network.from_keras(_norm_concat_mlp())
    loc, rho = vi._paper_init(net, 3, _MLP_MASK)  # pylint: disable=protected-access
    # LayerNormalization's gamma and beta start at their initialisers (Ones,
    # Zeros), with no rho; the Dense kernels and biases at N(0, 1) draws.
    np.testing.assert_array_equal(loc[2], np.ones(6, np.float32))
    np.testing.assert_array_equal(loc[3], np.zeros(6, np.float32))
    assert rho[2] is None and rho[3] is None
    draws = np.concatenate([a.ravel() for i in (0, 1, 4, 5)
                            for a in (loc[i], rho[i])])
    assert draws.size == 144
    assert abs(draws.mean()) < 0.35 and 0.75 < draws.std() < 1.25


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip_is_exact(mlp_fit, tmp_path):
    post = mlp_fit[-1]
    path = str(tmp_path / "post.npz")
    post.save(path)
    arrays, meta = files.load_arrays(path)
    assert meta["format_version"] == vi.FORMAT_VERSION == 3
    assert meta["variational"] == list(_MLP_MASK)
    assert sorted(k for k in arrays if k.startswith("untransformed")) == [
        f"untransformed_scale_{i}" for i, v in enumerate(_MLP_MASK) if v]
    loaded = vi.VIPosterior.load(path)
    assert loaded.settings == post.settings and loaded.history == post.history
    assert loaded.variational == post.variational
    for a, b in zip(loaded.posterior_loc(), post.posterior_loc()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(loaded.posterior_scale(), post.posterior_scale()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(loaded.sample_ensemble(3, seed=2).params,
                    post.sample_ensemble(3, seed=2).params):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # A file whose mask disagrees with its architecture is refused.
    meta["variational"] = [True] * len(_MLP_MASK)
    files.save_arrays(str(tmp_path / "mask.npz"), arrays, meta)
    with pytest.raises(ValueError, match="variational mask"):
        vi.VIPosterior.load(str(tmp_path / "mask.npz"))


def test_format_version_2_files_still_load(tmp_path):
    model = keras.Sequential([keras.Input((3,)), L.Dense(4, activation="relu"),
                              L.Dense(2)])
    net = Network.from_keras(model)
    post = vi.VIPosterior(net, _random_loc(net, 0), _scales(net, (True,) * 4, 0.1))
    path = str(tmp_path / "post.npz")
    post.save(path)
    arrays, meta = files.load_arrays(path)
    del meta["variational"]  # as version 2 wrote it: rho of every tensor
    meta["format_version"] = 2
    files.save_arrays(str(tmp_path / "v2.npz"), arrays, meta)
    loaded = vi.VIPosterior.load(str(tmp_path / "v2.npz"))
    for a, b in zip(loaded.posterior_untransformed_scale() + loaded.posterior_loc(),
                    post.posterior_untransformed_scale() + post.posterior_loc()):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------- bad input
def test_a_subclassed_model_is_refused():
    model = _Subclassed()
    model(np.zeros((1, 3), np.float32))
    net = Network.from_keras(model)
    assert net.graph is None
    loc = [p.numpy() for p in net.init_params(0)]
    with pytest.raises(ValueError, match="VI needs a model with a layer graph"
                                         ".*'subclassed'.*Use HMC"):
        vi.VIPosterior(net, loc, [np.ones_like(m) for m in loc])
    with pytest.raises(ValueError, match="VI needs a model with a layer graph"):
        vi.fit(model, np.zeros((4, 3), np.float32), [0, 1, 0, 1], verbose=0)


def test_spreads_of_point_estimates_must_be_none():
    net = Network.from_keras(_norm_concat_mlp())
    loc = _random_loc(net, 0)
    good = _scales(net, _MLP_MASK, 0.1)
    gamma = net.param_specs[2].name  # layer_normalization's gamma
    # Zeros, as posterior_scale() returns them, are a point estimate too.
    zeros = [np.zeros(s, np.float32) if g is None else g
             for s, g in zip(net.param_shapes, good)]
    post = vi.VIPosterior(net, loc, zeros)
    assert post.variational == _MLP_MASK
    bad = list(good)
    bad[2] = np.full(net.param_shapes[2], 0.1, np.float32)
    with pytest.raises(ValueError, match=f"scale for '{gamma}' must be None "
                                         "or zeros: it is a deterministic"):
        vi.VIPosterior(net, loc, bad)
    with pytest.raises(ValueError, match=f"untransformed_scale for '{gamma}' "
                                         "must be None: it is"):
        vi.VIPosterior(net, loc, untransformed_scale=[
            np.zeros(s, np.float32) for s in net.param_shapes])
    missing = list(good)
    missing[0] = None
    with pytest.raises(ValueError, match=f"scale for '{net.param_specs[0].name}'"
                                         " is None, but it is a variational"):
        vi.VIPosterior(net, loc, missing)
    with pytest.raises(ValueError, match="scale has 5 tensors"):
        vi.VIPosterior(net, loc, good[:5])
    with pytest.raises(ValueError, match="scale: tensor for"):
        vi.VIPosterior(net, loc, [None if g is None else g[..., :1]
                                  for g in good])
    with pytest.raises(TypeError, match="scale must be a list"):
        vi.VIPosterior(net, loc, 0.1)
