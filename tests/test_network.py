"""Network: the vectorised pure function must equal Keras, sample by sample."""

import keras
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from tfp_bnn_adv import network as network_lib  # pylint: disable=wrong-import-position
from tfp_bnn_adv import validate  # pylint: disable=wrong-import-position
from tfp_bnn_adv import xla  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position

L = keras.layers


def _cnn():
    return keras.Sequential([
        keras.Input((12, 12, 2)),
        L.Conv2D(3, 3, activation="relu", padding="same"),
        L.MaxPooling2D(),
        L.Conv2D(4, (3, 2), strides=(1, 2), activation="tanh"),
        L.AveragePooling2D(2, padding="same"),
        L.Flatten(),
        L.Dense(5),
        L.LeakyReLU(0.1),
        L.Dropout(0.3),
        L.Dense(3, activation="softmax"),
    ])


def _mlp():
    return keras.Sequential([
        keras.Input((6,)), L.Dense(7, activation="elu"), L.ReLU(),
        L.Dense(5, activation="sigmoid"), L.Dense(4)])


def _functional():
    inp = keras.Input((8, 8, 1))
    h = L.Conv2D(2, 3, dilation_rate=2, padding="same")(inp)
    h = L.Activation("softplus")(h)
    h = L.Reshape((8 * 8 * 2,))(h)
    h = keras.Sequential([L.Dense(6, activation="gelu"), L.Dense(3)])(h)
    return keras.Model(inp, h)


def _keras_logits(model, params, x, s):
    model.set_weights([p[s].numpy() for p in params])
    return model(x, training=False).numpy()


MODELS = {"mlp": (_mlp, (6,)), "cnn": (_cnn, (12, 12, 2)),
          "functional": (_functional, (8, 8, 1))}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("jit", [False, True])
def test_stacked_apply_equals_keras_sample_by_sample(name, jit):
    build, in_shape = MODELS[name]
    model = build()
    net = Network.from_keras(model)
    params = net.init_params(seed=3, num_samples=4)
    x = np.random.default_rng(0).uniform(size=(5,) + in_shape).astype(np.float32)
    fn = tf.function(lambda p, xx: net.apply_stack(p, xx), jit_compile=jit)
    logits = fn(params, tf.constant(x)).numpy()
    assert logits.shape == (4, 5, net.num_classes)
    for s in range(4):
        ref = _keras_logits(model, params, x, s)
        ours = logits[s]
        if net.stripped_output_activation == "softmax":
            ours = tf.nn.softmax(ours).numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


# (input features, units, examples, samples): the first takes the batched
# matmul on TF's kernels (2 n f <= u (f + 2 n), S > 1), the others the
# folded one.
@pytest.mark.parametrize("features, units, n, samples",
                         [(20, 64, 9, 5), (60, 3, 40, 5), (20, 64, 9, 1)])
@pytest.mark.parametrize("jit", [False, True])
def test_both_ops_of_a_dense_layer_on_a_shared_input_equal_keras(
        features, units, n, samples, jit):
    model = keras.Sequential([keras.Input((features,)),
                              L.Dense(units, activation="tanh"), L.Dense(3)])
    net = Network.from_keras(model)
    params = net.init_params(seed=1, num_samples=samples)
    x = tf.constant(np.random.default_rng(2).normal(
        size=(n, features)).astype(np.float32))
    y = tf.constant(np.arange(n) % 3, tf.int32)

    def fn(p, xx):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([p, xx])
            logits = net.apply_stack(p, xx)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.broadcast_to(y, [samples, n]), logits))
        return logits, tape.gradient(loss, xx), tape.gradient(loss, p)

    traced = tf.function(fn, jit_compile=jit)
    graph_ops = {o.type for o in traced.get_concrete_function(
        params, x).graph.get_operations()}
    batched = (not jit and samples > 1
               and 2 * n * features <= units * (features + 2 * n))
    # The folded op transposes the kernel stack; the batched one does not.
    assert ("Transpose" in graph_ops) is not batched
    logits, grad_x, grad_p = traced(params, x)
    # The reference: Keras, one weight set at a time, with its own tape.
    want_x = np.zeros((n, features), np.float32)
    for s in range(samples):
        model.set_weights([q[s].numpy() for q in params])
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            ref = model(x, training=False)
            loss = tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y, ref))
        np.testing.assert_allclose(logits[s].numpy(), ref.numpy(), rtol=1e-5,
                                   atol=1e-5)
        want_x += tape.gradient(loss, x).numpy()
        for got, want in zip(grad_p, tape.gradient(loss,
                                                   model.trainable_weights)):
            np.testing.assert_allclose(got[s].numpy(), np.asarray(want),
                                       rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_x.numpy(), want_x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["grouped", "looped", "mapped"])
