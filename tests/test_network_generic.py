"""Any Keras 3 model: both import paths against a per-sample loop of Keras.

The reference for every architecture is the Keras model's own
``model.stateless_call`` run once per weight set in a Python loop, and its
input gradients taken by ``tf.GradientTape`` through that loop; the network
under test computes the whole stack at once, on the fast path where it
covers the model and on the generic path always.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=wrong-import-position
from keras import layers as L  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from tfp_bnn_adv import attacks  # pylint: disable=wrong-import-position
from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import gradients  # pylint: disable=wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import hmc  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import sgd  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position

S, B = 3, 4


def _randomise_batch_norm(model, seed=0):
    """Non-trivial moving statistics, so inference-mode BN is not ~identity."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.3, c).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype(np.float32))
    return model


def resnet(image=(8, 8, 1), classes=3, channels=4):
    inp = keras.Input(image)
    h = L.Conv2D(channels, 3, padding="same")(inp)
    h = L.BatchNormalization()(h)
    h = L.ReLU()(h)
    r = L.Conv2D(channels, 3, padding="same")(h)
    r = L.BatchNormalization()(r)
    h = L.ReLU()(L.Add()([h, r]))
    h = L.GlobalAveragePooling2D()(h)
    return _randomise_batch_norm(
        keras.Model(inp, L.Dense(classes, activation="softmax")(h)))


def conv1d():
    return keras.Sequential([keras.Input((10, 2)),
                             L.Conv1D(4, 3, activation="relu", name="conv"),
                             L.GlobalMaxPooling1D(), L.Dense(3)])


def depthwise_separable():
    return keras.Sequential([keras.Input((7, 7, 2)), L.DepthwiseConv2D(3, activation="tanh"),
                             L.SeparableConv2D(3, 3), L.Flatten(), L.Dense(3)])


def layernorm_mlp():
    return keras.Sequential([keras.Input((5,)), L.Dense(6), L.LayerNormalization(),
                             L.Activation("gelu"), L.Dense(3, activation="softmax")])


def rescaling_front():
    return keras.Sequential([keras.Input((4, 4, 2)), L.Rescaling(1 / 4.0, offset=-0.5),
                             L.Conv2D(3, 2, activation="relu"),
                             L.Rescaling([2.0, 1.0, 0.5], offset=[0.1, 0.0, -0.1]),
                             L.GlobalMaxPooling2D(keepdims=True), L.Flatten(),
                             L.Dense(3)])


def two_branch_concat():
    inp = keras.Input((6,))
    a = L.Dense(4, activation="tanh")(inp)
    b = L.Dense(3)(inp)
    return keras.Model(inp, L.Dense(3)(L.Concatenate()([a, b])))


def nested():
    inner_in = keras.Input((6,))
    inner = keras.Model(inner_in, L.Add()([L.Dense(6, activation="relu")(inner_in),
                                           inner_in]), name="residual")
    block = keras.Sequential([keras.Input((6,)), inner, L.BatchNormalization()],
                             name="block")
    inp = keras.Input((5,))
    h = L.BatchNormalization()(inp)   # on the shared input, before any weight
    h = L.Dense(6)(h)
    return _randomise_batch_norm(keras.Model(inp, L.Dense(3)(block(h))))


class _Subclassed(keras.Model):

    def __init__(self):
        super().__init__()
        self.hidden = L.Dense(5, activation="relu")
        self.out = L.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x) * 2.0)


def subclassed():
    model = _Subclassed()
    model(tf.zeros([1, 4]))
    return model


ARCHITECTURES = {
    # name: (builder, whether the fast path covers it)
    "resnet": (resnet, True),
    "conv1d": (conv1d, False),
    "depthwise_separable": (depthwise_separable, False),
    "layernorm_mlp": (layernorm_mlp, False),
    "rescaling_front": (rescaling_front, True),
    "two_branch_concat": (two_branch_concat, False),
    "nested": (nested, True),
    "subclassed": (subclassed, False),
}


def _keras_probs(model, params, x, s):
    """Per-class probabilities of weight set ``s`` by Keras itself."""
    kwargs = {"training": False} if model._call_has_training_arg else {}  # pylint: disable=protected-access
    out, _ = model.stateless_call([p[s] for p in params],
                                  [v.value for v in model.non_trainable_variables],
                                  x, **kwargs)
    ends_in_softmax = np.allclose(tf.reduce_sum(out, -1).numpy(), 1.0) and bool(
        tf.reduce_all(out >= 0))
    return out if ends_in_softmax else tf.nn.softmax(out)


