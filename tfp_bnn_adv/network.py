"""Keras models as pure, sample-vectorised functions of their weights.

A :class:`Network` is imported once from a Keras 3 ``Sequential`` or functional
model.  From then on it is a pure function ``apply(params, x) -> logits`` where
``params`` is a list of tensors in the order of ``model.trainable_weights``.
The same graph also evaluates a whole stack of weight sets: with every
parameter carrying a leading posterior-sample axis ``S``, ``apply_stack``
returns logits of shape ``[S, B, C]`` in one op graph, with no Python loop over
samples, and compiles under ``tf.function(jit_compile=True)``.

How the sample axis is vectorised:

* A Dense layer on a per-sample input is a batched matmul.  On an input
  shared by all samples (the first layer) it is one of two ops that differ
  by float rounding only, chosen by a fixed rule of the shapes and the
  compile path (:func:`_shared_dense_is_batched`), never by a timing: one
  big matmul with ``S`` folded into the output features (which transposes
  the kernel stack and the output every call), or a batched matmul of the
  input broadcast over ``S`` (no transposes, but its input gradient sums an
  ``[S, N, in]`` product).
* Conv2D layers keep activations in a *grouped* layout ``[B, H, W, S*C]``: the
  first convolution (shared input) is a single convolution with ``S*O``
  filters, every later one a grouped convolution with ``S`` groups.  Where
  TF's CPU kernels have no grouped-convolution gradient
  (:func:`_grouped_conv_as_a_loop`), a network whose convolutions see
  per-sample inputs instead runs one sample at a time by ``tf.map_fn``
  (``Network._map_samples``), and any other such convolution is ``S``
  ordinary convolutions concatenated.
  Pooling and element-wise activations act on that layout directly, so samples
  never need a per-sample loop (``tf.vectorized_map`` would fall back to a
  ``while_loop`` here, which XLA rejects).

A final softmax (or log-softmax) is stripped at import, also when only
identity or shape-preserving layers (Dropout, Flatten, Reshape, a linear
Activation) follow it: ``apply`` returns logits, so losses never apply softmax
twice.  A log-softmax is stripped too, since ``log_softmax(z)`` is itself a
logit vector with the same softmax as ``z``.  A softmax that reaches the
output through any other layer cannot be undone and is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Callable, Sequence
import warnings

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tfp_bnn_adv import seeds as seeds_lib
from tfp_bnn_adv import keras_graph
from tfp_bnn_adv import network_generic
from tfp_bnn_adv import validate
from tfp_bnn_adv import xla

__all__ = ["Network", "FAST_PATH_LAYERS", "OP_KINDS", "NETWORK_PATHS",
           "UNSCALED_LIMIT",
           "UnscaledInputWarning", "check_positive_int", "check_positive_float",
           "check_labels"]

# Layers the fast path writes out itself; a model with any other layer takes
# the generic path (Keras' own stateless_call), never a refusal.
FAST_PATH_LAYERS = (
    "InputLayer", "Dense", "Conv2D", "MaxPooling2D", "AveragePooling2D",
    "Flatten", "Reshape", "Activation", "ReLU", "LeakyReLU", "Dropout",
    "BatchNormalization", "GlobalAveragePooling2D", "GlobalMaxPooling2D",
    "Rescaling", "Add",
)
# What an op of :attr:`Network.ops` computes (its ``kind``), in the order of
# the layers above it comes from.
OP_KINDS = (
    "dense", "conv2d", "max_pool2d", "avg_pool2d", "flatten", "reshape",
    "activation", "relu", "leaky_relu", "dropout", "batch_norm",
    "global_avg_pool2d", "global_max_pool2d", "rescaling", "add",
)
# How from_keras may import a model.
NETWORK_PATHS = ("auto", "fast", "generic")

# Activation functions by their Keras 3 serialised name, Keras' own (on the
# TensorFlow backend each is the tf.nn / tf.math op).  All act element-wise
# except softmax/log_softmax, which act on the last (feature) axis.
_ELEMENTWISE = {name: keras.activations.get(name) for name in (
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "tanh",
    "sigmoid", "hard_sigmoid", "softplus", "softsign", "silu", "swish",
    "exponential", "mish")}
_FEATURE_WISE = {name: keras.activations.get(name)
                 for name in ("softmax", "log_softmax")}
# Output activations that map logits to (log-)probabilities: dropping them
# leaves logits that give the same softmax.
_STRIPPABLE_OUTPUT = ("softmax", "log_softmax")


# --------------------------------------------------------------------------
# Activations carried between ops.
#
# Three layouts, chosen so that no op ever needs a loop over samples:
#   "shared":  [B, ...]           the same input for every sample (before the
#                                 first parametrised layer);
#   "stacked": [S, B, ...]        one activation per sample;
#   "grouped": [B, H, W, S * C]   4-D feature maps with samples folded into
#                                 channel groups (what grouped conv wants).
# --------------------------------------------------------------------------
@dataclasses.dataclass
class _Act:
    value: tf.Tensor
    layout: str
    num_samples: int
    channels: int = 0  # per-sample channels C in the grouped layout


def _to_stacked(a: _Act) -> tf.Tensor:
    if a.layout == "stacked":
        return a.value
    if a.layout == "shared":
        shape = tf.concat([[a.num_samples], tf.shape(a.value)], axis=0)
        return tf.broadcast_to(a.value[None], shape)
    b, h, w = tf.unstack(tf.shape(a.value)[:3])
    v = tf.reshape(a.value, [b, h, w, a.num_samples, a.channels])
    return tf.transpose(v, [3, 0, 1, 2, 4])


def _to_grouped(a: _Act) -> tf.Tensor:
    if a.layout == "grouped":
        return a.value
    v = _to_stacked(a)
    shape = tf.shape(v)
    v = tf.transpose(v, [1, 2, 3, 0, 4])
    return tf.reshape(v, [shape[1], shape[2], shape[3], shape[0] * shape[4]])


def _merge_leading(v: tf.Tensor, n: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Folds the first ``n`` axes of ``v`` into one; returns it and their shape."""
    shape = tf.shape(v)
    lead = shape[:n]
    return tf.reshape(v, tf.concat([[-1], shape[n:]], axis=0)), lead


def _split_leading(v: tf.Tensor, lead: tf.Tensor) -> tf.Tensor:
    return tf.reshape(v, tf.concat([lead, tf.shape(v)[1:]], axis=0))


# --------------------------------------------------------------------------
# Ops: one per supported Keras layer, each a pure function of its params.
# --------------------------------------------------------------------------
class _Op:
    """One Keras layer as a pure function of ``num_tensors`` parameter tensors.

    The record of the import walk: :class:`Network` applies it, and other
    backends (the VI layers) are built from it, so the Keras model is walked
    and its layer classes dispatched on once, in :func:`_op_from_layer`.

    Attributes:
      kind: what the op computes, one of ``OP_KINDS``.
      layer: the Keras layer it was imported from.
      name: the layer's name.
      in_shape, out_shape: shapes of one example, without the batch axis.
    """

    kind = ""
    num_tensors = 0
    num_inputs = 1  # values the op reads (several for merges such as Add)
    flops_per_example = 0  # multiply-adds x 2 of one forward pass, one sample

    def __init__(self, layer, in_shape: tuple, out_shape: tuple):
        self.layer = layer
        self.name = layer.name
        self.in_shape = in_shape
        self.out_shape = out_shape

    def __call__(self, a: _Act, params: Sequence[tf.Tensor], training: bool,
                 seed) -> _Act:
        raise NotImplementedError


def _activation_fn(name: str, layer_name: str, class_name: str) -> Callable:
    if name in _ELEMENTWISE:
        return _ELEMENTWISE[name]
    if name in _FEATURE_WISE:
        return _FEATURE_WISE[name]
    raise _NotFast(
        f"layer {layer_name!r} ({class_name}) uses activation {name!r}, which "
        "the fast path does not cover")


def _apply_activation(a: _Act, name: str) -> _Act:
    if name == "linear":
        return a
    if name in _ELEMENTWISE:
        return dataclasses.replace(a, value=_ELEMENTWISE[name](a.value))
    # Feature-wise ops need the feature axis last and per sample.
    v = _FEATURE_WISE[name](_to_stacked(a) if a.layout == "grouped" else a.value)
    layout = "stacked" if a.layout == "grouped" else a.layout
    return dataclasses.replace(a, value=v, layout=layout)