def test_grouped_looped_and_mapped_convolutions_equal_keras(monkeypatch, form):
    # Hosts without oneDNN (TF's Eigen kernels have no grouped-convolution
    # gradient) run the network one sample at a time ("mapped"), or, where
    # that does not apply, per-sample convolutions concatenated ("looped");
    # force each form here.  Logits, input and weight gradients, and
    # per-sample inputs are checked against Keras, one sample at a time.
    monkeypatch.setattr(network_lib, "_grouped_conv_as_a_loop",
                        lambda: form != "grouped")
    if form == "looped":
        monkeypatch.setattr(Network, "_conv_sees_per_sample_input",
                            lambda self, per_sample_inputs: False)
    model = _cnn()
    net = Network.from_keras(model)
    params = net.init_params(seed=4, num_samples=3)
    rng = np.random.default_rng(5)
    x = tf.constant(rng.uniform(size=(4, 12, 12, 2)).astype(np.float32))
    xs = tf.constant(rng.uniform(size=(3, 4, 12, 12, 2)).astype(np.float32))
    y = tf.constant([0, 1, 2, 1], tf.int32)

    # Where TF's kernels lack grouped-convolution gradients, the grouped form
    # runs under XLA, as the package runs it there.
    jit = form == "grouped" and not xla.tf_kernels_are_onednn()

    @tf.function(autograph=False, jit_compile=jit)
    def fn(p, xx, per_sample):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(xx)
            tape.watch(p)
            logits = net.apply_stack(p, xx, per_sample_inputs=per_sample)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.broadcast_to(y, [3, 4]), logits))
        return logits, tape.gradient(loss, xx), tape.gradient(loss, p)

    for inputs, per_sample in ((x, False), (xs, True)):
        graph_def = fn.get_concrete_function(
            params, inputs, per_sample).graph.as_graph_def()
        graph_ops = {n.op for n in graph_def.node}
        for fdef in graph_def.library.function:  # loop bodies, wrapped calls
            graph_ops.update(n.op for n in fdef.node_def)
        assert ("Split" in graph_ops) is (form == "looped")
        assert bool({"While", "StatelessWhile"} & graph_ops) is (form == "mapped")
        logits, grad, grad_w = fn(params, inputs, per_sample)
        want = np.zeros(x.shape, np.float32)
        for s in range(3):
            model.set_weights([q[s].numpy() for q in params])
            xx = tf.constant(inputs[s] if per_sample else inputs)
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(xx)
                # The model ends in a softmax, stripped to logits by the import.
                probs = model(xx, training=False)
                loss = tf.reduce_sum(-tf.math.log(tf.gather(probs, y,
                                                            batch_dims=1)))
            np.testing.assert_allclose(tf.nn.softmax(logits[s]).numpy(),
                                       probs.numpy(), rtol=1e-4, atol=1e-5)
            g = tape.gradient(loss, xx).numpy()
            if per_sample:
                np.testing.assert_allclose(grad[s].numpy(), g, rtol=1e-3,
                                           atol=1e-5)
            else:
                want += g
            for got, w in zip(grad_w, tape.gradient(
                    loss, model.trainable_weights)):
                np.testing.assert_allclose(got[s].numpy(), w.numpy(),
                                           rtol=1e-3, atol=1e-5)
        if not per_sample:
            np.testing.assert_allclose(grad.numpy(), want, rtol=1e-3, atol=1e-5)