def _loop_references(model, params, x, y):
    """Probabilities and the three input gradients, one weight set at a time."""
    x = tf.constant(x)
    probs, per_sample = [], []
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        for s in range(S):
            p = _keras_probs(model, params, x, s)
            probs.append(p)
            per_sample.append(-tf.math.log(tf.gather(p, y, batch_dims=1)))
        predictive = -tf.math.log(tf.gather(tf.add_n(probs) / S, y, batch_dims=1))
    per_sample_grads = np.stack([tape.gradient(l, x).numpy() for l in per_sample])
    return (np.stack([p.numpy() for p in probs]), per_sample_grads,
            tape.gradient(predictive, x).numpy())


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def case(request):
    builder, fast = ARCHITECTURES[request.param]
    model = builder()
    net = Network.from_keras(model)
    params = net.init_params(seed=1, num_samples=S)
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(B,) + net.input_shape).astype(np.float32)
    y = rng.integers(0, net.num_classes, B)
    return request.param, model, fast, params, x, y, _loop_references(model, params, x, y)


@pytest.mark.parametrize("path", ["auto", "generic"])
def test_stack_and_gradients_equal_a_per_sample_keras_loop(case, path):
    name, model, fast, params, x, y, (probs, per_sample, predictive) = case
    net = Network.from_keras(model, path=path)
    assert net.path == ("fast" if fast and path == "auto" else "generic"), name
    # The generic path's graph under XLA, vectorised and looped (the fast
    # path's is tested in test_network); the rest on TF's kernels, which
    # trace much faster.
    jit = net.path == "generic" and name in ("layernorm_mlp", "conv1d")
    logits = tf.function(net.apply_stack, jit_compile=jit)(params, tf.constant(x))
    assert logits.shape == (S, B, 3)
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), probs, rtol=2e-5,
                               atol=2e-6)
    ens = PosteriorEnsemble(net, params)
    options = dict(jit_compile=False)
    got = gradients.per_sample_loss_gradients(ens, x, y, chunk_size=2, **options)
    np.testing.assert_allclose(got, per_sample, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gradients.expected_loss_gradient(ens, x, y, **options),
                               per_sample.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        gradients.predictive_loss_gradient(ens, x, y, **options), predictive,
        rtol=1e-4, atol=1e-6)


def test_per_sample_inputs_on_the_generic_path_equal_the_loop():
    model = layernorm_mlp()
    net = Network.from_keras(model)
    params = net.init_params(seed=3, num_samples=S)
    xs = np.random.default_rng(5).normal(size=(S, B, 5)).astype(np.float32)
    got = tf.nn.softmax(net.apply_stack(params, xs, per_sample_inputs=True)).numpy()
    for s in range(S):
        np.testing.assert_allclose(got[s], _keras_probs(model, params, xs[s], s),
                                   rtol=2e-5, atol=2e-6)


def test_the_path_and_its_reason_are_stated():
    model = conv1d()
    net = Network.from_keras(model)
    assert net.path == "generic"
    assert net.path_reason.startswith("layer 'conv' (Conv1D)")
    # Conv1D's per-sample kernels have no vectorising converter.
    assert net.vectorization == "map_fn"
    assert Network.from_keras(layernorm_mlp()).vectorization == "vectorized_map"
    assert Network.from_keras(resnet()).vectorization == "fast"
    assert "generic" in repr(net)
    with pytest.raises(ValueError, match=r"not on the fast path: layer 'conv' \(Conv1D\)"):
        Network.from_keras(model, path="fast")


def test_dropout_on_the_generic_path_is_seeded_and_off_at_prediction():
    model = keras.Sequential([keras.Input((6,)), L.Dense(16), L.LayerNormalization(),
                              L.Dropout(0.5), L.Dense(3)])
    net = Network.from_keras(model)
    assert net.path == "generic" and net.has_dropout
    params = net.init_params(seed=0, num_samples=S)
    x = np.random.default_rng(0).normal(size=(B, 6)).astype(np.float32)
    off = net.apply_stack(params, x).numpy()
    np.testing.assert_allclose(tf.nn.softmax(off[1]).numpy(),
                               _keras_probs(model, params, x, 1), rtol=2e-5,
                               atol=2e-6)
    one = net.apply_stack(params, x, training=True, seed=tf.constant([4, 2])).numpy()
    again = net.apply_stack(params, x, training=True, seed=tf.constant([4, 2])).numpy()
    other = net.apply_stack(params, x, training=True, seed=tf.constant([4, 3])).numpy()
    np.testing.assert_array_equal(one, again)
    assert not np.allclose(one, off) and not np.allclose(one, other)
    # Samples draw different masks from the same call seed.
    same_params = [tf.repeat(p[:1], S, axis=0) for p in params]
    masks = net.apply_stack(same_params, x, training=True, seed=tf.constant([4, 2]))
    assert not np.allclose(masks[0], masks[1])
    with pytest.raises(ValueError, match="needs a seed"):
        net.apply_stack(params, x, training=True)