def _shared_dense_is_batched(n, features: int, units: int,
                             num_samples: int) -> bool:
    """Which op a Dense layer runs on an input shared by all samples.

    ``True``: a batched matmul of the input broadcast over the samples;
    ``False``: one matmul with the samples folded into the output features.
    Per sample, the fold costs a transpose of the kernel (``features x
    units``) and two of the output (``n x units``, forward and backward),
    the batched matmul an ``n x features`` product in the input gradient.
    The batched matmul is taken on TF's kernels when that product is at
    most half the transposes (``2 n features <= units (features + 2 n)``),
    never under XLA, whose batched matmul over a broadcast input measured
    slower, not for one sample (whose transposes move no data: one HMC chain
    of a 2-128-2 MLP ran 1912 leapfrog steps/s folded, 1549 batched), and
    not when ``n`` (the examples, ``N``) or the number of samples is
    unknown at trace time.  Measured on a 2-core Xeon (AVX-512), expected
    input gradient against the same work with shared weights (higher is
    faster), TF's kernels: 784-512-512-10 with S=100, N=128: fold 0.80,
    batched 0.91; N=500: 0.96 / 1.04; 2-512-2 with S=1000, N=500: 0.75 /
    1.05; 784-100-10 with S=100, N=128: 1.67 / 1.22; 784-16-10 with S=500,
    N=500: 5.8 / 1.6 (the last two take the fold); under XLA,
    784-512-512-10: 0.68 / 0.51.  Under XLA on a 2-core Zen 5, the fold's
    time over the batched matmul's (input broadcast to ``[S, N, in]``),
    with AVX-512 / held to AVX2: 784-512-512-10, S=100, N=128: 0.75 / 0.98;
    N=500: 0.89 / 0.89; 784-100-10: 0.30 / 0.45; 784-16-10, S=500, N=500:
    0.18 / 0.18; 2-512-10, S=1000, N=500: 1.24 / 1.08 (the one shape where
    the batched matmul is faster, by less than the rule would gain).
    """
    if n is None or num_samples in (None, 1) or xla.in_xla_context():
        return False
    return 2 * n * features <= units * (features + 2 * n)


def _grouped_conv_as_a_loop() -> bool:
    """Whether a convolution on a per-sample input avoids one grouped
    convolution: the network then runs one sample at a time
    (``Network._map_samples``), or, where that does not apply (dropout in
    training mode), as ``S`` ordinary convolutions concatenated.

    Where TF's CPU kernels are Eigen's (:func:`tfp_bnn_adv.xla.
    tf_kernels_are_onednn` false: a Zen 3, or ``TF_ENABLE_ONEDNN_OPTS=0``),
    they have no grouped-convolution gradient, and XLA's grouped
    convolutions are slow on CPU: measured on a 2-core Xeon with oneDNN off,
    the CNN's expected gradient took 0.64 s as one grouped convolution
    under XLA and 0.22 s as a loop over samples (the generic path).  The
    forms differ by float rounding only; the choice is a fixed rule of the
    platform and the compile path, never a timing.
    """
    return not (xla.in_xla_context() or xla.has_accelerator()
                or xla.tf_kernels_are_onednn())


class _Dense(_Op):

    kind = "dense"

    def __init__(self, layer, in_shape, out_shape, units, use_bias, activation):
        super().__init__(layer, in_shape, out_shape)
        self.units = units
        self.use_bias = use_bias
        self.activation = activation
        self.num_tensors = 2 if use_bias else 1
        self.flops_per_example = 2 * int(np.prod(in_shape)) * units

    def __call__(self, a, params, training, seed):
        kernel = params[0]  # [S, in, out]
        s = a.num_samples
        if a.layout == "shared":
            v, lead = _merge_leading(a.value, a.value.shape.rank - 1)
            n = math.prod(a.value.shape[:-1]) if (
                a.value.shape[:-1].is_fully_defined()) else None
            if _shared_dense_is_batched(n, kernel.shape[1], self.units,
                                        kernel.shape[0]):
                out = tf.matmul(v[None], kernel)  # [S, N, units]
                out = tf.reshape(out, tf.concat([[s], lead, [self.units]], 0))
                return self._finish(out, params, s)
            # One matmul with the samples folded into the output features.
            w = tf.reshape(tf.transpose(kernel, [1, 0, 2]), [kernel.shape[1], -1])
            out = tf.matmul(v, w)  # [N, S * units]
            out = tf.reshape(out, [-1, s, self.units])
            out = tf.transpose(out, [1, 0, 2])
            out = tf.reshape(out, tf.concat([[s], lead, [self.units]], axis=0))
        else:
            v = _to_stacked(a)
            lead = tf.shape(v)[:-1]
            v = tf.reshape(v, [s, -1, v.shape[-1]])
            out = tf.matmul(v, kernel)
            out = tf.reshape(out, tf.concat([lead, [self.units]], axis=0))
        return self._finish(out, params, s)

    def _finish(self, out, params, s):
        """The bias and the activation of ``out`` ``[S, ..., units]``."""
        if self.use_bias:
            bias = params[1]  # [S, out]
            extra = out.shape.rank - 2
            out = out + tf.reshape(bias, [s] + [1] * extra + [self.units])
        return _apply_activation(_Act(out, "stacked", s), self.activation)


class _Conv2D(_Op):

    kind = "conv2d"

    def __init__(self, layer, in_shape, out_shape, filters, kernel_size, strides,
                 padding, dilation_rate, use_bias, activation):
        super().__init__(layer, in_shape, out_shape)
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding.upper()
        self.dilation_rate = dilation_rate
        self.use_bias = use_bias
        self.activation = activation
        self.num_tensors = 2 if use_bias else 1
        self.flops_per_example = (2 * out_shape[0] * out_shape[1] * filters *
                                  kernel_size[0] * kernel_size[1] * in_shape[2])

    def __call__(self, a, params, training, seed):
        kernel = params[0]  # [S, kh, kw, C, O]
        s = a.num_samples
        kh, kw, c, o = kernel.shape[1:]
        # Filters of all samples side by side: [kh, kw, C, S * O].  On a shared
        # input this is one ordinary convolution; on a grouped input TF treats
        # it as a grouped convolution with S groups.
        v = a.value if a.layout == "shared" else _to_grouped(a)
        if a.layout != "shared" and s > 1 and _grouped_conv_as_a_loop():
            # One ordinary convolution per sample, concatenated in the
            # grouped layout (sample i's outputs at channels i*O..(i+1)*O).
            out = tf.concat([
                tf.nn.conv2d(part, kernel[i], strides=self.strides,
                             padding=self.padding,
                             dilations=self.dilation_rate)
                for i, part in enumerate(tf.split(v, s, axis=-1))], axis=-1)
        else:
            filt = tf.reshape(tf.transpose(kernel, [1, 2, 3, 0, 4]),
                              [kh, kw, c, s * o])
            out = tf.nn.conv2d(v, filt, strides=self.strides,
                               padding=self.padding,
                               dilations=self.dilation_rate)
        if self.use_bias:
            out = out + tf.reshape(params[1], [s * o])
        return _apply_activation(_Act(out, "grouped", s, o), self.activation)


class _Pool2D(_Op):

    def __init__(self, layer, in_shape, out_shape, kind, pool_size, strides,
                 padding):
        super().__init__(layer, in_shape, out_shape)
        self.kind = kind
        self.fn = tf.nn.max_pool2d if kind == "max_pool2d" else tf.nn.avg_pool2d
        self.pool_size = pool_size
        self.strides = strides
        self.padding = padding.upper()

    def _pool(self, v):
        return self.fn(v, self.pool_size, self.strides, self.padding)

    def __call__(self, a, params, training, seed):
        if a.layout in ("shared", "grouped"):  # pooling is per channel
            return dataclasses.replace(a, value=self._pool(a.value))
        v, lead = _merge_leading(a.value, 2)
        return dataclasses.replace(a, value=_split_leading(self._pool(v), lead))


class _Reshape(_Op):
    """Flatten and Reshape: per-example reshape to ``out_shape``."""

    def __init__(self, layer, in_shape, out_shape, kind):
        super().__init__(layer, in_shape, out_shape)
        self.kind = kind

    def __call__(self, a, params, training, seed):
        if a.layout == "shared":
            return dataclasses.replace(
                a, value=tf.reshape(a.value, (-1,) + self.out_shape))
        v = _to_stacked(a)
        return _Act(tf.reshape(v, (a.num_samples, -1) + self.out_shape),
                    "stacked", a.num_samples)


class _Activation(_Op):

    kind = "activation"

    def __init__(self, layer, in_shape, out_shape, activation):
        super().__init__(layer, in_shape, out_shape)
        self.activation = activation

    def __call__(self, a, params, training, seed):
        return _apply_activation(a, self.activation)


class _ReLU(_Op):
    """Keras' general ReLU: threshold, negative slope and max value."""

    def __init__(self, layer, in_shape, out_shape, kind, negative_slope,
                 threshold, max_value):
        super().__init__(layer, in_shape, out_shape)
        self.kind = kind
        self.negative_slope = float(negative_slope)
        self.threshold = float(threshold)
        self.max_value = None if max_value is None else float(max_value)

    def __call__(self, a, params, training, seed):
        # Not keras.activations.relu: for a plain leaky slope or max_value=6
        # it calls tf.nn.leaky_relu / relu6, whose gradients at the kink
        # (alpha at 0; 1 at 6 on TF's kernels) differ from this formula's.
        h = a.value
        out = tf.where(h > self.threshold, h, tf.zeros_like(h))
        if self.max_value is not None:
            out = tf.clip_by_value(out, 0.0, self.max_value)
        if self.negative_slope:
            out = out - self.negative_slope * tf.nn.relu(self.threshold - h)
        return dataclasses.replace(a, value=out)