def test_mapped_form_keeps_dropout_masks_of_the_stack(monkeypatch):
    # Dropout in training mode draws its masks for the whole stack at once;
    # where the network would otherwise run one sample at a time, it must
    # not, so the masks (and the outputs) never depend on the platform.
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(3, 3, activation="relu"),
        keras.layers.Dropout(0.5), keras.layers.Conv2D(2, 3),
        keras.layers.Flatten(), keras.layers.Dense(3)])
    net = Network.from_keras(model)
    params = net.init_params(seed=1, num_samples=4)
    x = tf.constant(np.random.default_rng(2).uniform(
        size=(5, 8, 8, 1)).astype(np.float32))
    seed = tf.constant([3, 4], tf.int32)
    outs = {}
    for form in ("grouped", "looped"):
        monkeypatch.setattr(network_lib, "_grouped_conv_as_a_loop",
                            lambda form=form: form == "looped")
        outs[form] = net.apply_stack(params, x, training=True, seed=seed)
        graph_def = tf.function(
            lambda p: net.apply_stack(p, x, training=True, seed=seed)
        ).get_concrete_function(params).graph.as_graph_def()
        ops = {n.op for n in graph_def.node}
        for fdef in graph_def.library.function:
            ops.update(n.op for n in fdef.node_def)
        assert not {"While", "StatelessWhile"} & ops
    np.testing.assert_allclose(outs["looped"].numpy(), outs["grouped"].numpy(),
                               rtol=1e-5, atol=1e-6)
    # Without training the same network runs mapped, and agrees.
    mapped = net.apply_stack(params, x)
    monkeypatch.setattr(network_lib, "_grouped_conv_as_a_loop", lambda: False)
    np.testing.assert_allclose(mapped.numpy(), net.apply_stack(params, x).numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_sample_inputs_and_single_apply(name):
    build, in_shape = MODELS[name]
    model = build()
    net = Network.from_keras(model)
    params = net.init_params(seed=5, num_samples=3)
    xs = np.random.default_rng(1).uniform(size=(3, 4) + in_shape).astype(np.float32)
    logits = net.apply_stack(params, tf.constant(xs), per_sample_inputs=True).numpy()
    for s in range(3):
        model.set_weights([p[s].numpy() for p in params])
        ref = model(xs[s]).numpy()
        single = net.apply([p[s] for p in params], tf.constant(xs[s])).numpy()
        if net.stripped_output_activation == "softmax":
            logits_s, single = tf.nn.softmax(logits[s]).numpy(), tf.nn.softmax(single).numpy()
        else:
            logits_s = logits[s]
        np.testing.assert_allclose(logits_s, ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(single, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", [
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "tanh",
    "sigmoid", "hard_sigmoid", "softplus", "softsign", "silu", "exponential",
    "mish", "softmax", "log_softmax"])
def test_every_activation_matches_keras(activation):
    model = keras.Sequential([keras.Input((4,)), L.Dense(5, activation=activation),
                              L.Dense(3)])
    net = Network.from_keras(model)
    params = net.init_params(seed=1, num_samples=2)
    x = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)
    logits = net.apply_stack(params, x).numpy()
    for s in range(2):
        np.testing.assert_allclose(logits[s], _keras_logits(model, params, x, s),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    {"negative_slope": 0.2}, {"max_value": 0.5}, {"threshold": 0.3},
    {"threshold": 0.2, "negative_slope": 0.1, "max_value": 1.0}])