def test_batch_norm_state_survives_save_and_load(tmp_path):
    for path in ("auto", "generic"):
        net = Network.from_keras(resnet(), path=path)
        ens = PosteriorEnsemble(net, net.init_params(seed=2, num_samples=2))
        x = np.random.default_rng(1).uniform(size=(5, 8, 8, 1)).astype(np.float32)
        ens.save(str(tmp_path / f"{path}.npz"))
        back = PosteriorEnsemble.load(str(tmp_path / f"{path}.npz"))
        assert back.network.path == net.path
        np.testing.assert_array_equal(back.network.state[0], net.state[0])
        # Same weights, same state, same compile path (a rule, not a
        # timing): the same bits.
        np.testing.assert_array_equal(back.predict_proba(x),
                                      ens.predict_proba(x))


@pytest.mark.parametrize("build, match", [
    (lambda: keras.Sequential([keras.Input((5,), dtype="int32"),
                               L.Embedding(10, 4, name="tokens"), L.Flatten(),
                               L.Dense(2)]),
     "dtype int32"),
    (lambda: keras.Sequential([keras.Input((5,)), L.Embedding(10, 4, name="tokens"),
                               L.Flatten(), L.Dense(2)]),
     r"'tokens' \(Embedding\) maps integer token ids"),
    (lambda: keras.Sequential([keras.Input((4, 3), batch_size=2),
                               L.LSTM(4, stateful=True, name="memory"), L.Dense(2)]),
     r"'memory' \(LSTM\) is stateful"),
])
def test_what_cannot_be_a_pure_function_is_refused_by_name(build, match):
    with pytest.raises(ValueError, match=match):
        Network.from_keras(build())


# --------------------------------------------------------------------------
# Inference and attacks on a ResNet-style model, on real data.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fashion():
    return data.fashion_mnist().subset(num_train=200, num_test=20, seed=0)


def _small_resnet():
    return resnet(image=(28, 28, 1), classes=10, channels=4)


def test_hmc_and_deep_ensembles_run_on_a_resnet_and_are_attacked(fashion):
    x, y = fashion.train_x, fashion.train_y
    posterior, diagnostics = hmc.sample(
        _small_resnet(), x, y, num_chains=2, num_burnin_steps=6, num_results=4,
        num_leapfrog_steps=3, step_size=1e-3, seed=0, jit_compile=False)
    assert posterior.num_samples == 8 and posterior.network.path == "fast"
    assert np.all(np.isfinite(diagnostics.acceptance_rate))
    ensemble = sgd.train_ensemble(_small_resnet(), x, y, num_members=2, epochs=2,
                                  batch_size=50, learning_rate=3e-3, verbose=0)
    assert ensemble.num_samples == 2
    for ens in (posterior, ensemble):
        clean = ens.accuracy(fashion.test_x, fashion.test_y)
        x_adv = attacks.fgsm(ens, fashion.test_x, fashion.test_y, 0.1,
                             gradient="predictive")
        assert x_adv.shape == fashion.test_x.shape
        assert np.abs(x_adv - fashion.test_x).max() <= 0.1 + 1e-6
        assert ens.accuracy(x_adv, fashion.test_y) <= clean


def test_generic_gradients_under_xla_keep_inputs_and_weights_as_arguments():
    # The gradient of a vectorised matmul of a shared input used to make XLA
    # need every input and weight as a compile-time constant, so each new
    # batch compiled anew; the compiled program must take them as arguments
    # (and agree with Keras, one sample at a time).
    model = keras.Sequential([keras.Input((6,)), L.Dense(5, activation="tanh"),
                              L.LayerNormalization(), L.Dense(3)])
    net = Network.from_keras(model, path="generic")
    assert net.vectorization == "vectorized_map"
    params = net.init_params(seed=1, num_samples=4)
    x = tf.constant(np.random.default_rng(0).normal(size=(7, 6)).astype(np.float32))

    @tf.function(jit_compile=True, autograph=False)
    def grads(p, xx):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(xx)
            tape.watch(p)
            loss = tf.reduce_sum(tf.sin(net.apply_stack(p, xx)))
        return tape.gradient(loss, xx), tape.gradient(loss, p)

    hlo = grads.experimental_get_compiler_ir(params, x)(stage="hlo")
    entry = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
    signature = entry[:entry.index("->")]
    assert signature.count(": f32[") == len(params) + 1, signature
    # Against a per-sample loop by tf.GradientTape on the Keras model.
    got_x, got_p = grads(params, x)
    want_x = np.zeros(x.shape, np.float32)
    for s in range(4):
        model.set_weights([q[s].numpy() for q in params])
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(model(x)))
        want_x += tape.gradient(loss, x).numpy()
        for g, w in zip(got_p, tape.gradient(loss, model.trainable_weights)):
            np.testing.assert_allclose(g[s].numpy(), w.numpy(), rtol=1e-4,
                                       atol=1e-5)
    np.testing.assert_allclose(got_x.numpy(), want_x, rtol=1e-4, atol=1e-5)