class _Dropout(_Op):
    """Identity at prediction; stateless inverted dropout when training."""

    kind = "dropout"

    def __init__(self, layer, in_shape, out_shape, rate):
        super().__init__(layer, in_shape, out_shape)
        self.rate = float(rate)

    def __call__(self, a, params, training, seed):
        if not training or self.rate == 0.0:
            return a
        return dataclasses.replace(a, value=tf.nn.experimental.stateless_dropout(
            a.value, rate=self.rate, seed=seed))


class _BatchNorm(_Op):
    """BatchNormalization in inference: a per-channel affine map.

    The moving statistics are constants of the imported model (the same for
    every sample, never updated); ``gamma`` and ``beta``, where the layer has
    them, are parameters like any other.  Computed as
    ``tf.nn.batch_normalization`` does, which Keras uses.
    """

    kind = "batch_norm"

    def __init__(self, layer, in_shape, out_shape, mean, variance, epsilon,
                 scale, center):
        super().__init__(layer, in_shape, out_shape)
        self.mean = tf.constant(mean, tf.float32)
        self.variance = tf.constant(variance, tf.float32)
        self.epsilon = float(epsilon)
        self.scale = bool(scale)
        self.center = bool(center)
        self.num_tensors = int(scale) + int(center)

    def __call__(self, a, params, training, seed):
        s = a.num_samples
        c = self.in_shape[-1]
        inv = tf.math.rsqrt(self.variance + self.epsilon)  # [C]
        gamma = params[0] if self.scale else None  # [S, C]
        beta = params[int(self.scale)] if self.center else None
        gamma = tf.ones([s, c]) if gamma is None else gamma
        beta = tf.zeros([s, c]) if beta is None else beta
        mul = inv * gamma  # [S, C]
        add = beta - self.mean * mul
        if a.layout == "grouped":
            return dataclasses.replace(a, value=a.value * tf.reshape(mul, [-1])
                                       + tf.reshape(add, [-1]))
        v = a.value[None] if a.layout == "shared" else a.value
        shape = [s] + [1] * (v.shape.rank - 2) + [c]
        out = v * tf.reshape(mul, shape) + tf.reshape(add, shape)
        return _Act(out, "stacked", s)


class _GlobalPool2D(_Op):
    """GlobalAveragePooling2D / GlobalMaxPooling2D over the spatial axes."""

    def __init__(self, layer, in_shape, out_shape, kind, keepdims):
        super().__init__(layer, in_shape, out_shape)
        self.kind = kind
        self.keepdims = bool(keepdims)
        self.fn = tf.reduce_mean if kind == "global_avg_pool2d" else tf.reduce_max

    def __call__(self, a, params, training, seed):
        if a.layout == "stacked":
            return dataclasses.replace(
                a, value=self.fn(a.value, axis=[2, 3], keepdims=self.keepdims))
        out = self.fn(a.value, axis=[1, 2], keepdims=self.keepdims)
        if a.layout == "shared" or self.keepdims:
            return dataclasses.replace(a, value=out)
        # [B, S*C] -> [S, B, C]
        out = tf.reshape(out, [-1, a.num_samples, a.channels])
        return _Act(tf.transpose(out, [1, 0, 2]), "stacked", a.num_samples)


class _Rescaling(_Op):
    """Rescaling: ``x * scale + offset`` (scalars or per-feature arrays)."""

    kind = "rescaling"

    def __init__(self, layer, in_shape, out_shape, scale, offset):
        super().__init__(layer, in_shape, out_shape)
        self.scale = np.asarray(scale, np.float32)
        self.offset = np.asarray(offset, np.float32)

    def __call__(self, a, params, training, seed):
        if a.layout == "grouped" and (self.scale.ndim or self.offset.ndim):
            a = _Act(_to_stacked(a), "stacked", a.num_samples)
        return dataclasses.replace(a, value=a.value * self.scale + self.offset)


class _Add(_Op):
    """Add: the element-wise sum of two or more branches (a residual)."""

    kind = "add"
    num_inputs = 2

    def __call__(self, acts, params, training, seed):
        layouts = {a.layout for a in acts}
        if layouts == {"shared"}:
            return _Act(tf.add_n([a.value for a in acts]), "shared",
                        acts[0].num_samples)
        if "grouped" in layouts and layouts <= {"grouped", "shared"} and len(
                self.out_shape) == 3:
            first = next(a for a in acts if a.layout == "grouped")
            vals = [_to_grouped(dataclasses.replace(a, channels=first.channels))
                    for a in acts]
            return _Act(tf.add_n(vals), "grouped", first.num_samples,
                        first.channels)
        return _Act(tf.add_n([_to_stacked(a) for a in acts]), "stacked",
                    acts[0].num_samples)


# --------------------------------------------------------------------------
# Import from Keras.
# --------------------------------------------------------------------------
def _shape_tuple(shape) -> tuple:
    return tuple(int(d) for d in shape[1:])