def test_relu_layer_options_match_keras(kwargs):
    model = keras.Sequential([keras.Input((4,)), L.Dense(6), L.ReLU(**kwargs),
                              L.Dense(2)])
    net = Network.from_keras(model)
    params = net.init_params(seed=4, num_samples=2)
    x = np.random.default_rng(3).normal(size=(9, 4)).astype(np.float32) * 3
    logits = net.apply_stack(params, x).numpy()
    for s in range(2):
        np.testing.assert_allclose(logits[s], _keras_logits(model, params, x, s),
                                   rtol=1e-4, atol=1e-5)


def test_final_softmax_is_stripped_to_logits():
    for last in ([L.Dense(3, activation="softmax")],
                 [L.Dense(3), L.Activation("softmax")],
                 [L.Dense(3, activation="log_softmax")]):
        model = keras.Sequential([keras.Input((4,)), L.Dense(5)] + last)
        net = Network.from_keras(model)
        params = net.init_params(seed=0, num_samples=1)
        x = np.random.default_rng(4).normal(size=(3, 4)).astype(np.float32)
        probs = tf.nn.softmax(net.apply_stack(params, x)[0]).numpy()
        ref = _keras_logits(model, params, x, 0)
        if net.stripped_output_activation == "log_softmax":
            ref = np.exp(ref)
        np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
        assert net.stripped_output_activation in ("softmax", "log_softmax")


@pytest.mark.parametrize("layer, cls", [
    (L.GaussianNoise(0.1, name="noise"), "GaussianNoise"),
    (L.LayerNormalization(name="ln"), "LayerNormalization")])
def test_a_layer_the_fast_path_lacks_goes_generic_and_is_named(layer, cls):
    model = keras.Sequential([keras.Input((4,)), L.Dense(5), layer, L.Dense(2)])
    net = Network.from_keras(model)
    assert net.path == "generic"
    assert f"'{layer.name}' ({cls})" in net.path_reason
    with pytest.raises(ValueError, match=rf"not on the fast path.*'{layer.name}'.*{cls}"):
        Network.from_keras(model, path="fast")


def test_bad_models_are_rejected_clearly():
    def custom_act(t):
        return t * 2.0

    # Settings the fast path lacks go generic rather than fail.
    custom = Network.from_keras(keras.Sequential([
        keras.Input((4,)), L.Dense(3, activation=custom_act), L.Dense(2)]))
    assert custom.path == "generic" and "activation 'custom_act'" in custom.path_reason
    grouped = Network.from_keras(keras.Sequential([
        keras.Input((6, 6, 2)), L.Conv2D(2, 3, groups=2), L.Flatten(), L.Dense(2)]))
    assert grouped.path == "generic" and "groups=2" in grouped.path_reason
    with pytest.raises(ValueError, match="num_classes >= 2"):
        Network.from_keras(keras.Sequential([keras.Input((4,)), L.Dense(1)]))
    with pytest.raises(ValueError, match="not built"):
        Network.from_keras(keras.Sequential([L.Dense(2)]))
    with pytest.raises(TypeError, match="keras.Model"):
        Network.from_keras("model.keras")
    with pytest.raises(ValueError, match="path must be one of"):
        Network.from_keras(_mlp(), path="fastest")


def test_init_params_is_stateless_and_follows_initialisers():
    model = keras.Sequential([keras.Input((300,)), L.Dense(200),
                              L.Dense(10, kernel_initializer="he_normal",
                                      bias_initializer="ones")])
    net = Network.from_keras(model)
    a, b = net.init_params(7), net.init_params(7)
    c = net.init_params(8)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p.numpy(), q.numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())
    limit = np.sqrt(6.0 / (300 + 200))  # Glorot uniform, closed form
    k0 = a[0].numpy()
    assert np.abs(k0).max() <= limit and np.abs(k0).max() > 0.95 * limit
    np.testing.assert_allclose(k0.var(), limit ** 2 / 3, rtol=0.03)
    np.testing.assert_array_equal(a[1].numpy(), 0.0)
    np.testing.assert_allclose(a[2].numpy().std(), np.sqrt(2.0 / 200), rtol=0.1)
    np.testing.assert_array_equal(a[3].numpy(), 1.0)
    stack = net.init_params(7, num_samples=3)
    assert [tuple(p.shape) for p in stack] == [(3,) + s for s in net.param_shapes]
    assert not np.array_equal(stack[0][0].numpy(), stack[0][1].numpy())