def _serialized_activation(fn) -> str:
    """The Keras name of a built-in activation, else the function's name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns when it meets a lambda
        name = keras.activations.serialize(fn)
    if not isinstance(name, str):
        name = getattr(fn, "__name__", type(fn).__name__)
    return name


def _check_channels_last(layer, cls):
    fmt = getattr(layer, "data_format", "channels_last")
    if fmt != "channels_last":
        raise _NotFast(f"layer {layer.name!r} ({cls}) uses data_format="
                       f"{fmt!r}; the fast path covers 'channels_last'")


def _op_from_layer(layer, in_shape: tuple, out_shape: tuple) -> _Op:
    """Builds the op for one Keras layer (not an input layer)."""
    cls = type(layer).__name__
    name = layer.name
    if cls == "Dense":
        act = _serialized_activation(layer.activation)
        _activation_fn(act, name, cls)
        return _Dense(layer, in_shape, out_shape, int(layer.units),
                      bool(layer.use_bias), act)
    if cls == "Conv2D":
        _check_channels_last(layer, cls)
        if int(layer.groups) != 1:
            raise _NotFast(f"layer {name!r} ({cls}) uses groups="
                           f"{layer.groups}; the fast path covers groups=1")
        act = _serialized_activation(layer.activation)
        _activation_fn(act, name, cls)
        return _Conv2D(layer, in_shape, out_shape, int(layer.filters),
                       tuple(layer.kernel_size), tuple(layer.strides),
                       layer.padding, tuple(layer.dilation_rate),
                       bool(layer.use_bias), act)
    if cls in ("MaxPooling2D", "AveragePooling2D"):
        _check_channels_last(layer, cls)
        strides = layer.strides if layer.strides is not None else layer.pool_size
        return _Pool2D(layer, in_shape, out_shape,
                       "max_pool2d" if cls == "MaxPooling2D" else "avg_pool2d",
                       tuple(layer.pool_size), tuple(strides), layer.padding)
    if cls == "Flatten":
        _check_channels_last(layer, cls)
        return _Reshape(layer, in_shape, out_shape, "flatten")
    if cls == "Reshape":
        return _Reshape(layer, in_shape, out_shape, "reshape")
    if cls == "Activation":
        act = _serialized_activation(layer.activation)
        _activation_fn(act, name, cls)
        return _Activation(layer, in_shape, out_shape, act)
    if cls == "ReLU":
        return _ReLU(layer, in_shape, out_shape, "relu", layer.negative_slope,
                     layer.threshold, layer.max_value)
    if cls == "LeakyReLU":
        return _ReLU(layer, in_shape, out_shape, "leaky_relu",
                     layer.negative_slope, 0.0, None)
    if cls == "Dropout":
        if getattr(layer, "noise_shape", None) is not None:
            raise _NotFast(f"layer {name!r} ({cls}) uses noise_shape; the "
                           "fast path covers plain Dropout")
        return _Dropout(layer, in_shape, out_shape, layer.rate)
    if cls == "BatchNormalization":
        rank = len(in_shape) + 1
        if int(layer.axis) % rank != rank - 1:
            raise _NotFast(f"layer {name!r} ({cls}) normalises axis "
                           f"{layer.axis}; the fast path covers the last axis")
        return _BatchNorm(layer, in_shape, out_shape,
                          layer.moving_mean.numpy(), layer.moving_variance.numpy(),
                          layer.epsilon, layer.scale, layer.center)
    if cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        _check_channels_last(layer, cls)
        return _GlobalPool2D(layer, in_shape, out_shape,
                             "global_avg_pool2d" if cls.startswith("GlobalAverage")
                             else "global_max_pool2d", layer.keepdims)
    if cls == "Rescaling":
        return _Rescaling(layer, in_shape, out_shape, layer.scale, layer.offset)
    if cls == "Add":
        return _Add(layer, in_shape, out_shape)
    raise _NotFast(f"layer {name!r} ({cls}) is not one of the fast path's "
                   "layers")


class _NotFast(Exception):
    """Why a model is not on the fast path (a layer or setting it lacks)."""


# Layers that can never be a pure function of float inputs with input
# gradients: they take token ids, strings or bins, or keep state in Python
# between calls.
_REFUSED_LAYERS = {
    "Embedding": "maps integer token ids to vectors",
    "StringLookup": "maps strings to integer ids",
    "IntegerLookup": "maps integers to integer ids",
    "TextVectorization": "maps strings to integer ids",
    "Hashing": "hashes its inputs to integer bins",
    "CategoryEncoding": "encodes integer categories",
    "Discretization": "maps values to integer bins",
}


def _io_shapes(model, input_shape) -> tuple[tuple, tuple, str]:
    """One example's input and output shapes and the input dtype.

    A functional or Sequential model has them symbolically; a subclassed
    model is asked for its output on the shape it was built for (or on
    ``input_shape``).
    """
    if not model.built:
        raise ValueError(
            f"model {model.name!r} is not built; give it an input shape, "
            "e.g. keras.Sequential([keras.Input((784,)), ...]).")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if inputs:
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"Model {model.name!r} has {len(inputs)} inputs and "
                f"{len(outputs)} outputs; tfp_bnn_adv needs exactly one "
                "of each.")
        return (_shape_tuple(inputs[0].shape), _shape_tuple(outputs[0].shape),
                keras.backend.standardize_dtype(inputs[0].dtype))
    if input_shape is None:
        built = list((getattr(model, "_build_shapes_dict", None) or {}).values())
        if len(built) != 1 or not isinstance(built[0], (tuple, list)):
            raise ValueError(
                f"model {model.name!r} ({type(model).__name__}) has no "
                "symbolic input; pass input_shape=(one example's shape).")
        input_shape = tuple(built[0])[1:]
    input_shape = validate.int_sequence(input_shape, "input_shape")
    spec = model.compute_output_spec(keras.KerasTensor((None,) + input_shape))
    if not hasattr(spec, "shape"):
        raise ValueError(f"model {model.name!r} returns {type(spec).__name__}; "
                         "tfp_bnn_adv needs a single output tensor.")
    return input_shape, _shape_tuple(spec.shape), "float32"


def _refuse_impure(model, dtype: str) -> None:
    """Raises naming a layer that cannot be a pure function of float inputs."""
    if not dtype.startswith(("float", "bfloat")):
        raise ValueError(
            f"model {model.name!r} takes inputs of dtype {dtype}; tfp_bnn_adv "
            "needs float inputs, since attacks take gradients with respect "
            "to them.")
    for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
        cls = type(layer).__name__
        if cls in _REFUSED_LAYERS:
            raise ValueError(
                f"Layer {layer.name!r} ({cls}) {_REFUSED_LAYERS[cls]}, so its "
                "output has no gradient with respect to the input; "
                "tfp_bnn_adv needs a model that is a differentiable function "
                "of float inputs (apply such preprocessing before the model).")
        if getattr(layer, "stateful", False):
            raise ValueError(
                f"Layer {layer.name!r} ({cls}) is stateful: it carries state "
                "from one call to the next, so it is not a pure function of "
                "its weights and input; rebuild it with stateful=False.")


def _activation_name(layer) -> str | None:
    """The activation a layer applies last, by its Keras name, if any."""
    cls = type(layer).__name__
    if cls == "Softmax":
        axis = layer.axis if isinstance(layer.axis, int) else tuple(layer.axis)
        return "softmax" if axis in (-1, (-1,)) else "softmax over axis " + str(axis)
    fn = getattr(layer, "activation", None)
    return _serialized_activation(fn) if callable(fn) else None


def _keeps_logits(layer) -> bool:
    """Whether ``layer`` passes its input through unchanged up to a reshape.

    Such layers may follow the output softmax: on logits they give the same
    predictive as on probabilities, so the softmax can be moved past them
    (Dropout is the identity at prediction).
    """
    cls = type(layer).__name__
    if cls in ("Dropout", "Flatten", "Reshape"):
        return True
    return cls == "Activation" and _activation_name(layer) == "linear"


def _output_softmax(graph: keras_graph.Graph, num_classes: int,
                    model_name: str):
    """Finds the output softmax/log-softmax to strip.

    Walks back from the output to the last layer with weights (or a merge).
    A softmax on the way is stripped when only :func:`_keeps_logits` layers
    follow it and it normalises over all ``num_classes`` outputs; any other
    softmax on the way is refused, since the model's output would then be
    neither logits nor probabilities.

    Returns:
      ``(activation, step)`` of what is stripped, or ``(None, None)``.  A
      step whose layer is an ``Activation`` or ``Softmax`` layer is dropped;
      any other has its activation replaced by the identity.
    """
    after = []
    value = graph.output
    while True:
        step = graph.producer(value)
        if step is None or len(step.inputs) != 1:
            return None, None
        act = _activation_name(step.layer)
        if act in _STRIPPABLE_OUTPUT:
            break
        if step.layer.weights:
            return None, None  # the output is already this layer's logits
        after.append(step)
        value = step.inputs[0]
    name, cls = step.layer.name, type(step.layer).__name__
    for later in reversed(after):
        if not _keeps_logits(later.layer):
            raise ValueError(
                f"Layer {name!r} ({cls}) of model {model_name!r} applies {act} "
                f"and is followed by layer {later.layer.name!r} "
                f"({type(later.layer).__name__}), which changes its values; "
                f"tfp_bnn_adv needs the model to end in logits or in a final "
                f"{act} followed only by Dropout, Flatten, Reshape or linear "
                "Activation layers.")
    out_shape = step.out_shapes[0]
    if int(np.prod(out_shape)) != num_classes or out_shape[-1] != num_classes:
        raise ValueError(
            f"Layer {name!r} ({cls}) of model {model_name!r} applies {act} "
            f"over an axis of size {out_shape[-1]} (output shape {out_shape}), "
            f"which later layers reshape into the {num_classes} classes, so it "
            "is not a softmax over the classes.")
    return act, step


def _fast_program(graph: keras_graph.Graph, var_index: dict, stripped_step
                  ) -> list[tuple]:
    """The fast path's program: ``(op, input ids, output id, param indices)``.

    ``op`` is None for a step that only passes its input on (a stripped
    output softmax layer).

    Raises:
      _NotFast: naming the first layer or setting the fast path lacks.
    """
    program = []
    seen = set()
    for step in graph.steps:
        layer = step.layer
        if id(layer) in seen:
            raise _NotFast(f"layer {layer.name!r} ({type(layer).__name__}) is "
                           "called more than once (shared weights)")
        seen.add(id(layer))
        if step is stripped_step and network_generic.drops_when_stripped(layer):
            program.append((None, step.inputs, step.outputs[0], ()))
            continue
        if len(step.outputs) != 1:
            raise _NotFast(f"layer {layer.name!r} ({type(layer).__name__}) "
                           "has several outputs")
        op = _op_from_layer(layer, step.in_shapes[0], step.out_shapes[0])
        if len(step.inputs) != op.num_inputs and not (
                op.num_inputs > 1 and len(step.inputs) > 1):
            raise _NotFast(f"layer {layer.name!r} ({type(layer).__name__}) is "
                           f"called on {len(step.inputs)} inputs")
        weights = layer.trainable_weights
        if len(weights) != op.num_tensors or len(layer.non_trainable_weights) != (
                2 if op.kind == "batch_norm" else 0):
            raise _NotFast(f"layer {layer.name!r} ({type(layer).__name__}) has "
                           "frozen (non-trainable) weights")
        if step is stripped_step:
            op.activation = "linear"
        program.append((op, step.inputs, step.outputs[0],
                        tuple(var_index[id(w)] for w in weights)))
    return program


def _flops_of_steps(graph: keras_graph.Graph) -> int:
    """Forward FLOPs of one example: 2 x multiply-adds of every kernel.

    A kernel of ``k`` entries producing an output of ``P`` positions (all
    axes but the last) costs ``2 k P``: exact for Dense, ConvND and
    depthwise convolutions, an estimate for other layers with kernels.
    """
    total = 0
    for step in graph.steps:
        out = step.out_shapes[0]
        positions = int(np.prod([d or 1 for d in out[:-1]])) if out else 1
        for w in step.layer.trainable_weights:
            if len(w.shape) >= 2:
                total += 2 * int(np.prod(w.shape)) * positions
    return total


# --------------------------------------------------------------------------
# Initialisers (stateless).
#
# Keras' initialisers use these formulas, but take an int seed and draw with
# the stateless seed [seed, 0]; init_params splits its seed into arbitrary
# pairs per tensor and sample, which no int seed reaches, so the draws are
# written out here.
# --------------------------------------------------------------------------
_VARIANCE_SCALING = {
    "GlorotUniform": (1.0, "fan_avg", "uniform"),
    "GlorotNormal": (1.0, "fan_avg", "truncated_normal"),
    "HeUniform": (2.0, "fan_in", "uniform"),
    "HeNormal": (2.0, "fan_in", "truncated_normal"),
    "LecunUniform": (1.0, "fan_in", "uniform"),
    "LecunNormal": (1.0, "fan_in", "truncated_normal"),
}


def _fans(shape: tuple) -> tuple[float, float]:
    if len(shape) < 2:
        return float(shape[0]), float(shape[0])
    receptive = float(np.prod(shape[:-2])) if len(shape) > 2 else 1.0
    return shape[-2] * receptive, shape[-1] * receptive


def _stateless_init(config: dict, shape: tuple, seed) -> tf.Tensor:
    """Samples Keras initialiser ``config`` statelessly; returns float32."""
    cls = config["class_name"]
    cfg = config.get("config", {}) or {}
    if cls in _VARIANCE_SCALING:
        scale, mode, dist = _VARIANCE_SCALING[cls]
    elif cls == "VarianceScaling":
        scale, mode, dist = (cfg.get("scale", 1.0), cfg.get("mode", "fan_in"),
                             cfg.get("distribution", "truncated_normal"))
    elif cls == "Zeros":
        return tf.zeros(shape, tf.float32)
    elif cls == "Ones":
        return tf.ones(shape, tf.float32)
    elif cls == "Constant":
        return tf.fill(shape, tf.constant(cfg.get("value", 0.0), tf.float32))
    elif cls == "RandomNormal":
        return tf.random.stateless_normal(shape, seed, cfg.get("mean", 0.0),
                                          cfg.get("stddev", 0.05))
    elif cls == "TruncatedNormal":
        return tf.random.stateless_truncated_normal(
            shape, seed, cfg.get("mean", 0.0), cfg.get("stddev", 0.05))
    elif cls == "RandomUniform":
        return tf.random.stateless_uniform(shape, seed, cfg.get("minval", -0.05),
                                           cfg.get("maxval", 0.05))
    else:
        raise ValueError(
            f"Initializer {cls!r} has no stateless equivalent in tfp_bnn_adv; "
            "use a Keras built-in initializer (Glorot/He/Lecun/VarianceScaling/"
            "Random*/Zeros/Ones/Constant).")
    fan_in, fan_out = _fans(shape)
    fan = {"fan_in": fan_in, "fan_out": fan_out,
           "fan_avg": (fan_in + fan_out) / 2.0}[mode]
    var = scale / max(1.0, fan)
    if dist == "uniform":
        limit = math.sqrt(3.0 * var)
        return tf.random.stateless_uniform(shape, seed, -limit, limit)
    if dist == "untruncated_normal":
        return tf.random.stateless_normal(shape, seed, 0.0, math.sqrt(var))
    # Keras' truncated normal: std corrected for the truncation at 2 sigma.
    std = math.sqrt(var) / 0.87962566103423978
    return tf.random.stateless_truncated_normal(shape, seed, 0.0, std)


_KNOWN_INITIALIZERS = tuple(_VARIANCE_SCALING) + (
    "VarianceScaling", "Zeros", "Ones", "Constant", "RandomNormal",
    "TruncatedNormal", "RandomUniform")
# Initialiser attributes of a layer, by the name of the variable they make,
# where the attribute is not simply "<name>_initializer".
_INITIALIZER_ATTRS = {
    "kernel": ("kernel_initializer", "depthwise_initializer"),
    "depthwise_kernel": ("depthwise_initializer",),
    "pointwise_kernel": ("pointwise_initializer",),
    "recurrent_kernel": ("recurrent_initializer",),
}


def _variable_owners(model) -> dict:
    """``id(variable) -> the layer that created it`` for every layer."""
    owners = {}
    for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
        for v in getattr(layer, "_trainable_variables", ()):
            owners.setdefault(id(v), layer)
    return owners


def _initializer_config(layer, variable) -> dict | None:
    """The serialised Keras initialiser ``variable`` was drawn from.

    None where the layer names none that :func:`_stateless_init` can draw
    (then :meth:`Network.init_params` starts from the model's own value).
    """
    if layer is None:
        return None
    names = _INITIALIZER_ATTRS.get(variable.name, ()) + (
        variable.name + "_initializer",)
    for attr in names:
        ini = getattr(layer, attr, None)
        if ini is None:
            continue
        config = keras.initializers.serialize(ini)
        if isinstance(config, dict) and config.get("class_name") in _KNOWN_INITIALIZERS:
            return config
        return None
    return None


# --------------------------------------------------------------------------
# The public class.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Name, shape and Keras initialiser config of one parameter tensor.

    ``initializer`` is None where the layer's initialiser has no stateless
    equivalent here; such a tensor starts from the Keras model's value.
    """
    name: str
    shape: tuple
    initializer: dict | None


class Network:
    """A Keras classifier as a pure function of its weights.

    Build one with :meth:`from_keras`.  Parameters are a list of float32
    tensors in the order of ``keras_model.trainable_weights``; the same list
    with a leading sample axis ``S`` on every tensor is a *stack*.

    Attributes:
      param_specs: one :class:`ParamSpec` per parameter tensor.
      input_shape: shape of one input example, without the batch axis.
      num_classes: number of logits ``C``.
      stripped_output_activation: the final softmax/log-softmax dropped at
        import (``None`` if the model already ended in logits).
      stripped_output_layer: the name of the Keras layer it was dropped from
        (not always the last layer: Dropout, Flatten, Reshape or a linear
        Activation may follow it), or ``None``.
      stripped_output_step: the :class:`~tfp_bnn_adv.keras_graph.Step` of
        :attr:`graph` it was stripped from (an ``Activation`` / ``Softmax``
        layer's step is skipped; any other layer runs with a linear
        activation), or ``None``.
      graph: the model's flattened layer graph
        (:func:`tfp_bnn_adv.keras_graph.walk`), or ``None`` for a
        subclassed model.
      path: ``"fast"`` or ``"generic"``, see :meth:`from_keras`.
      path_reason: why: the first layer (or setting) the fast path lacks,
        ``"every layer is one of the fast path's layers"``, or that the path
        was forced.
      state_specs: name and shape of each :attr:`state` array.
      keras_model: the Keras model it was built from (used for its config and
        by the SGD trainer; its trainable weights are never read by
        ``apply``; its non-trainable ones are snapshot at import).

    Example:
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8,
      ...     activation="relu"), keras.layers.Dense(2)])
      >>> net = Network.from_keras(model)
      >>> params = net.init_params(seed=0, num_samples=5)   # 5 weight sets
      >>> net.apply_stack(params, tf.zeros([3, 2])).shape
      TensorShape([5, 3, 2])
    """

    def __init__(self, keras_model, *, graph, program, generic,
                 param_specs: list[ParamSpec], input_shape: tuple,
                 num_classes: int, stripped_output_activation: str | None,
                 stripped_output_layer: str | None, stripped_output_step,
                 path: str, path_reason: str,
                 state_specs: list[ParamSpec], state_values: list[np.ndarray],
                 initial_values: dict, requested_path: str,
                 flops: int, activation_size: int):
        self.keras_model = keras_model
        self.graph = graph
        self._program = program
        self._ops = [entry[0] for entry in program or () if entry[0] is not None]
        self._generic = generic
        self.param_specs = tuple(param_specs)
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)
        self.stripped_output_activation = stripped_output_activation
        self.stripped_output_layer = stripped_output_layer
        self.stripped_output_step = stripped_output_step
        self.path = path
        self.path_reason = path_reason
        self.state_specs = tuple(state_specs)
        self._state_values = [np.asarray(v) for v in state_values]
        self._initial_values = initial_values
        self._requested_path = requested_path
        self._flops = int(flops)
        self._activation_size = int(activation_size)

    # ---------------------------------------------------------------- import
    @classmethod
    def from_keras(cls, model, *, path: str = "auto",
                   input_shape: Sequence[int] | None = None) -> "Network":
        """Imports a built Keras 3 model: ``Sequential``, functional or subclassed.

        Two paths compute the same function (up to rounding):

        * the **fast** path, for models made of ``FAST_PATH_LAYERS`` (chains
          or functional graphs with residual ``Add``, nested models
          expanded): every layer written out in a sample-vectorised layout
          (Dense and Conv2D truly vectorised over ``S``, see the module
          docstring);
        * the **generic** path, for any other model: Keras' own
          ``stateless_call`` of each layer (or of the whole model, where it
          has no static graph), vectorised over ``S`` by
          ``tf.vectorized_map`` where that lowers to XLA and otherwise a
          static-size loop (:mod:`tfp_bnn_adv.network_generic`).

        Which path a model took and why is :attr:`path` and
        :attr:`path_reason`, and one log line at import.

        Args:
          model: a built ``keras.Model`` with one float input and one output
            ``[B, C]``, ``C >= 2`` (logits, or a final softmax/log-softmax,
            which is stripped).
          path: ``"auto"`` (the fast path where it covers every layer),
            ``"fast"`` (refuse a model it does not cover, naming the layer)
            or ``"generic"``.
          input_shape: one example's shape, for a subclassed model that
            has no symbolic input (by default the shape it was first called
            on); ignored otherwise.

        Returns:
          A :class:`Network`.

        Raises:
          TypeError: if ``model`` is not a Keras 3 model.
          ValueError: if ``path`` is not one of ``NETWORK_PATHS``; if the
            model is not built, takes non-float inputs, or holds a layer
            that cannot be a pure differentiable function of float inputs
            (``Embedding``, lookups, hashing, a stateful RNN), naming the
            layer and its class; if a softmax reaches the output through a
            layer that changes values (anything but Dropout, Flatten,
            Reshape or a linear Activation); if its output is not
            ``[B, C]`` with ``C >= 2``; with ``path="fast"``, naming the
            first layer the fast path does not cover.
        """
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model (Keras 3), got "
                            f"{type(model).__module__}.{type(model).__name__}.")
        path = validate.choice(path, NETWORK_PATHS, "path")
        input_shape, out_shape, dtype = _io_shapes(model, input_shape)
        _refuse_impure(model, dtype)
        if len(out_shape) != 1 or out_shape[0] is None or out_shape[0] < 2:
            raise ValueError(
                f"model {model.name!r} must output [batch, num_classes] with "
                f"num_classes >= 2 (logits or softmax); its output shape is "
                f"(None, {', '.join(map(str, out_shape))}).")
        if any(d is None for d in input_shape):
            raise ValueError(f"model {model.name!r} has input shape (None, "
                             f"{', '.join(map(str, input_shape))}); tfp_bnn_adv "
                             "needs every axis but the batch axis fixed.")
        variables = list(model.trainable_variables)
        if not variables:
            raise ValueError(f"model {model.name!r} has no trainable weights, "
                             "so no weights to put a posterior on.")
        var_index = {id(v): i for i, v in enumerate(variables)}
        owners = _variable_owners(model)
        specs = [ParamSpec(v.path, tuple(int(d) for d in v.shape),
                           _initializer_config(owners.get(id(v)), v))
                 for v in variables]
        state_vars = network_generic.state_variables(model)
        state_specs = [ParamSpec(v.path, tuple(int(d) for d in v.shape), {})
                       for v in state_vars]
        state_values = [np.asarray(v.numpy()) for v in state_vars]

        graph, graph_reason = keras_graph.model_graph(model)
        stripped, stripped_step = None, None
        if graph is not None:
            stripped, stripped_step = _output_softmax(graph, out_shape[0],
                                                      model.name)
        program, reason = None, None
        if path != "generic":
            if graph is None:
                reason = graph_reason
            else:
                try:
                    program = _fast_program(graph, var_index, stripped_step)
                except _NotFast as e:
                    reason = str(e)
            if program is None and path == "fast":
                raise ValueError(f"model {model.name!r} is not on the fast "
                                 f"path: {reason}.")
        if program is not None:
            chosen = "fast"
            why = ("forced: path='fast'" if path == "fast" else
                   "every layer is one of the fast path's layers")
            generic = None
        else:
            chosen = "generic"
            why = "forced: path='generic'" if path == "generic" else reason
            generic = network_generic.GenericFunction(
                model, graph, stripped_step, var_index,
                {id(v): j for j, v in enumerate(state_vars)}, state_values)
            generic.check_traces([s.shape for s in specs], input_shape)
        if program is not None:  # the ops' own, exact figures
            ops = [entry[0] for entry in program if entry[0] is not None]
            flops = sum(op.flops_per_example for op in ops)
            act_size = sum(int(np.prod(op.out_shape)) for op in ops)
        elif graph is not None:
            flops = _flops_of_steps(graph)
            act_size = sum(int(np.prod([d or 1 for d in shape]))
                           for step in graph.steps for shape in step.out_shapes)
        else:  # no graph to read: the kernels' FLOPs at one position
            flops = sum(2 * int(np.prod(v.shape)) for v in variables
                        if len(v.shape) >= 2)
            act_size = 16 * int(np.prod(input_shape))
        logging.info("tfp_bnn_adv imported %r on the %s path (%s).", model.name,
                     chosen, why)
        return cls(model, graph=graph, program=program, generic=generic,
                   param_specs=specs, input_shape=input_shape,
                   num_classes=out_shape[0], stripped_output_activation=stripped,
                   stripped_output_layer=(None if stripped_step is None
                                          else stripped_step.layer.name),
                   stripped_output_step=stripped_step,
                   path=chosen, path_reason=why, state_specs=state_specs,
                   state_values=state_values,
                   initial_values={i: np.asarray(v.numpy())
                                   for i, (v, spec) in enumerate(zip(variables, specs))
                                   if spec.initializer is None},
                   requested_path=path, flops=flops, activation_size=act_size)

    # ------------------------------------------------------------- describing
    @property
    def param_shapes(self) -> tuple[tuple, ...]:
        """Shape of each parameter tensor (no sample axis)."""
        return tuple(s.shape for s in self.param_specs)

    @property
    def num_params(self) -> int:
        """Total number of scalar weights in one weight set."""
        return int(sum(np.prod(s) for s in self.param_shapes))

    @property
    def ops(self) -> tuple:
        """The fast path's op records in execution order, one per layer.

        Empty on the generic path.  Nested models are expanded; input
        layers, and an output ``Activation`` layer whose softmax was
        stripped, have no op.  Every op has ``kind`` (one of
        :data:`OP_KINDS`), ``layer`` (the Keras layer), ``name``,
        ``in_shape``, ``out_shape`` (one example), ``num_inputs`` and
        ``num_tensors`` (parameter tensors it consumes, in the layer's
        ``trainable_weights`` order), plus the settings it computes with:
        ``units`` / ``filters``, ``kernel_size``, ``strides``, ``padding``
        (upper case), ``dilation_rate``, ``use_bias``, ``pool_size``,
        ``rate``, ``negative_slope``, ``threshold``, ``max_value``,
        ``keepdims``, ``epsilon``, ``scale`` and ``activation`` (the Keras
        name of the activation applied; ``"linear"`` where the output
        softmax was stripped), as the kind has them.  Treat them as
        read-only.
        """
        return tuple(self._ops)

    @property
    def vectorization(self) -> str:
        """How the sample axis is evaluated on a shared input.

        ``"fast"`` on the fast path; on the generic path
        ``"vectorized_map"`` or ``"map_fn"`` (decided on first use, see
        :meth:`tfp_bnn_adv.network_generic.GenericFunction.mode`).
        """
        if self._generic is None:
            return "fast"
        return self._generic.mode(self.param_shapes, self.input_shape, False,
                                  False)

    @property
    def state(self) -> tuple[np.ndarray, ...]:
        """The constant non-trainable state (e.g. BatchNorm moving statistics).

        One array per :attr:`state_specs` entry, a snapshot of the Keras
        model's non-trainable variables (seed generator states excluded) at
        import; the same for every posterior sample, never updated.
        """
        return tuple(self._state_values)

    @property
    def has_dropout(self) -> bool:
        """Whether ``training=True`` changes the output (dropout or noise)."""
        if self._generic is None:
            return any(isinstance(op, _Dropout) and op.rate > 0
                       for op in self._ops)
        layers = self.keras_model._flatten_layers(include_self=False)  # pylint: disable=protected-access
        return any(network_generic.is_seed_state(v) for layer in layers
                   for v in layer.non_trainable_variables)

    def flops_per_example(self) -> int:
        """Forward-pass FLOPs (2 x multiply-adds) for one example, one sample.

        Exact on the fast path; on the generic path, 2 x the multiply-adds
        of every kernel (exact for Dense and convolutions).
        """
        return self._flops

    def activation_size_per_example(self) -> int:
        """Number of activation floats one example produces, one sample."""
        return self._activation_size

    def get_config(self) -> dict:
        """JSON-serialisable architecture and constant state.

        The Keras model config, the path asked for at import, and the
        :attr:`state` arrays as lists (exact: float32 values survive JSON's
        float64 text).
        """
        config = {"keras_model": json.loads(self.keras_model.to_json())}
        if self._requested_path != "auto":
            config["path"] = self._requested_path
        if self.state_specs:
            config["state"] = [
                {"name": spec.name, "dtype": str(v.dtype),
                 "shape": list(v.shape), "values": v.ravel().tolist()}
                for spec, v in zip(self.state_specs, self._state_values)]
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Network":
        """Rebuilds a Network from :meth:`get_config` (never unpickles)."""
        if not isinstance(config, dict) or "keras_model" not in config:
            raise ValueError("config must be a dict with key 'keras_model' as "
                             f"written by Network.get_config(); got {config!r:.200}.")
        model = keras.models.model_from_json(json.dumps(config["keras_model"]))
        state = config.get("state") or []
        state_vars = network_generic.state_variables(model)
        if state:
            if len(state) != len(state_vars):
                raise ValueError(f"config holds {len(state)} state arrays; the "
                                 f"model has {len(state_vars)} non-trainable "
                                 "variables.")
            for var, entry in zip(state_vars, state):
                value = np.asarray(entry["values"], entry["dtype"]).reshape(
                    entry["shape"])
                if tuple(value.shape) != tuple(var.shape):
                    raise ValueError(f"config state {entry['name']!r} has shape "
                                     f"{value.shape}; the model's variable has "
                                     f"{tuple(var.shape)}.")
                var.assign(value)
        return cls.from_keras(model, path=config.get("path", "auto"))

    def __repr__(self) -> str:
        if self._generic is None:
            layers = " -> ".join(type(op).__name__.lstrip("_") for op in self._ops)
        else:
            layers = f"generic: {self.path_reason}"
        return (f"Network(input_shape={self.input_shape}, num_classes="
                f"{self.num_classes}, num_params={self.num_params}, {layers})")

    def cached_function(self, key, builder: Callable):
        """A compiled function of this network, built once per ``key``.

        Compiled functions take the parameters as arguments, so every
        ensemble of this network (slices included) shares them.  A thin
        delegate to :func:`tfp_bnn_adv.xla.cached_function`, which owns the
        cache (weakly keyed by this network, bounded); prefer that function,
        whose builder gets a weak proxy of the network: a ``builder`` here
        that holds the network keeps it alive for the process.
        """
        return xla.cached_function(self, key, lambda _: builder())

    # -------------------------------------------------------------- parameters
    def init_params(self, seed, num_samples: int | None = None) -> list[tf.Tensor]:
        """Draws weights from the layers' Keras initialisers, statelessly.

        Args:
          seed: an int or a stateless seed (shape-[2] int tensor).
          num_samples: ``None`` for one weight set; an int ``S`` for a stack
            with a leading sample axis of size ``S``.

        Returns:
          A list of float32 tensors of shapes ``param_shapes`` (or
          ``[S, *shape]``).  The same seed gives the same weights.
        """
        if num_samples is not None:
            validate.positive_int(num_samples, "num_samples")
        seeds = seeds_lib.split(seed, len(self.param_specs))
        out = []
        for i, (spec, s) in enumerate(zip(self.param_specs, tf.unstack(seeds))):
            if spec.initializer is None:  # the Keras model's own value
                value = tf.constant(self._initial_values[i], tf.float32)
                out.append(value if num_samples is None else
                           tf.repeat(value[None], num_samples, axis=0))
            elif num_samples is None:
                out.append(_stateless_init(spec.initializer, spec.shape, s))
            else:
                sample_seeds = seeds_lib.split(s, num_samples)
                out.append(tf.stack([
                    _stateless_init(spec.initializer, spec.shape, ss)
                    for ss in tf.unstack(sample_seeds)]))
        return out

    def check_params(self, params, stacked: bool, name: str = "params") -> list[tf.Tensor]:
        """Validates and converts a weight set (or stack) to float32 tensors.

        Returns:
          The list of tensors; raises ValueError/TypeError naming ``name``
          when the number or shapes of tensors do not match the network.
        """
        if not isinstance(params, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got "
                            f"{type(params).__name__}.")
        if len(params) != len(self.param_specs):
            raise ValueError(f"{name} has {len(params)} tensors; the network "
                             f"has {len(self.param_specs)} parameter tensors.")
        out = [tf.convert_to_tensor(p, tf.float32) for p in params]
        lead = None
        for p, spec in zip(out, self.param_specs):
            shape = tuple(p.shape)
            body = shape[1:] if stacked else shape
            if body != spec.shape:
                raise ValueError(
                    f"{name}: tensor for {spec.name!r} has shape {shape}; "
                    f"expected {('[S] + ' if stacked else '')}{list(spec.shape)}.")
            if stacked:
                lead = shape[0] if lead is None else lead
                if shape[0] != lead:
                    raise ValueError(f"{name}: inconsistent sample axis sizes "
                                     f"({lead} vs {shape[0]} for {spec.name!r}).")
        return out

    # ---------------------------------------------------------------- applying
    def apply_stack(self, params: Sequence[tf.Tensor], x: tf.Tensor, *,
                    per_sample_inputs: bool = False, training: bool = False,
                    seed=None) -> tf.Tensor:
        """Logits of every weight set in a stack, in one op graph.

        Pure and XLA-compilable; performs no input validation (callers at the
        public boundary validate, see :meth:`check_inputs`).

        Args:
          params: list of float32 tensors ``[S, *shape]``.
          x: float32 inputs ``[B, *input_shape]`` shared by all samples, or
            ``[S, B, *input_shape]`` if ``per_sample_inputs``.
          per_sample_inputs: whether ``x`` carries its own sample axis.
          training: apply dropout (needs ``seed``); otherwise dropout is the
            identity.
          seed: stateless seed for dropout when ``training``.

        Returns:
          Logits, float32 ``[S, B, C]``.
        """
        if training and self.has_dropout and seed is None:
            raise ValueError("apply with training=True needs a seed for dropout.")
        params = [tf.convert_to_tensor(p, tf.float32) for p in params]
        x = tf.convert_to_tensor(x, tf.float32)
        if self._generic is not None:
            return self._generic.apply_stack(
                params, x, param_shapes=self.param_shapes,
                input_shape=self.input_shape,
                per_sample_inputs=per_sample_inputs,
                training=training and self.has_dropout, seed=seed)
        s = params[0].shape[0]
        if (s is not None and s > 1 and not (training and self.has_dropout)
                and self._conv_sees_per_sample_input(per_sample_inputs)
                and _grouped_conv_as_a_loop()):
            return self._map_samples(params, x, per_sample_inputs)
        return self._run_program(params, x, per_sample_inputs, training, seed)

    def _conv_sees_per_sample_input(self, per_sample_inputs: bool) -> bool:
        """Whether a convolution of the program gets a per-sample input
        (one after a parametrised layer, or any with per-sample inputs)."""
        shared = set() if per_sample_inputs else {self.graph.input}
        for op, inputs, output, index in self._program:
            inputs_shared = all(i in shared for i in inputs)
            if isinstance(op, _Conv2D) and not inputs_shared:
                return True
            # A pass-through step (op None) or a layer without weights or
            # randomness keeps a shared input shared.
            if inputs_shared and not index and not isinstance(op, _Dropout):
                shared.add(output)
        return False

    def _map_samples(self, params, x, per_sample_inputs: bool) -> tf.Tensor:
        """The program run for one sample at a time, by ``tf.map_fn``.

        Taken where convolutions on a per-sample input run as ``S`` ordinary
        convolutions anyway (:func:`_grouped_conv_as_a_loop`: TF's Eigen CPU
        kernels, no XLA): keeping each sample's activations in an ordinary
        ``[B, H, W, C]`` layout, whole-network, saves the grouped layout's
        splits, concatenations and transposes.  Measured on a 2-core Zen 5
        with TF's kernels held to Eigen and AVX2 (``TF_ENABLE_ONEDNN_OPTS=0
        ONEDNN_MAX_CPU_ISA=AVX2``), expected input gradient: the bench CNN
        (S=20, B=64) 0.40 s in the grouped layout with per-sample
        convolutions, 0.24 s mapped; the bench ResNet 0.87 / 0.71 s; weight
        gradients of the CNN (S=20, B=64) 0.42 / 0.32 s, (S=4, B=500) equal.
        With oneDNN (where this path is not taken) mapping was slower (CNN
        0.14 / 0.17 s).  Never taken with dropout in training mode, whose
        masks are drawn for the whole stack at once and must not depend on
        the platform; otherwise the two differ by float rounding only.
        """
        def one(elems):
            p, v = elems if per_sample_inputs else (elems, x)
            return self._run_program([q[None] for q in p],
                                     v[None] if per_sample_inputs else v,
                                     per_sample_inputs, False, None)[0]

        elems = (list(params), x) if per_sample_inputs else list(params)
        return tf.map_fn(one, elems, fn_output_signature=tf.float32)

    def _run_program(self, params, x, per_sample_inputs: bool,
                     training: bool, seed) -> tf.Tensor:
        """The fast path's program on a whole stack (see :meth:`apply_stack`)."""
        s = params[0].shape[0]
        if s is None:
            s = tf.shape(params[0])[0]
        values = {self.graph.input: _Act(
            x, "stacked" if per_sample_inputs else "shared", s)}
        for op, inputs, output, index in self._program:
            if op is None:
                values[output] = values[inputs[0]]
                continue
            op_seed = None
            if training and isinstance(op, _Dropout):
                # Numbered among the ops, as before graphs were walked, so
                # seeds (and masks) of chains stay what they were.
                op_seed = tf.random.experimental.stateless_fold_in(
                    seed, self._ops.index(op))
            acts = [values[i] for i in inputs]
            values[output] = op(acts if op.num_inputs > 1 else acts[0],
                                [params[i] for i in index], training, op_seed)
        return _to_stacked(values[self.graph.output])

    def apply(self, params: Sequence[tf.Tensor], x: tf.Tensor, *,
              training: bool = False, seed=None) -> tf.Tensor:
        """Logits of one weight set.

        Args:
          params: list of float32 tensors of shapes ``param_shapes``.
          x: float32 ``[B, *input_shape]``.
          training: apply dropout (needs ``seed``).
          seed: stateless seed for dropout.

        Returns:
          Logits, float32 ``[B, C]``.
        """
        stacked = [p[None] for p in params]
        return self.apply_stack(stacked, x, training=training, seed=seed)[0]

    # -------------------------------------------------------------- validation
    def check_inputs(self, x, y=None, *, x_name: str = "x", y_name: str = "y"):
        """Validates inputs (and optional integer labels) at a public boundary.

        Inputs that look unscaled -- an integer dtype with values outside
        ``[0, 1]`` (raw 0..255 pixels), or any value beyond
        ``+-UNSCALED_LIMIT`` -- are used as given, with one
        :class:`UnscaledInputWarning` per calling line and process.

        Args:
          x: real array-like ``[B, *input_shape]``, float or integer.
          y: optional labels ``[B]``, integers in ``[0, num_classes)`` (floats
            holding integers are accepted).
          x_name, y_name: the argument names used in messages.

        Returns:
          ``(x, y)`` as float32 / int32 tensors (``y`` may be None).

        Raises:
          TypeError: naming the argument and dtype if ``x`` is complex,
            boolean or not numeric, or ``y`` does not hold integer labels.
          ValueError: naming the argument and the bad value for a wrong
            shape, an empty batch, NaN or infinite inputs (also values that
            overflow float32), or labels out of range.
        """
        x, (lo, hi), integer = _as_float_tensor(x, x_name)
        expected = (None,) + self.input_shape
        if x.shape.rank != len(expected) or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{x_name} has shape {tuple(x.shape)}; the network expects "
                f"[batch, {', '.join(map(str, self.input_shape))}].")
        if x.shape[0] == 0:
            raise ValueError(f"{x_name} is empty (batch size 0).")
        if (integer and (lo < 0 or hi > 1)) or max(-lo, hi) > UNSCALED_LIMIT:
            caller = sys._getframe(1)  # pylint: disable=protected-access
            _warn_unscaled(x_name, integer, lo, hi,
                           (caller.f_code.co_filename, caller.f_lineno))
        if y is None:
            return x, None
        y = check_labels(y, self.num_classes, y_name)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{y_name} has {y.shape[0]} labels but {x_name} has "
                             f"{x.shape[0]} examples.")
        return x, y


# --------------------------------------------------------------------------
# Shared argument checks.
# --------------------------------------------------------------------------
class UnscaledInputWarning(UserWarning):
    """Inputs look unscaled: integer pixels, or values far outside [0, 1]."""


# Inputs beyond this magnitude are far outside [0, 1] and outside standardised
# ranges too (a z-score of 10 is rare); networks initialised for such data
# saturate on them, and HMC then accepts nothing.
UNSCALED_LIMIT = 10.0
# Calling lines (file, line) that have already warned in this process.
_UNSCALED_WARNED: set = set()


def _warn_unscaled(name: str, integer: bool, lo: float, hi: float, site) -> None:
    if site in _UNSCALED_WARNED:
        return
    _UNSCALED_WARNED.add(site)
    what = "has an integer dtype and values" if integer else "has values"
    warnings.warn(
        f"{name} {what} in [{lo:g}, {hi:g}]; tfp_bnn_adv uses them as given. "
        "Scale inputs to the range the model was built for (e.g. pixels / "
        "255 into [0, 1]); silence this with warnings.filterwarnings('ignore', "
        "category=tfp_bnn_adv.network.UnscaledInputWarning). Warned once per "
        "calling line.", UnscaledInputWarning, stacklevel=3)


# The shared checks under the names attacks, SGD and older callers import.
check_positive_int = validate.positive_int
check_positive_float = validate.positive_real