def test_dropout_is_identity_at_prediction_and_stateless_in_training():
    model = keras.Sequential([keras.Input((50,)), L.Dense(400), L.Dropout(0.5),
                              L.Dense(2)])
    net = Network.from_keras(model)
    params = net.init_params(0, num_samples=2)
    x = np.ones((3, 50), np.float32)
    eval_out = net.apply_stack(params, x).numpy()
    np.testing.assert_allclose(eval_out[0], _keras_logits(model, params, x, 0),
                               rtol=1e-5, atol=1e-5)
    t1 = net.apply_stack(params, x, training=True, seed=[1, 2]).numpy()
    t2 = net.apply_stack(params, x, training=True, seed=[1, 2]).numpy()
    t3 = net.apply_stack(params, x, training=True, seed=[1, 3]).numpy()
    np.testing.assert_array_equal(t1, t2)
    assert not np.allclose(t1, t3)
    with pytest.raises(ValueError, match="seed"):
        net.apply_stack(params, x, training=True)


def test_check_inputs_rejects_bad_shapes_and_labels():
    net = Network.from_keras(_mlp())
    with pytest.raises(ValueError, match=r"x has shape \(3, 5\)"):
        net.check_inputs(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="x has shape"):
        net.check_inputs(np.zeros((6,)))
    with pytest.raises(ValueError, match="label 4 outside"):
        net.check_inputs(np.zeros((2, 6)), [0, 4])
    with pytest.raises(ValueError, match="label -1 outside"):
        net.check_inputs(np.zeros((2, 6)), [0, -1])
    with pytest.raises(TypeError, match="integer class labels"):
        net.check_inputs(np.zeros((2, 6)), [0.5, 1.0])
    with pytest.raises(ValueError, match="2 labels but x has 3"):
        net.check_inputs(np.zeros((3, 6)), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        net.check_inputs(np.full((1, 6), np.nan))
    with pytest.raises(ValueError, match="params has 1 tensors"):
        net.check_params([np.zeros((6, 7))], stacked=False)


def test_config_round_trip_and_flop_count():
    model = _cnn()
    net = Network.from_keras(model)
    again = Network.from_config(net.get_config())
    params = net.init_params(2, num_samples=2)
    x = np.random.default_rng(5).uniform(size=(2, 12, 12, 2)).astype(np.float32)
    np.testing.assert_allclose(net.apply_stack(params, x).numpy(),
                               again.apply_stack(params, x).numpy(), rtol=1e-6)
    # conv1: 12x12x3 outputs of a 3x3x2 kernel; pool to 6x6x3; conv2 (3x2
    # kernel, strides 1x2, valid): 4x3x4 outputs of 3x2x3; avg-pool (same) to
    # 2x2x4 = 16; dense 16x5 and 5x3.  2 FLOPs per multiply-add.
    expected = 2 * (12 * 12 * 3 * 9 * 2 + 4 * 3 * 4 * 6 * 3 + 16 * 5 + 5 * 3)
    assert net.flops_per_example() == expected


def _softmax_np(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("tail", ["dropout", "reshape", "flatten", "linear",
                                  "linear_dropout"])
@pytest.mark.parametrize("output", ["dense_softmax", "activation_softmax",
                                    "activation_log_softmax"])
def test_output_softmax_before_identity_layers_is_stripped(output, tail):
    # The Keras model's own output is the reference: its probabilities (or
    # exp of its log-probabilities) must equal the softmax of our logits.
    head = {"dense_softmax": [L.Dense(3, activation="softmax", name="out")],
            "activation_softmax": [L.Dense(3), L.Activation("softmax", name="out")],
            "activation_log_softmax": [
                L.Dense(3), L.Activation("log_softmax", name="out")]}[output]
    tails = {"dropout": [L.Dropout(0.4)], "reshape": [L.Reshape((3,))],
             "flatten": [L.Flatten()], "linear": [L.Activation("linear")],
             "linear_dropout": [L.Activation("linear"), L.Dropout(0.2)]}[tail]
    model = keras.Sequential([keras.Input((4,)), L.Dense(6, activation="tanh")]
                             + head + tails)
    net = Network.from_keras(model)
    assert net.stripped_output_activation == output.split("_", 1)[1]
    assert net.stripped_output_layer == "out"
    params = net.init_params(seed=4, num_samples=2)
    x = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    probs = tf.nn.softmax(net.apply_stack(params, x)).numpy()
    for s in range(2):
        ref = _keras_logits(model, params, x, s)
        if output.endswith("log_softmax"):
            ref = np.exp(ref)
        np.testing.assert_allclose(probs[s], ref, rtol=1e-5, atol=1e-6)


def test_output_softmax_of_a_conv_is_stripped_through_flatten():
    model = keras.Sequential([keras.Input((4, 4, 1)),
                              L.Conv2D(3, 4, activation="softmax", name="out"),
                              L.Flatten()])
    net = Network.from_keras(model)
    assert net.stripped_output_layer == "out"
    params = net.init_params(seed=1, num_samples=2)
    x = np.random.default_rng(4).uniform(size=(3, 4, 4, 1)).astype(np.float32)
    probs = tf.nn.softmax(net.apply_stack(params, x)).numpy()
    for s in range(2):
        np.testing.assert_allclose(probs[s], _keras_logits(model, params, x, s),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail, culprit", [
    ([L.ReLU(name="culprit")], "culprit"),
    ([L.Dropout(0.1), L.Activation("tanh", name="culprit")], "culprit"),
    ([L.Activation("exponential", name="culprit")], "culprit"),
])
def test_softmax_followed_by_a_value_changing_layer_is_refused(tail, culprit):
    model = keras.Sequential([keras.Input((4,)),
                              L.Dense(3, activation="softmax", name="sm")] + tail)
    with pytest.raises(ValueError, match=f"'sm'.*softmax.*'{culprit}'"):
        Network.from_keras(model)


def test_softmax_over_a_non_class_axis_is_refused():
    # Softmax over rows of 3, then flattened into 6 "classes".
    model = keras.Sequential([keras.Input((2, 3)),
                              L.Dense(3, activation="softmax", name="rows"),
                              L.Flatten()])
    with pytest.raises(ValueError, match="'rows'.*axis of size 3"):
        Network.from_keras(model)


def test_hidden_softmax_feeding_a_dense_layer_stays():
    model = keras.Sequential([keras.Input((4,)), L.Dense(5, activation="softmax"),
                              L.Dropout(0.1), L.Dense(3)])
    net = Network.from_keras(model)
    assert net.stripped_output_activation is None
    assert net.stripped_output_layer is None


@pytest.mark.parametrize("make", [
    lambda: np.ones((2, 6), np.complex64) + 1j,
    lambda: np.ones((2, 6), np.complex128),
    lambda: tf.complex(tf.ones((2, 6)), tf.ones((2, 6))),
])
def test_complex_inputs_are_refused(make):
    net = Network.from_keras(_mlp())
    with pytest.raises(TypeError, match=r"inputs_z must be real-valued, got dtype complex"):
        net.check_inputs(make(), x_name="inputs_z")


@pytest.mark.parametrize("make", [
    lambda: np.full((2, 6), 1e300),
    lambda: tf.fill((2, 6), tf.constant(-1e300, tf.float64)),
])
def test_inputs_beyond_float32_are_refused(make):
    net = Network.from_keras(_mlp())
    with pytest.raises(ValueError, match="x has values beyond the float32 range"):
        net.check_inputs(make())


@pytest.mark.parametrize("labels, error, shown", [
    ([0.0, np.inf], ValueError, "label inf;"),
    ([-np.inf, 1.0], ValueError, "label -inf;"),
    ([np.nan, 1.0], ValueError, "label nan;"),
    ([0.0, 1e20], ValueError, r"label 1e\+20 outside \[0, 4\)"),
    ([-1.0, 1.0], ValueError, r"label -1 outside \[0, 4\)"),
    ([4.0, 1.0], ValueError, r"label 4 outside \[0, 4\)"),
    ([1.0, 2.5], TypeError, "with label 2.5"),
    (np.array([0, 2**40], np.int64), ValueError, "label 1099511627776 outside"),
])
def test_float_labels_are_range_checked_before_the_int_cast(labels, error, shown):
    net = Network.from_keras(_mlp())
    with pytest.raises(error, match=f"labels_q has {shown}" if error is ValueError
                       else shown):
        net.check_inputs(np.zeros((2, 6)), np.asarray(labels), y_name="labels_q")
    _, y = net.check_inputs(np.zeros((2, 6)), np.array([3.0, 0.0]))
    np.testing.assert_array_equal(y.numpy(), [3, 0])


def test_ops_record_each_layer_with_its_kind():
    inner = keras.Sequential([keras.Input((6,)), L.Dense(4, use_bias=False),
                              L.LeakyReLU(0.2)], name="inner")
    inp = keras.Input((4, 4, 1))
    h = L.Conv2D(2, 2, activation="relu")(inp)
    h = L.MaxPooling2D(1)(h)
    h = L.AveragePooling2D(1)(h)
    h = L.Reshape((3, 3, 2))(h)
    h = L.Flatten()(h)
    h = L.Dense(6)(h)
    h = L.ReLU(max_value=2.0)(h)
    h = L.Dropout(0.1)(h)
    h = inner(h)
    h = L.Activation("tanh")(h)
    h = L.Dense(3)(h)
    out = L.Activation("softmax", name="probs")(h)
    model = keras.Model(inp, out)
    net = Network.from_keras(model)
    kinds = ["conv2d", "max_pool2d", "avg_pool2d", "reshape", "flatten",
             "dense", "relu", "dropout", "dense", "leaky_relu", "activation",
             "dense"]
    assert [op.kind for op in net.ops] == kinds
    assert set(kinds) | {"batch_norm", "global_avg_pool2d", "global_max_pool2d",
                         "rescaling", "add"} == set(network_lib.OP_KINDS)
    # Each op holds the Keras layer it came from, in execution order; the
    # stripped output Activation has no op.
    keras_layers = [l for l in model.layers[1:] if l is not inner]
    keras_layers[8:8] = inner.layers
    assert [op.layer for op in net.ops] == keras_layers[:-1]
    assert [op.name for op in net.ops] == [l.name for l in keras_layers[:-1]]
    assert net.stripped_output_layer == "probs"
    assert sum(op.num_tensors for op in net.ops) == len(net.param_specs) == 7
    assert [op.out_shape for op in net.ops][:5] == [(3, 3, 2)] * 4 + [(18,)]


@pytest.mark.parametrize("cls", ["GlorotUniform", "GlorotNormal", "HeUniform",
                                 "HeNormal", "LecunUniform", "LecunNormal"])
@pytest.mark.parametrize("shape", [(5,), (3, 4), (3, 2, 2, 4)])
def test_stateless_initialisers_equal_keras_at_its_int_seed(cls, shape):
    # Keras draws with the stateless seed [seed, 0]; the copy takes any pair.
    for seed in (0, 3):
        expected = getattr(keras.initializers, cls)(seed=seed)(shape).numpy()
        got = network_lib._stateless_init(  # pylint: disable=protected-access
            {"class_name": cls, "config": {}}, shape, tf.constant([seed, 0]))
        np.testing.assert_array_equal(got.numpy(), expected)


def test_shared_checks_keep_their_network_names():
    assert network_lib.check_positive_int is validate.positive_int
    assert network_lib.check_positive_float is validate.positive_real
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        Network.from_keras(_mlp()).init_params(0, num_samples=0)