def _as_float_tensor(x, name: str) -> tuple[tf.Tensor, tuple[float, float], bool]:
    """``(float32 tensor, (min, max), whether x had an integer dtype)``.

    Refuses complex (the imaginary part would be dropped), boolean and
    non-numeric inputs, and NaN or infinite values after the float32 cast.
    """
    if isinstance(x, tf.Tensor):
        dtype, integer = x.dtype.name, x.dtype.is_integer
        if x.dtype.is_complex:
            raise TypeError(f"{name} must be real-valued, got dtype {dtype}; "
                            "the imaginary part would be dropped.")
        if not (x.dtype.is_floating or integer):
            raise TypeError(f"{name} must be numeric, got dtype {dtype}.")
        t = tf.cast(x, tf.float32)
        if t.shape.num_elements() == 0:
            return t, (0.0, 0.0), integer
        # All three statistics in one host sync, as the finiteness check alone
        # would take.
        stats = tf.stack([tf.cast(tf.reduce_all(tf.math.is_finite(t)), tf.float32),
                          tf.reduce_min(t), tf.reduce_max(t)]).numpy()
        finite, lo, hi = bool(stats[0]), float(stats[1]), float(stats[2])
        source_finite = not finite and x.dtype.is_floating and bool(
            tf.reduce_all(tf.math.is_finite(x)))
    else:
        arr = np.asarray(x)
        dtype = arr.dtype
        integer = np.issubdtype(dtype, np.integer)
        if np.issubdtype(dtype, np.complexfloating):
            raise TypeError(f"{name} must be real-valued, got dtype {dtype}; "
                            "the imaginary part would be dropped.")
        if dtype == object or not np.issubdtype(dtype, np.number):
            raise TypeError(f"{name} must be a numeric array, got dtype {dtype}.")
        with np.errstate(over="ignore"):  # overflow is reported below
            arr32 = arr.astype(np.float32, copy=False)
        if arr32.size == 0:
            return tf.convert_to_tensor(arr32), (0.0, 0.0), integer
        # numpy's min and max propagate NaN, so they also decide finiteness.
        lo, hi = float(arr32.min()), float(arr32.max())
        finite = math.isfinite(lo) and math.isfinite(hi)
        t = tf.convert_to_tensor(arr32)
        source_finite = finite or bool(np.all(np.isfinite(arr)))
    if not finite:
        if source_finite:
            raise ValueError(
                f"{name} has values beyond the float32 range (about "
                f"+-3.4e38; dtype {dtype}), which become infinite in float32.")
        raise ValueError(f"{name} contains NaN or infinite values.")
    return t, (lo, hi), integer


def _label_str(value) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    v = float(value)
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def check_labels(y, num_classes: int, name: str = "y") -> tf.Tensor:
    """Validates integer class labels ``[B]`` in ``[0, num_classes)``.

    Float labels are accepted when every value is an integer in range; they
    are checked before the cast to int, so ``inf`` or ``1e20`` is reported
    as itself instead of as a wrapped-around integer.

    Returns:
      An int32 tensor.

    Raises:
      TypeError: if not integers (a fractional float label is named).
      ValueError: if not rank 1, or a label is not finite or outside
        ``[0, num_classes)`` (the label is named).
    """
    arr = y.numpy() if isinstance(y, tf.Tensor) else np.asarray(y)
    is_float = np.issubdtype(arr.dtype, np.floating)
    if arr.dtype == bool or not (is_float or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must hold integer class labels, got dtype "
                        f"{arr.dtype}.")
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape [batch], got {arr.shape}.")
    if is_float:
        finite = np.isfinite(arr)
        fractional = finite & (arr != np.round(arr))
        if fractional.any():
            raise TypeError(
                f"{name} must hold integer class labels, got dtype {arr.dtype} "
                f"with label {_label_str(arr[fractional][0])}.")
        if not finite.all():
            raise ValueError(f"{name} has label {_label_str(arr[~finite][0])}; "
                             f"labels must be integers in [0, {num_classes}).")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        bad = arr[(arr < 0) | (arr >= num_classes)][0]
        raise ValueError(f"{name} has label {_label_str(bad)} outside "
                         f"[0, {num_classes}).")
    return tf.convert_to_tensor(arr.astype(np.int32))
