"""Mean-field variational inference with TensorFlow Probability's Keras layers.

:func:`fit` takes the same Keras 3 classifier that
:meth:`~tfp_bnn_adv.network.Network.from_keras` accepts, builds its variational
counterpart from ``tfp.layers`` (which are ``tf_keras``, i.e. Keras 2, layers)
and trains it with ``tf_keras`` ``fit``.  The result, a :class:`VIPosterior`,
draws ``S`` full weight sets from the trained posterior into a
:class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` in the Network's parameter
layout, so gradients and attacks treat VI exactly like HMC.

The variational model mirrors the Keras model's layer graph
(:attr:`Network.graph <tfp_bnn_adv.network.Network.graph>`: ``Sequential``
or functional, residual ``Add``/``Concatenate`` branches, nested models
expanded), one ``tf_keras`` layer per Keras layer:

* **variational**: ``Dense`` -> ``tfp.layers.DenseFlipout``
  (``DenseReparameterization`` with ``estimator="reparameterization"``) and
  ``Conv2D`` (``channels_last``, ``groups=1``) ->
  ``tfp.layers.Convolution2DFlipout`` (or
  ``Convolution2DReparameterization``), with the Keras layer's own
  activation function;
* **deterministic**, every other layer (``BatchNormalization``,
  ``LayerNormalization``, ``Concatenate``, ``DepthwiseConv2D``, a
  ``Conv2D`` with ``groups > 1``, ...): a small ``tf_keras`` adapter that
  holds the layer's trainable weights as ``tf_keras`` weights, *point
  estimates* trained with the same loss (they have no prior, so no KL
  term), and calls the Keras 3 layer's own ``stateless_call`` with them.
  Non-trainable state (BatchNormalization's moving statistics) is the
  constant :attr:`Network.state <tfp_bnn_adv.network.Network.state>`;
  BatchNormalization always runs in inference mode.  Layers with a
  ``training`` argument (Dropout, GaussianNoise, ...) get the training
  flag, and their random draws come from stateless seeds like every other
  draw of the model (see Randomness below);
* a chain (no branches) of only ``Dense``, ``Conv2D``, pooling,
  ``Flatten``, ``Reshape``, ``Activation``, ``ReLU``, ``LeakyReLU`` and
  ``Dropout`` layers on the Network's fast path is built, as it always
  was, as a ``tf_keras.Sequential`` of the variational layers above and the
  ``tf_keras`` layers of the same names and settings for the others
  (Dropout: inverted dropout of the same rate with stateless masks).

Either way the variational model computes exactly what the Keras model and
the :class:`Network` compute (:meth:`Network.apply` at the posterior mean
is the variational model with its noise switched off).  A subclassed model
(``Network.graph`` is ``None``) has no layers to put posteriors on and is
refused; use HMC or SGD / deep ensembles for it.

A final softmax is dropped, as in :class:`Network`: the variational model
outputs logits and the loss is a cross-entropy *from logits*, so softmax is
applied once.

The variational family: every kernel **and** bias of a variational layer
gets a prior ``N(0, prior_scale**2)`` (independent per scalar) and a
mean-field normal posterior ``N(loc, softplus(rho)**2)``; every other
parameter is a point estimate ``loc`` (its posterior a point mass:
:meth:`VIPosterior.sample_ensemble` repeats it in every sample).  With
``init="default"``, ``loc`` starts at a draw from the Keras initialiser of
the user's layer (stateless, from ``seed``), ``rho`` at
``softplus^-1(init_scale)``, the same for every weight.  ``init="paper"``
starts as the authors' Pyro guide did: ``loc`` and ``rho`` of every
variational weight and bias independent ``N(0, 1)`` draws (stateless, from
``seed``), so the initial scale is ``softplus(N(0, 1))``, 0.8 on average;
``init_scale`` does not apply, and point estimates start from the Keras
initialisers as with ``init="default"``.

The training loss is the negative ELBO **per training point**::

    loss = mean_b[-log p(y_b | x_b, w)] + kl_weight * KL(q || p) / N,

with ``w`` drawn from ``q`` by the layers (Flipout or reparameterization), the
mean over the ``B`` examples of the mini-batch and ``N`` the number of
training points (after any validation split).  Its expectation over
mini-batches is ``-ELBO / N``; ``kl_weight = 1`` is the ELBO itself.  The
authors' Pyro code sized the data plate to the mini-batch, which weights
the KL ``N / B`` times as much: ``kl_weight = N / batch_size`` reproduces
it (about 469 for MNIST's 60,000 points in batches of 128).  The KL
term enters through ``model.losses``, which ``tf_keras`` ``compile``/``fit``
add to the loss in the compiled training step.

Randomness: every draw is a stateless function of ``seed``, so the same
seed gives the same trained posterior in any process, and an interrupted
run resumed from its checkpoint gives the posterior of an uninterrupted one,
bit for bit (on one platform, TensorFlow build and compile path).  The
initial ``loc`` comes from the Keras initialisers drawn statelessly; epoch
``e`` visits the training points in the order of a NumPy generator seeded
with ``(seed, e)``; and the layers' noise (Flipout signs, the Gaussian
perturbations, dropout masks), which ``tfp.layers`` draw from TensorFlow's
stateful RNG, is drawn instead with :func:`tfp_bnn_adv.seeds.normal`,
:func:`~tfp_bnn_adv.seeds.bits` and :func:`~tfp_bnn_adv.seeds.uniform`
(the Keras layers in adapters from seed-generator states set from the same
seeds) from a seed per forward pass: ``fold_in(fold_in(seed, TRAIN), t)``
at training step ``t`` (Adam's iteration count, part of the checkpoint),
and a seed of the epoch and batch for validation passes.  Those draws are the same with
and without XLA, and the compile path is a function of the ``jit_compile``
argument and the platform (:func:`tfp_bnn_adv.xla.stochastic_jit`: TF's
kernels on a CPU-only host, as ``tf_keras`` by default), recorded in the
settings; nothing is timed.  What can still differ between the two paths,
or between machines, is float rounding.

Checkpoints: with a ``checkpoint_dir``, :func:`fit` writes the variational
parameters (``loc`` and the raw ``rho``) and the point estimates, Adam's
moments and iteration count, the history and the early-stopping state
atomically after every epoch; a call with the same arguments continues from the last epoch
written (a larger ``epochs`` extends a finished run).  A checkpoint of a
different configuration (architecture, data, settings or seed) is refused
with a message naming the difference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
import time
import warnings
from typing import Sequence

from absl import logging
import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python import random as tfp_random
from tensorflow_probability.python.random import random_ops as tfp_random_ops
import tf_keras

from tfp_bnn_adv import files
from tfp_bnn_adv import network_generic
from tfp_bnn_adv import seeds as seeds_lib
from tfp_bnn_adv import validate
from tfp_bnn_adv import xla
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.inference import density
from tfp_bnn_adv.network import Network

__all__ = ["fit", "VIPosterior", "ESTIMATORS", "INITS", "DEFAULT_INIT_SCALE",
           "FORMAT_VERSION", "CHECKPOINT_FILE"]

ESTIMATORS = ("flipout", "reparameterization")
# How fit starts the posterior: the Keras initialisers and init_scale, or
# the authors' N(0, 1) loc and rho.
INITS = ("default", "paper")
# Small enough that the initial posterior acts almost like the Keras network
# it starts from (logit noise ~1e-2 x input norm), large enough that the
# softplus gradient of the scale is not vanishingly small.
DEFAULT_INIT_SCALE = 1e-2
# Version 3 stores rho for the variational parameters only (and the mask),
# version 2 the raw softplus parameter rho of every parameter, version 1
# softplus(rho), which does not invert exactly; all are read.
FORMAT_VERSION = 3
_FORMAT_NAME = "tfp_bnn_adv.VIPosterior"
CHECKPOINT_FILE = "vi_checkpoint.npz"
_CHECKPOINT_FORMAT = "tfp_bnn_adv.vi_checkpoint"
_CHECKPOINT_VERSION = 1
# Streams folded into the seed: training steps, validation passes, and the
# initial posterior of init="paper".
_TRAIN_STREAM, _VALIDATION_STREAM, _INIT_STREAM = 1, 2, 3


# --------------------------------------------------------------------------
# Stateless noise for the variational layers.
# --------------------------------------------------------------------------
# Held while tfp's Rademacher sampler is redirected (see _Noise.scope).
_PATCH_LOCK = threading.RLock()


class _Noise:
    """Hands the variational layers stateless seeds while a pass is traced.

    A training or validation step, or one pass of
    :meth:`VIPosterior.predict_proba_flipout`, opens a :meth:`scope` with the
    pass's seed; the ``k``-th draw traced inside it uses ``fold_in(seed, k)``.
    The layers trace in a fixed order, so every draw is a function of the
    pass's seed alone.  Gaussian draws come in through the layers'
    ``*_posterior_tensor_fn`` (:meth:`sample`), dropout masks through
    :class:`_StatelessDropout`, and Flipout's random signs, which the
    ``tfp.layers`` draw with ``tfp.random.rademacher`` and an op seed, by
    redirecting that function while the scope is open (in the thread that
    opened it; others keep the original).  Outside a scope, e.g. a direct
    call of the variational model, draws fall back to TensorFlow's stateful
    RNG, as ``tfp.layers`` do by default.

    Args:
      seed: the posterior's int seed (the base of its streams).
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._pass_seed = None
        self._count = 0
        self._owner = None

    def stream(self, index: int) -> tf.Tensor:
        """The base seed of stream ``index`` (training, validation)."""
        return seeds_lib.fold_in(self.seed, index)

    @contextlib.contextmanager
    def scope(self, seed):
        with _PATCH_LOCK:
            outer = (self._pass_seed, self._count, self._owner,
                     tfp_random.rademacher)
            self._pass_seed, self._count = seed, 0
            self._owner = threading.get_ident()
            tfp_random.rademacher = self._rademacher
            try:
                yield
            finally:
                (self._pass_seed, self._count, self._owner,
                 tfp_random.rademacher) = outer

    def take(self):
        """The next draw's stateless seed, or ``None`` outside a scope."""
        if self._pass_seed is None or self._owner != threading.get_ident():
            return None
        self._count += 1
        return seeds_lib.fold_in(self._pass_seed, self._count - 1)

    def sample(self, dist) -> tf.Tensor:
        """A draw of a (possibly ``Independent``) ``Normal``: loc + scale * eps."""
        seed = self.take()
        if seed is None:
            return dist.sample()
        normal = (dist.distribution
                  if isinstance(dist, tfp.distributions.Independent) else dist)
        loc = tf.convert_to_tensor(normal.loc)
        scale = tf.convert_to_tensor(normal.scale)
        return loc + scale * seeds_lib.normal(tf.shape(loc), seed,
                                              dtype=loc.dtype)

    def _rademacher(self, shape, dtype=tf.float32, seed=None, name=None):
        stateless = self.take()
        if stateless is None:
            return tfp_random_ops.rademacher(shape, dtype=dtype, seed=seed,
                                             name=name)
        with tf.name_scope(name or "stateless_rademacher"):
            low_bit = tf.bitwise.bitwise_and(seeds_lib.bits(shape, stateless), 1)
            return tf.cast(low_bit, dtype) * 2 - 1


class _StatelessDropout(tf_keras.layers.Layer):
    """Inverted dropout whose mask is a :class:`_Noise` draw."""

    def __init__(self, rate: float, noise: _Noise, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self._noise = noise

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        seed = self._noise.take()
        shape = tf.shape(inputs)
        if seed is None:
            u = tf.random.uniform(shape, dtype=inputs.dtype)
        else:
            u = seeds_lib.uniform(shape, seed, dtype=inputs.dtype)
        return tf.where(u >= self.rate, inputs / (1.0 - self.rate),
                        tf.zeros_like(inputs))


class _StatelessSteps:
    """Training and validation steps whose noise comes from stateless seeds.

    Mixed into the ``tf_keras`` model classes below.  Training step ``t``
    (Adam's iteration count, restored with a checkpoint) uses
    ``fold_in(stream(TRAIN), t)``; validation batch ``b`` after the epoch
    that ended at step ``t`` uses
    ``fold_in(fold_in(stream(VALIDATION), t), b)``.
    """

    vi_noise: _Noise

    def train_step(self, data):
        seed = seeds_lib.fold_in(self.vi_noise.stream(_TRAIN_STREAM),
                                 self.optimizer.iterations)
        with self.vi_noise.scope(seed):
            return super().train_step(data)

    def test_step(self, data):
        seed = seeds_lib.fold_in(
            seeds_lib.fold_in(self.vi_noise.stream(_VALIDATION_STREAM),
                              self.optimizer.iterations),
            self._test_counter)
        with self.vi_noise.scope(seed):
            return super().test_step(data)


class _VariationalModel(_StatelessSteps, tf_keras.Sequential):
    """The variational model of a Sequential chain of the classic layers."""

    def __init__(self, layers, noise: _Noise, name=None):
        super().__init__(layers, name=name)
        self.vi_noise = noise


class _VariationalGraphModel(_StatelessSteps, tf_keras.Model):
    """The variational model of any layer graph (a ``tf_keras`` functional model)."""

    def __init__(self, inputs, outputs, noise: _Noise, name=None):
        super().__init__(inputs=inputs, outputs=outputs, name=name)
        self.vi_noise = noise


class _KerasCalls:
    """What a :class:`_KerasLayerAdapter` calls, kept out of ``tf_keras``'
    attribute tracking (which would otherwise adopt the Keras 3 layer's
    variables as the adapter's own weights).

    Attributes:
      layer: the Keras 3 layer.
      calls: per call of the layer in the graph, ``(step, target)``: the
        graph step and what ``stateless_call`` is called on (the layer, or
        its copy with a linear activation where the output softmax is
        stripped).
      state: per non-trainable variable of the layer, a constant tensor
        (from ``Network.state``) or, for a seed generator's state, its dtype.
    """

    def __init__(self, layer, state):
        self.layer = layer
        self.calls = []
        self.state = state


class _KerasLayerAdapter(tf_keras.layers.Layer):
    """A Keras 3 layer in a ``tf_keras`` model, by its own ``stateless_call``.

    Its trainable variables become this layer's ``tf_keras`` weights (point
    estimates, initialised from the Keras layer's current values and
    overwritten with ``loc`` by :meth:`VIPosterior._assign`); its
    non-trainable ones are the constant network state, and seed-generator
    states are set from a :class:`_Noise` draw per call (zeros when not
    training, where no layer draws).  The ``training`` flag reaches every
    layer that takes one, as on the Network's generic path, but
    BatchNormalization, which always runs in inference mode.

    Call it as ``adapter(inputs, call_index=k)`` with ``inputs`` the values
    the ``k``-th graph step of the layer reads (a tensor, or a list for
    several), see :meth:`add_call`.

    Args:
      layer: the built Keras 3 layer.
      state: see :class:`_KerasCalls`.
      noise: the model's :class:`_Noise`.
    """

    def __init__(self, layer, state, noise: _Noise, **kwargs):
        super().__init__(autocast=False, **kwargs)
        self._keras = _KerasCalls(layer, state)
        self._noise = noise
        self.point_weights = [
            self.add_weight(
                name=v.name, shape=tuple(v.shape), dtype=tf.float32,
                initializer=tf_keras.initializers.Constant(
                    np.asarray(v.numpy(), np.float32)),
                trainable=True)
            for v in layer.trainable_variables]

    def add_call(self, step, target) -> int:
        """Registers a graph step of the layer; returns its ``call_index``."""
        self._keras.calls.append((step, target))
        return len(self._keras.calls) - 1

    def call(self, inputs, training=None, call_index=0):
        step, target = self._keras.calls[call_index]
        values = dict(zip(step.inputs, tf.nest.flatten(inputs)))
        args, kwargs = step.arguments(values)
        training = bool(training)
        kwargs = network_generic.training_kwargs(target, kwargs, training)
        seed = None
        non_trainable = []
        for j, slot in enumerate(self._keras.state):
            if isinstance(slot, tf.Tensor):
                non_trainable.append(slot)
                continue
            if seed is None:
                seed = self._noise.take() if training else None
                if seed is None and training:
                    # Outside a noise scope: TensorFlow's stateful RNG, as
                    # the tfp.layers there.
                    seed = tf.random.uniform([2], maxval=2**31 - 1,
                                             dtype=tf.int32)
            s = (tf.zeros([2], tf.int32) if seed is None
                 else seeds_lib.fold_in(seed, j))
            non_trainable.append(tf.cast(s, slot))
        out, _ = target.stateless_call(list(self.point_weights), non_trainable,
                                       *args, **kwargs)
        return out

    def get_config(self):
        raise NotImplementedError(
            "The variational model is rebuilt from its Network, never "
            "serialised as a tf_keras config.")


# --------------------------------------------------------------------------
# The variational model.
# --------------------------------------------------------------------------
def _mean_field_normal_fn(untransformed_scale: float):
    """A ``tfp.layers`` posterior builder: ``N(loc, softplus(rho)^2)``.

    ``loc`` starts at zero and is overwritten right after the model is built
    (:meth:`VIPosterior._assign`), which keeps the Keras-initialiser draw
    stateless and in the Network's layout.
    """
    def fn(dtype, shape, name, trainable, add_variable_fn):
        loc = add_variable_fn(name=name + "_loc", shape=shape,
                              initializer=tf_keras.initializers.Zeros(),
                              dtype=dtype, trainable=trainable)
        rho = add_variable_fn(
            name=name + "_untransformed_scale", shape=shape,
            initializer=tf_keras.initializers.Constant(untransformed_scale),
            dtype=dtype, trainable=trainable)
        scale = tfp.util.DeferredTensor(rho, tf.nn.softplus)
        return tfp.distributions.Independent(
            tfp.distributions.Normal(loc=loc, scale=scale),
            reinterpreted_batch_ndims=len(shape))

    return fn


def _prior_fn(prior_scale: float):
    """A ``tfp.layers`` prior builder: independent ``N(0, prior_scale^2)``."""

    def fn(dtype, shape, name, trainable, add_variable_fn):
        del name, trainable, add_variable_fn  # the prior has no variables
        return density.gaussian_prior(shape, prior_scale, dtype)

    return fn


def _divergence_fn(weight: float):
    """Analytic ``KL(q || p)`` times ``weight`` (``kl_weight / N``)."""

    def fn(posterior, prior, sample):
        del sample  # the Normal-Normal KL is exact, no Monte Carlo needed
        return tfp.distributions.kl_divergence(posterior, prior) * weight

    return fn


def _is_variational_layer(layer) -> bool:
    """Whether ``layer`` gets a ``tfp.layers`` variational counterpart.

    A Keras 3 ``Dense`` or ``Conv2D`` (``channels_last``, ``groups=1``)
    whose weights are exactly its trainable kernel (and bias): not frozen,
    no LoRA, not quantised.
    """
    # Exact classes: a subclass may compute something else in its call.
    cls = type(layer)
    if cls is keras.layers.Conv2D:
        if layer.data_format != "channels_last" or int(layer.groups) != 1:
            return False
    elif cls is not keras.layers.Dense:
        return False
    if getattr(layer.dtype_policy, "quantization_mode", None) is not None:
        return False
    if getattr(layer, "lora_enabled", False) or layer.non_trainable_variables:
        return False
    expected = [layer.kernel] + ([layer.bias] if layer.use_bias else [])
    return [id(v) for v in layer.trainable_variables] == [id(v) for v in expected]


def _variational_mask(network: Network) -> tuple[bool, ...]:
    """Per parameter tensor: variational (a kernel or bias of a layer of
    :func:`_is_variational_layer`) or a deterministic point estimate."""
    index = {id(v): i for i, v in enumerate(network.keras_model.trainable_variables)}
    mask = [False] * len(network.param_specs)
    for step in network.graph.steps:
        if _is_variational_layer(step.layer):
            for v in step.layer.trainable_variables:
                mask[index[id(v)]] = True
    return tuple(mask)


def _require_graph(network: Network) -> None:
    """Refuses a network without a layer graph (a subclassed model)."""
    if network.graph is None:
        model = network.keras_model
        raise ValueError(
            f"VI needs a model with a layer graph (Sequential or functional) "
            f"to put posteriors on its layers; model {model.name!r} "
            f"({type(model).__name__}) is subclassed, with its own call. Use "
            "HMC (tfp_bnn_adv.inference.hmc) or SGD / deep ensembles "
            "(tfp_bnn_adv.inference.sgd) for it, or rebuild it as a "
            "functional model.")


def _activation_of(layer, stripped: bool):
    """The activation function of a variational layer.

    The Keras layer's own function, so the variational model computes what
    the Keras model does; none where the Network applies none (also where it
    stripped the output softmax).
    """
    if stripped or layer.activation is keras.activations.linear:
        return None
    return layer.activation


def _variational_layer(layer, *, activation, name: str, flipout: bool,
                       kernel_kwargs: dict, bias_kwargs: dict):
    """The ``tfp.layers`` counterpart of a Keras 3 ``Dense`` or ``Conv2D``.

    Same units/filters, kernel size, strides, padding and dilation; the
    posterior, prior and divergence builders of ``kernel_kwargs`` and (with
    a bias) ``bias_kwargs``.
    """
    kwargs = dict(kernel_kwargs)
    if layer.use_bias:
        kwargs.update(bias_kwargs)
    else:
        kwargs.update(bias_posterior_fn=None, bias_prior_fn=None)
    if isinstance(layer, keras.layers.Dense):
        make = (tfp.layers.DenseFlipout if flipout
                else tfp.layers.DenseReparameterization)
        return make(int(layer.units), activation=activation, name=name,
                    **kwargs)
    make = (tfp.layers.Convolution2DFlipout if flipout
            else tfp.layers.Convolution2DReparameterization)
    return make(int(layer.filters), tuple(layer.kernel_size),
                strides=tuple(layer.strides), padding=layer.padding.lower(),
                dilation_rate=tuple(layer.dilation_rate),
                activation=activation, name=name, **kwargs)


# Op kinds of the chain builder (the tf_keras layer of the same name).
_CHAIN_KINDS = ("dense", "conv2d", "max_pool2d", "avg_pool2d", "flatten",
                "reshape", "activation", "relu", "leaky_relu", "dropout")


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where parameter tensor ``i`` lives in the variational model.

    Exactly one of ``posterior`` (with its ``prior``: a variational
    parameter) and ``point`` (a ``tf_keras`` weight: a point estimate) is
    set.
    """
    posterior: object = None
    prior: object = None
    point: object = None


def _layer_slots(layer) -> list:
    """The slots of a ``tfp.layers`` layer: kernel, then bias if any."""
    out = [_Slot(layer.kernel_posterior, layer.kernel_prior)]
    if layer.bias_posterior is not None:
        out.append(_Slot(layer.bias_posterior, layer.bias_prior))
    return out


def _build_chain(network: Network, noise: _Noise, make_variational):
    """The ``tf_keras.Sequential`` of a fast-path chain of ``_CHAIN_KINDS``."""
    out = [tf_keras.Input(network.input_shape)]
    variational = []
    # Network's import walk already dispatched on the Keras layers: build
    # from its op records (a stripped output Activation layer has none).
    for op in network.ops:
        if op.kind in ("dense", "conv2d"):
            new = make_variational(
                op.layer, None if op.activation == "linear" else op.layer.activation,
                op.name)
            variational.append(new)
        elif op.kind in ("max_pool2d", "avg_pool2d"):
            make = (tf_keras.layers.MaxPooling2D if op.kind == "max_pool2d"
                    else tf_keras.layers.AveragePooling2D)
            new = make(pool_size=op.pool_size, strides=op.strides,
                       padding=op.padding.lower(), name=op.name)
        elif op.kind == "flatten":
            new = tf_keras.layers.Flatten(name=op.name)
        elif op.kind == "reshape":
            new = tf_keras.layers.Reshape(op.out_shape, name=op.name)
        elif op.kind == "activation":
            new = tf_keras.layers.Activation(
                None if op.activation == "linear" else op.layer.activation,
                name=op.name)
        elif op.kind == "relu":
            new = tf_keras.layers.ReLU(
                max_value=op.max_value, negative_slope=op.negative_slope,
                threshold=op.threshold, name=op.name)
        elif op.kind == "leaky_relu":
            new = tf_keras.layers.LeakyReLU(alpha=op.negative_slope,
                                            name=op.name)
        else:  # dropout
            new = _StatelessDropout(op.rate, noise, name=op.name)
        out.append(new)
    model = _VariationalModel(out, noise, name=network.keras_model.name + "_vi")
    return model, [slot for layer in variational for slot in _layer_slots(layer)]


def _unique_name(name: str, taken: set) -> str:
    """``name``, or ``name_<k>`` where a nested model reused it."""
    out, k = name, 1
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    taken.add(out)
    return out


def _build_graph(network: Network, noise: _Noise, make_variational):
    """The ``tf_keras`` functional model mirroring ``network.graph``."""
    graph = network.graph
    keras_model = network.keras_model
    index = {id(v): i for i, v in enumerate(keras_model.trainable_variables)}
    state_vars = network_generic.state_variables(keras_model)
    state_index = {id(v): j for j, v in enumerate(state_vars)}
    state = [tf.constant(v) for v in network.state]
    stripped = network.stripped_output_step
    slots: list = [None] * len(network.param_specs)
    built: dict = {}  # id(Keras layer) -> its tf_keras layer
    taken: set = set()
    values = {graph.input: tf_keras.Input(network.input_shape)}
    for step in graph.steps:
        layer = step.layer
        is_stripped = step is stripped
        if is_stripped and network_generic.drops_when_stripped(layer):
            values[step.outputs[0]] = values[step.inputs[0]]
            continue
        if is_stripped and sum(s.layer is layer for s in graph.steps) > 1:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) applies the "
                "output softmax and is called more than once; VI cannot strip "
                "its softmax in one call only. End the model in logits.")
        new = built.get(id(layer))
        if _is_variational_layer(layer):
            if new is None:
                new = make_variational(layer, _activation_of(layer, is_stripped),
                                       _unique_name(layer.name, taken))
            out = new(values[step.inputs[0]])
            if id(layer) not in built:
                for v, slot in zip(layer.trainable_variables, _layer_slots(new)):
                    slots[index[id(v)]] = slot
        else:
            if new is None:
                layer_state = [
                    v.dtype if network_generic.is_seed_state(v)
                    else state[state_index[id(v)]]
                    for v in layer.non_trainable_variables]
                new = _KerasLayerAdapter(layer, layer_state, noise,
                                         name=_unique_name(layer.name, taken))
                for v, w in zip(layer.trainable_variables, new.point_weights):
                    slots[index[id(v)]] = _Slot(point=w)
            target = (network_generic.linear_clone(layer, step.in_shapes)
                      if is_stripped else layer)
            k = new.add_call(step, target)
            inputs = [values[i] for i in step.inputs]
            out = new(inputs if len(inputs) > 1 else inputs[0], call_index=k)
        built[id(layer)] = new
        for vid, o in zip(step.outputs, tf.nest.flatten(out)):
            values[vid] = o
    unused = [spec.name for spec, slot in zip(network.param_specs, slots)
              if slot is None]
    if unused:
        raise ValueError(f"model {keras_model.name!r}: parameters {unused} "
                         "belong to no layer of its graph; VI cannot place "
                         "them.")
    model = _VariationalGraphModel(values[graph.input], values[graph.output],
                                   noise, name=keras_model.name + "_vi")
    return model, slots


def _build_variational_model(network: Network, *, estimator: str,
                             prior_scale: float, kl_weight: float,
                             num_train: int, seed: int):
    """The ``tf_keras`` variational counterpart of ``network.keras_model``.

    A fast-path chain of ``_CHAIN_KINDS`` is built as a ``tf_keras``
    ``Sequential`` of the same layers (the model as it always was); every
    other graph as a functional model with adapters for the layers that are
    not variational.

    Returns:
      ``(model, slots)``: a built ``tf_keras`` model that maps
      ``[B, *input_shape]`` to logits ``[B, C]`` and draws its noise from
      the :class:`_Noise` ``model.vi_noise``, and one :class:`_Slot` per
      parameter tensor in the Network's order.
    """
    noise = _Noise(seed)
    weight = kl_weight / num_train
    kernel_kwargs = dict(
        kernel_posterior_fn=_mean_field_normal_fn(0.0),
        kernel_posterior_tensor_fn=noise.sample,
        kernel_prior_fn=_prior_fn(prior_scale),
        kernel_divergence_fn=_divergence_fn(weight))
    bias_kwargs = dict(
        bias_posterior_fn=_mean_field_normal_fn(0.0),
        bias_posterior_tensor_fn=noise.sample,
        bias_prior_fn=_prior_fn(prior_scale),
        bias_divergence_fn=_divergence_fn(weight))

    def make_variational(layer, activation, name):
        return _variational_layer(layer, activation=activation, name=name,
                                  flipout=estimator == "flipout",
                                  kernel_kwargs=kernel_kwargs,
                                  bias_kwargs=bias_kwargs)

    chain = network.path == "fast" and all(
        op.kind in _CHAIN_KINDS for op in network.ops)
    with warnings.catch_warnings():
        # tfp.layers create their variables through the deprecated
        # Layer.add_variable; the warning is TFP's, not the user's.
        warnings.filterwarnings("ignore", message=".*add_variable.*")
        if chain:
            return _build_chain(network, noise, make_variational)
        return _build_graph(network, noise, make_variational)


def _check_spreads(network: Network, values, name: str, mask) -> list:
    """Validates ``scale`` or ``untransformed_scale`` against the mask.

    Returns:
      float32 arrays for the variational parameters, None for the point
      estimates.

    Raises:
      TypeError / ValueError: naming ``name`` and the parameter, for a list
        of the wrong length, a misshapen array, None for a variational
        parameter, or for a point estimate anything but None (or, for
        ``scale``, zeros).
    """
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of arrays (None for point "
                        f"estimates), got {type(values).__name__}.")
    shapes = network.param_shapes
    filled = [np.zeros(shapes[i], np.float32) if v is None and i < len(shapes)
              else v for i, v in enumerate(values)]
    arrays = [t.numpy() for t in network.check_params(filled, stacked=False,
                                                      name=name)]
    out = []
    for spec, given, array, variational in zip(network.param_specs, values,
                                               arrays, mask):
        if variational and given is None:
            raise ValueError(
                f"{name} for {spec.name!r} is None, but it is a variational "
                "parameter (a Dense or Conv2D kernel or bias); give its array.")
        if not variational and given is not None and (
                name != "scale" or np.any(array != 0)):
            raise ValueError(
                f"{name} for {spec.name!r} must be None"
                f"{' or zeros' if name == 'scale' else ''}: it is a "
                "deterministic point estimate (its layer is not a variational "
                "Dense or Conv2D).")
        out.append(array if variational else None)
    return out


# --------------------------------------------------------------------------
# The trained posterior.
# --------------------------------------------------------------------------
class VIPosterior:
    """A mean-field normal posterior held by ``tfp.layers`` variational layers.

    Every variational parameter tensor ``i`` of the Network (the kernels and
    biases of ``Dense`` and ``Conv2D`` layers, see the module docstring) has
    a posterior ``N(loc[i], scale[i]**2)`` per scalar, of shape
    ``network.param_shapes[i]``, with ``scale = softplus(rho)`` held as the
    raw ("untransformed") ``rho``.  Every other parameter tensor is a
    deterministic point estimate ``loc[i]`` (:attr:`variational` says which
    is which): its scale is 0, it has no ``rho``, no prior and no KL term,
    and every sample of :meth:`sample_ensemble` holds its ``loc``.  Build one
    with :func:`fit`, directly from ``loc`` and ``scale`` (or ``rho``)
    lists, or with :meth:`load`.

    Args:
      network: the :class:`Network` (or a Keras 3 model to import); it must
        have a layer graph (a subclassed model is refused).
      loc: list of float arrays, ``loc[i]`` of shape ``param_shapes[i]``.
      scale: list of the same length: for a variational parameter a float
        array of its shape, every entry finite and ``> 0`` (stored as
        ``softplus^-1(scale)``, exact to rounding); for a point estimate
        ``None`` (or an array of zeros, as :meth:`posterior_scale` returns).
      untransformed_scale: instead of ``scale``, the raw ``rho``: finite
        float arrays for the variational parameters (stored exactly),
        ``None`` for the point estimates.
      estimator: ``"flipout"`` or ``"reparameterization"`` (the layers' own
        gradient estimator, used by :func:`fit` and
        :meth:`predict_proba_flipout`).
      prior_scale: standard deviation of the ``N(0, prior_scale**2)`` prior on
        every variational weight and bias.
      kl_weight: multiplier of ``KL / num_train`` in the training loss.
      num_train: ``N``, the number of training points the KL is divided by.
      seed: int, the base of the seeds of the layers' noise in training.

    Attributes:
      network: the :class:`Network`.
      variational: tuple of bools, one per parameter tensor: ``True`` for a
        variational kernel or bias, ``False`` for a point estimate.
      variational_model: the ``tf_keras`` model of ``tfp.layers`` (logits
        out).  Called directly, outside :func:`fit` and
        :meth:`predict_proba_flipout`, its layers draw their noise with
        TensorFlow's stateful RNG.
      settings: JSON-able dict of the settings above plus, after :func:`fit`,
        the training settings.
      history: dict ``metric -> list`` per epoch (``loss``, ``accuracy``, and
        ``val_*`` with validation data); empty if not trained.

    Raises:
      TypeError / ValueError: for a bad argument, naming it; ValueError for
        a network without a layer graph.

    Example:
      >>> post = vi.fit(keras_model, x_train, y_train, epochs=5)
      >>> ens = post.sample_ensemble(100, seed=0)      # S = 100 weight sets
      >>> ens.predict_proba(x_test).shape              # [B, C]
      >>> post.posterior_scale()[0].shape              # first kernel's scale
      >>> post.variational                             # (True, True, ...)
    """

    def __init__(self, network, loc: Sequence, scale: Sequence | None = None,
                 *, untransformed_scale: Sequence | None = None,
                 estimator: str = "flipout", prior_scale: float = 1.0,
                 kl_weight: float = 1.0, num_train: int = 1, seed: int = 0):
        if not isinstance(network, Network):
            network = Network.from_keras(network)
        _require_graph(network)
        if (scale is None) == (untransformed_scale is None):
            raise ValueError("Give exactly one of scale and untransformed_scale.")
        mask = _variational_mask(network)
        loc = [t.numpy() for t in network.check_params(loc, stacked=False,
                                                       name="loc")]
        names = [spec.name for spec in network.param_specs]
        for name, m in zip(names, loc):
            if not np.all(np.isfinite(m)):
                raise ValueError(f"loc for {name!r} holds NaN or infinite values.")
        if scale is not None:
            scale = _check_spreads(network, scale, "scale", mask)
            for name, sd in zip(names, scale):
                if sd is not None and (not np.all(np.isfinite(sd)) or np.any(sd <= 0)):
                    raise ValueError(f"scale for {name!r} must be finite and > 0 "
                                     f"everywhere; its minimum is {sd.min()!r}.")
            rho = [None if sd is None else
                   tfp.math.softplus_inverse(tf.constant(sd)).numpy()
                   for sd in scale]
        else:
            rho = _check_spreads(network, untransformed_scale,
                                 "untransformed_scale", mask)
            for name, r in zip(names, rho):
                if r is not None and not np.all(np.isfinite(r)):
                    raise ValueError(f"untransformed_scale for {name!r} holds "
                                     "NaN or infinite values.")
        self.network = network
        self.variational = mask
        self.settings = {
            "estimator": validate.choice(estimator, ESTIMATORS, "estimator"),
            "prior_scale": validate.positive_real(prior_scale, "prior_scale"),
            "kl_weight": validate.positive_real(kl_weight, "kl_weight"),
            "num_train": validate.positive_int(num_train, "num_train"),
            "seed": validate.seed_int(seed),
        }
        self.history: dict[str, list] = {}
        self.variational_model, self._slots = _build_variational_model(
            network, estimator=estimator, prior_scale=self.settings["prior_scale"],
            kl_weight=self.settings["kl_weight"],
            num_train=self.settings["num_train"], seed=self.settings["seed"])
        built = tuple(slot.posterior is not None for slot in self._slots)
        if built != mask:
            raise AssertionError(f"variational model built {built}, the "
                                 f"network's mask is {mask}")
        self._assign(loc, rho)
        self._predict_fn = None

    def _assign(self, loc, rho) -> None:
        """Sets ``loc`` and the raw ``rho`` (None for a point estimate) of
        every parameter, exactly."""
        for slot, m, r in zip(self._slots, loc, rho):
            if slot.posterior is None:
                slot.point.assign(m)
                continue
            normal = slot.posterior.distribution
            normal.loc.assign(m)
            normal.scale.pretransformed_input.assign(r)

    # ------------------------------------------------------------- the posterior
    def posterior_loc(self) -> list[np.ndarray]:
        """Posterior means (the point estimates' values), float32 arrays of
        shapes ``network.param_shapes``."""
        return [slot.point.numpy() if slot.posterior is None else
                slot.posterior.distribution.loc.numpy() for slot in self._slots]

    def posterior_scale(self) -> list[np.ndarray]:
        """Posterior standard deviations ``softplus(rho)``, same layout;
        arrays of zeros for the point estimates."""
        return [np.zeros(slot.point.shape, np.float32) if slot.posterior is None
                else tf.convert_to_tensor(slot.posterior.distribution.scale).numpy()
                for slot in self._slots]

    def posterior_untransformed_scale(self) -> list[np.ndarray | None]:
        """The raw parameters ``rho`` (``scale = softplus(rho)``), same
        layout; ``None`` for the point estimates (a scale of 0 has no finite
        ``rho``)."""
        return [None if slot.posterior is None else
                slot.posterior.distribution.scale.pretransformed_input.numpy()
                for slot in self._slots]

    def kl_divergence(self) -> float:
        """``KL(q || p)`` summed over every variational weight and bias (not
        divided by N); point estimates have no prior and add nothing."""
        return float(sum(
            tfp.distributions.kl_divergence(slot.posterior, slot.prior).numpy()
            for slot in self._slots if slot.posterior is not None))

    def sample_ensemble(self, num_samples: int, seed=0) -> PosteriorEnsemble:
        """Draws ``S`` full weight sets from the posterior.

        Every variational parameter tensor is drawn at once as
        ``loc + scale * seeds.normal([S, *shape])``, an exact draw from the
        mean-field posterior; a point estimate is its ``loc`` in every
        sample.  The same seed gives the same ensemble, with or without XLA
        (:func:`tfp_bnn_adv.seeds.normal`).

        Args:
          num_samples: ``S >= 1``.
          seed: int or shape-[2] integer stateless seed.

        Returns:
          A :class:`PosteriorEnsemble` whose ``params[i]`` are float32
          ``[S, *network.param_shapes[i]]``; ``metadata`` has ``method="vi"``,
          the settings and the seed.

        Raises:
          TypeError / ValueError: for a bad ``num_samples`` or ``seed``.
        """
        num_samples = validate.positive_int(num_samples, "num_samples")
        seed = seeds_lib.stateless(seed)
        params = []
        # One seed per parameter tensor, point estimates included, so a
        # tensor's draw does not depend on which others are variational.
        for slot, s in zip(self._slots, tf.unstack(
                seeds_lib.split(seed, len(self._slots)))):
            if slot.posterior is None:
                value = tf.convert_to_tensor(slot.point)
                params.append(tf.repeat(value[None], num_samples, axis=0))
                continue
            loc = tf.convert_to_tensor(slot.posterior.distribution.loc)
            scale = tf.convert_to_tensor(slot.posterior.distribution.scale)
            eps = seeds_lib.normal([num_samples] + loc.shape.as_list(), s)
            params.append(loc + scale * eps)
        metadata = {"method": "vi", "settings": dict(self.settings),
                    "sample_seed": [int(v) for v in seed.numpy()]}
        return PosteriorEnsemble(self.network, params, metadata=metadata)

    def predict_proba_flipout(self, x, num_samples: int = 100, seed=0, *,
                              batch_size: int = 512) -> np.ndarray:
        """The variational layers' own Monte Carlo posterior predictive.

        Runs ``num_samples`` stochastic forward passes of
        :attr:`variational_model` (fresh Flipout or reparameterization noise
        each pass) and averages the softmax.  A reference for
        :meth:`sample_ensemble`, whose ensembles estimate the same predictive;
        for attacks use the ensemble, which is compiled and vectorised.

        Args:
          x: inputs ``[B, *input_shape]``.
          num_samples: number of passes ``M >= 1``.
          seed: int or shape-[2] stateless seed; pass ``i`` over the ``j``-th
            chunk of ``batch_size`` inputs draws its noise from
            ``fold_in(fold_in(seed, j), i)``, so the same seed (and batch
            size) gives the same result.
          batch_size: inputs per forward pass.

        Returns:
          float32 numpy array ``[B, C]``; rows sum to 1.

        Raises:
          TypeError / ValueError: for a bad argument.
        """
        num_samples = validate.positive_int(num_samples, "num_samples")
        batch_size = validate.positive_int(batch_size, "batch_size")
        seed = seeds_lib.stateless(seed)
        x, _ = self.network.check_inputs(x)
        if self._predict_fn is None:
            model, classes = self.variational_model, self.network.num_classes

            def passes(xb, chunk_seed, m):
                def body(i, total):
                    with model.vi_noise.scope(seeds_lib.fold_in(chunk_seed, i)):
                        logits = model(xb, training=False)
                    return i + 1, total + tf.nn.softmax(logits)

                init = tf.zeros([tf.shape(xb)[0], classes])
                total = tf.while_loop(lambda i, _: i < m, body,
                                      (tf.constant(0), init))[1]
                return total / tf.cast(m, tf.float32)

            self._predict_fn = tf.function(passes, autograph=False,
                                           reduce_retracing=True)
        m = tf.constant(num_samples)
        return np.concatenate([
            self._predict_fn(x[i:i + batch_size],
                             seeds_lib.fold_in(seed, i // batch_size), m).numpy()
            for i in range(0, x.shape[0], batch_size)])

    def __repr__(self) -> str:
        return (f"VIPosterior(estimator={self.settings['estimator']!r}, "
                f"prior_scale={self.settings['prior_scale']}, {self.network!r})")

    # ------------------------------------------------------------ save / load
    def save(self, path: str) -> None:
        """Saves to one ``.npz`` file, atomically, with no pickle.

        Stores ``loc_i`` for every parameter tensor and
        ``untransformed_scale_i`` (the raw ``rho``) for the variational ones,
        float32 arrays, so :meth:`load` rebuilds the exact same posterior,
        and the Keras model's JSON config, the :attr:`variational` mask, the
        settings and the history (format version 3).
        """
        arrays = {f"loc_{i}": m for i, m in enumerate(self.posterior_loc())}
        arrays.update({f"untransformed_scale_{i}": r for i, r in
                       enumerate(self.posterior_untransformed_scale())
                       if r is not None})
        meta = {"format": _FORMAT_NAME, "format_version": FORMAT_VERSION,
                "network": self.network.get_config(),
                "param_names": [s.name for s in self.network.param_specs],
                "param_shapes": [list(s) for s in self.network.param_shapes],
                "variational": list(self.variational),
                "settings": self.settings, "history": self.history}
        files.save_arrays(path, arrays, meta)

    @classmethod
    def load(cls, path: str) -> "VIPosterior":
        """Loads a posterior written by :meth:`save`.

        Files of format version 3 (``untransformed_scale_i`` for the
        variational parameters only) and 2 (for every parameter, all of them
        variational then) hold the raw ``rho`` and load bit for bit; version
        1 files (``scale_i = softplus(rho)``) still load, with
        ``rho = softplus^-1(scale)`` exact to rounding.

        Raises:
          FileNotFoundError: if ``path`` does not exist.
          ValueError: if the file is corrupt, not a VIPosterior, from a newer
            format, or its arrays, mask or settings do not fit its
            architecture.
        """
        arrays, meta = files.load_arrays(path)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME:
            found = meta.get("format") if isinstance(meta, dict) else meta
            raise ValueError(f"{path!r} is not a saved VIPosterior "
                             f"(format={found!r:.80}).")
        version = meta.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or not (
                1 <= version <= FORMAT_VERSION):
            raise ValueError(f"{path!r} has format version {version!r:.40}; "
                             f"this tfp_bnn_adv reads versions 1 to "
                             f"{FORMAT_VERSION}.")
        try:
            network = Network.from_config(meta["network"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path!r}: cannot rebuild the architecture: {e}") from e
        _require_graph(network)
        n = len(network.param_specs)
        mask = _variational_mask(network)
        if version >= 3 and meta.get("variational") != list(mask):
            raise ValueError(
                f"{path!r}: its variational mask {meta.get('variational')!r:.200} "
                f"does not match the architecture's {list(mask)!r:.200}.")
        second = "scale" if version == 1 else "untransformed_scale"
        stored = [True] * n if version < 3 else mask
        expected = {f"loc_{i}" for i in range(n)} | {
            f"{second}_{i}" for i in range(n) if stored[i]}
        if set(arrays) != expected:
            raise ValueError(f"{path!r}: expected arrays {sorted(expected)}, "
                             f"found {sorted(arrays)}.")
        settings = meta.get("settings")
        if not isinstance(settings, dict):
            raise ValueError(f"{path!r}: settings missing or not a dict.")
        known = ("estimator", "prior_scale", "kl_weight", "num_train", "seed")
        loc = [arrays[f"loc_{i}"] for i in range(n)]
        second_arrays = [arrays[f"{second}_{i}"] if mask[i] else None
                         for i in range(n)]
        try:
            post = cls(network, loc, **{second: second_arrays},
                       **{k: settings[k] for k in known})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path!r}: arrays or settings do not fit the "
                             f"architecture: {e}") from e
        post.settings.update(settings)
        history = meta.get("history") or {}
        if not isinstance(history, dict):
            raise ValueError(f"{path!r}: history is not a dict.")
        post.history = {str(k): list(v) for k, v in history.items()}
        return post


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------
def _check_validation(validation_split, validation_data, patience, network):
    validation_split = validate.fraction(validation_split, "validation_split")
    if validation_split and validation_data is not None:
        raise ValueError("Give validation_split or validation_data, not both.")
    if patience is not None:
        patience = validate.positive_int(patience, "early_stopping_patience")
        if not validation_split and validation_data is None:
            raise ValueError(
                "early_stopping_patience needs validation data: set "
                "validation_split > 0 or pass validation_data (never the test "
                "set).")
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(
                validation_data) != 2:
            raise ValueError("validation_data must be a pair (x_val, y_val).")
        validation_data = network.check_inputs(
            validation_data[0], validation_data[1], x_name="validation_data[0]",
            y_name="validation_data[1]")
    return validation_split, validation_data, patience



class _EarlyStopping:
    """``tf_keras.callbacks.EarlyStopping(monitor="val_loss",
    restore_best_weights=True)`` with its state in the open, for checkpoints.

    As Keras does: the first epoch's weights are kept even if its loss is
    not finite, an epoch improves when its loss is below the best, training
    stops once ``wait >= patience`` (never after the first epoch), and the
    best weights are restored at the end, whether it stopped early or not.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.best = math.inf
        self.best_epoch = None
        self.wait = 0
        self.stopped = False
        self.best_weights = None  # (loc, rho)

    def update(self, epoch: int, val_loss: float, post: "VIPosterior") -> bool:
        """Records an epoch's validation loss; whether to stop."""
        if self.best_weights is None:
            self.best_weights = _raw_params(post)
            self.best_epoch = epoch
        self.wait += 1
        if val_loss < self.best:
            self.best, self.best_epoch, self.wait = val_loss, epoch, 0
            self.best_weights = _raw_params(post)
            return False
        self.stopped = self.wait >= self.patience and epoch > 0
        return self.stopped

    def state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch,
                "wait": self.wait, "stopped": self.stopped}

    def restore_state(self, state: dict, best_weights) -> None:
        self.best = float(state["best"])
        self.best_epoch = state["best_epoch"]
        self.wait = int(state["wait"])
        self.stopped = bool(state["stopped"])
        self.best_weights = best_weights


def _raw_params(post: "VIPosterior") -> tuple[list, list]:
    return post.posterior_loc(), post.posterior_untransformed_scale()


def _paper_init(network: Network, seed: int, mask) -> tuple[list, list]:
    """The authors' initial ``(loc, rho)``: i.i.d. ``N(0, 1)`` everywhere.

    Variational parameter tensor ``i`` draws its ``loc`` from seed ``2 i``
    and its raw scale ``rho`` from seed ``2 i + 1`` of
    ``split(fold_in(seed, INIT), 2 * num_tensors)``, float32 arrays of
    ``network.param_shapes``.  A point estimate (the authors' models had
    none) starts where ``init="default"`` starts it, at its Keras
    initialiser's draw, with ``rho`` None.
    """
    shapes = network.param_shapes
    keys = tf.unstack(seeds_lib.split(
        seeds_lib.fold_in(seed, _INIT_STREAM), 2 * len(shapes)))
    default = None if all(mask) else network.init_params(seed)
    loc = [seeds_lib.normal(s, keys[2 * i]).numpy() if v else
           default[i].numpy() for i, (s, v) in enumerate(zip(shapes, mask))]
    rho = [seeds_lib.normal(s, keys[2 * i + 1]).numpy() if v else None
           for i, (s, v) in enumerate(zip(shapes, mask))]
    return loc, rho


class _Checkpoint:
    """The per-epoch checkpoint of one :func:`fit` configuration.

    Arrays: ``loc_i`` of every parameter tensor, ``untransformed_scale_i``
    of the variational ones (point estimates have no ``rho``), Adam's
    ``optimizer_j`` (its moments of the point estimates included) and, with
    early stopping, the same ``best_*`` arrays of the best epoch.
    """

    def __init__(self, directory: str, fields: dict):
        self.path = os.path.join(directory, CHECKPOINT_FILE)
        self.fields = fields
        self.digest = files.json_digest(fields)

    def save(self, post, optimizer, epochs_done: int, history: dict,
             stopping: _EarlyStopping | None, seconds: float) -> None:
        loc, rho = _raw_params(post)
        arrays = {f"loc_{i}": m for i, m in enumerate(loc)}
        arrays.update({f"untransformed_scale_{i}": r for i, r in enumerate(rho)
                       if r is not None})
        arrays.update({f"optimizer_{j}": v.numpy()
                       for j, v in enumerate(optimizer.variables)})
        if stopping is not None and stopping.best_weights is not None:
            best_loc, best_rho = stopping.best_weights
            arrays.update({f"best_loc_{i}": m for i, m in enumerate(best_loc)})
            arrays.update({f"best_untransformed_scale_{i}": r
                           for i, r in enumerate(best_rho) if r is not None})
        files.save_arrays(self.path, arrays, {
            "format": _CHECKPOINT_FORMAT,
            "format_version": _CHECKPOINT_VERSION,
            "config": self.fields, "digest": self.digest,
            "epochs_done": epochs_done, "history": history,
            "num_optimizer_variables": len(optimizer.variables),
            "early_stopping": None if stopping is None else stopping.state(),
            "train_seconds": seconds})

    def load(self, post, optimizer, stopping: _EarlyStopping | None):
        """Restores a checkpoint into ``post`` and ``optimizer`` (built).

        Returns:
          ``(epochs_done, history, train_seconds)``, or ``None`` without a
          checkpoint file.

        Raises:
          ValueError: for a checkpoint of another configuration or format,
            or a corrupt one (missing, misshapen or non-finite arrays).
        """
        if not os.path.exists(self.path):
            return None
        arrays, meta = files.load_arrays(self.path)
        if not isinstance(meta, dict) or meta.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{self.path!r} is not a VI checkpoint.")
        if meta.get("format_version") != _CHECKPOINT_VERSION:
            raise ValueError(
                f"{self.path!r} is a VI checkpoint of format version "
                f"{meta.get('format_version')!r:.40}; this tfp_bnn_adv writes "
                f"version {_CHECKPOINT_VERSION}. Delete it (or use another "
                "checkpoint_dir) to start afresh.")
        saved = meta.get("config")
        if not isinstance(saved, dict):
            raise ValueError(f"{self.path!r}: its configuration is missing; the "
                             "checkpoint is corrupt.")
        # Checkpoints written before fit had ``init`` all started from the
        # default; they resume as such.
        saved = {"init": "default", **saved}
        for field in sorted(set(saved) | set(self.fields)):
            if saved.get(field) != self.fields.get(field):
                raise ValueError(
                    f"The checkpoint in {os.path.dirname(self.path)!r} comes "
                    f"from a different configuration: {field} is "
                    f"{saved.get(field)!r:.80} there but "
                    f"{self.fields.get(field)!r:.80} now. Use another "
                    "checkpoint_dir or delete it to start afresh; runs are "
                    "never mixed.")
        try:
            epochs_done = int(meta["epochs_done"])
            history = {str(k): [float(v) for v in vals]
                       for k, vals in dict(meta["history"]).items()}
            seconds = float(meta["train_seconds"])
            es_state = meta["early_stopping"]
            if (stopping is None) != (es_state is None):
                raise ValueError("early-stopping state does not match")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.path!r}: corrupt checkpoint metadata "
                             f"({e}).") from e

        def take(prefix, templates):
            out = []
            for i, t in enumerate(templates):
                if t is None:  # the rho of a point estimate: none stored
                    out.append(None)
                    continue
                a = arrays.get(f"{prefix}_{i}")
                if a is None or a.shape != t.shape or a.dtype != t.dtype:
                    raise ValueError(
                        f"{self.path!r}: array {prefix}_{i} is missing or has "
                        f"the wrong shape or dtype; expected {t.shape} "
                        f"{t.dtype}. The checkpoint is corrupt.")
                if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                    raise ValueError(f"{self.path!r}: array {prefix}_{i} holds "
                                     "NaN or infinite values. The checkpoint "
                                     "is corrupt.")
                out.append(a)
            return out

        loc_t, rho_t = _raw_params(post)
        opt_t = [v.numpy() for v in optimizer.variables]
        if meta.get("num_optimizer_variables") != len(opt_t):
            raise ValueError(f"{self.path!r}: expected {len(opt_t)} optimizer "
                             "variables. The checkpoint is corrupt.")
        loc = take("loc", loc_t)
        rho = take("untransformed_scale", rho_t)
        opt = take("optimizer", opt_t)
        if stopping is not None:
            best = None
            if "best_loc_0" in arrays:
                best = (take("best_loc", loc_t),
                        take("best_untransformed_scale", rho_t))
            stopping.restore_state(es_state, best)
        post._assign(loc, rho)  # pylint: disable=protected-access
        for var, value in zip(optimizer.variables, opt):
            var.assign(value)
        return epochs_done, history, seconds


def _epoch_batches(x, y, batch_size: int, seed: int, start: int, stop: int):
    """The mini-batches of epochs ``start..stop-1`` as one ``tf.data`` stream.

    Epoch ``e`` visits the points in the order of
    ``np.random.default_rng((seed, e)).permutation(N)``, a function of the
    seed and the epoch alone, so a resumed run sees the batches an
    uninterrupted one would.
    """
    n = x.shape[0]
    features, labels = tf.constant(x), tf.constant(y)

    def order(epoch):
        return np.random.default_rng((seed, int(epoch))).permutation(n)

    # (Dataset.from_generator would do, but doubles the CPU time per step.)
    return (tf.data.Dataset.range(start, stop)
            .map(lambda e: tf.reshape(tf.numpy_function(order, [e], tf.int64),
                                      [n]))
            .flat_map(lambda idx: tf.data.Dataset.from_tensor_slices(
                idx).batch(batch_size))
            .map(lambda idx: (tf.gather(features, idx), tf.gather(labels, idx)))
            .prefetch(2))


class _EpochEnd(tf_keras.callbacks.Callback):
    """After each epoch: the history, early stopping and the checkpoint."""

    def __init__(self, post, optimizer, history: dict,
                 stopping: _EarlyStopping | None, checkpoint: _Checkpoint | None,
                 seconds: float):
        super().__init__()
        self.post, self.optimizer, self.history = post, optimizer, history
        self.stopping, self.checkpoint = stopping, checkpoint
        self.seconds = seconds
        self._tic = None

    def on_epoch_begin(self, epoch, logs=None):
        self._tic = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds += time.perf_counter() - self._tic
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        stop = self.stopping is not None and self.stopping.update(
            epoch, self.history["val_loss"][-1], self.post)
        if self.checkpoint is not None:
            self.checkpoint.save(self.post, self.optimizer, epoch + 1,
                                 self.history, self.stopping, self.seconds)
        if stop:
            self.model.stop_training = True


def fit(model, train_x, train_y, *, epochs: int = 10, batch_size: int = 128,
        learning_rate: float = 1e-3, prior_scale: float = 1.0,
        init_scale: float = DEFAULT_INIT_SCALE, kl_weight: float = 1.0,
        estimator: str = "flipout", init: str = "default",
        validation_split: float = 0.0,
        validation_data=None, early_stopping_patience: int | None = None,
        seed: int = 0, jit_compile=None, checkpoint_dir=None,
        verbose: int = 1) -> VIPosterior:
    """Mean-field VI of a Keras classifier with ``tfp.layers`` and Keras fit.

    Minimises the per-datapoint negative ELBO
    ``mean_b[-log p(y_b | x_b, w)] + kl_weight * KL(q || p) / N``
    (``N`` = number of training points after the validation split; see the
    module docstring) with Adam, in a compiled ``tf_keras`` training step,
    one ``tf_keras`` ``fit`` epoch at a time.  The kernels and biases of the
    ``Dense`` and ``Conv2D`` layers are variational (mean-field normal
    posteriors with a normal prior); every other trainable weight
    (BatchNormalization's ``gamma``/``beta``, LayerNormalization's, other
    layers' kernels) is a deterministic point estimate trained with the same
    loss, without prior or KL (:attr:`VIPosterior.variational`).

    Args:
      model: a built Keras 3 classifier with a layer graph (``Sequential``
        or functional, any layers :meth:`Network.from_keras` imports), or a
        :class:`Network` of one; a final softmax is dropped (the
        variational model outputs logits).  A subclassed model is refused:
        use HMC or SGD / deep ensembles for it.
      train_x: float inputs ``[N, *input_shape]``.
      train_y: int labels ``[N]`` in ``[0, C)``.
      epochs: maximum number of passes over the data, ``>= 1``.
      batch_size: mini-batch size ``B >= 1``.
      learning_rate: Adam learning rate ``> 0``.
      prior_scale: std of the ``N(0, prior_scale**2)`` prior on every
        variational weight and bias (the paper: 1).
      init_scale: initial posterior std of every variational weight and bias
        ``> 0``, with ``init="default"``.  ``init="paper"`` draws every scale, so it
        refuses any other value than :data:`DEFAULT_INIT_SCALE` and records
        ``settings["init_scale"] = None``.
      kl_weight: multiplier of the KL term ``> 0`` (1 is the ELBO).  The
        authors' code: ``N / batch_size``, about 469 on MNIST (their Pyro
        data plate had the size of the mini-batch).
      estimator: ``"flipout"`` (default) or ``"reparameterization"``.
      init: the initial posterior.  ``"default"``: ``loc`` a stateless draw
        from the Keras initialisers, every scale ``init_scale``.
        ``"paper"``, the authors' guide: ``loc`` and the raw scale ``rho``
        of every variational weight and bias i.i.d. ``N(0, 1)``
        (:func:`tfp_bnn_adv.seeds.normal` from ``seed``), so the scale is
        ``softplus(rho)``; point estimates start as with ``"default"``.
      validation_split: fraction in ``[0, 1)`` of the training data held out
        (a random subset drawn from ``seed``) for ``val_loss``/``val_accuracy``.
      validation_data: alternatively, a pair ``(x_val, y_val)``.  Never pass
        the test set: early stopping on it leaks it into training.
      early_stopping_patience: if set, stop when ``val_loss`` has not improved
        for this many epochs, and end with the posterior of the best epoch.
      seed: int; the initial posterior (see ``init``), the validation
        split, the order of every epoch and the layers' noise (see the
        module docstring).
      jit_compile: ``True`` (XLA), ``False`` (TF's kernels), ``"auto"`` or
        ``None`` (the ``TFP_BNN_ADV_JIT`` default): the compile path of the
        training step, resolved without timing by
        :func:`tfp_bnn_adv.xla.stochastic_jit` (``"auto"`` is XLA with a
        GPU or TPU and TF's kernels on a CPU-only host, ``tf_keras``' own
        default).  ``tf_keras`` falls back to TF's kernels where XLA is
        unavailable; the path taken is ``settings["jit_compile"]`` and
        ``settings["compile_path"]``.
      checkpoint_dir: a directory (created if missing) for the per-epoch
        checkpoint :data:`CHECKPOINT_FILE`; ``None`` writes none.  A call
        with the same arguments resumes after the last epoch written, and a
        larger ``epochs`` extends a finished run; the result is the one an
        uninterrupted run gives, bit for bit.
      verbose: Keras progress display: 0 silent, 1 progress bar, 2 one line
        per epoch.

    Returns:
      The trained :class:`VIPosterior`; its ``history`` holds ``loss``,
      ``accuracy`` (and ``val_*``) per epoch, its ``settings`` every argument
      above (but ``checkpoint_dir`` and ``verbose``) plus ``epochs_run``,
      ``train_seconds`` (summed over resumed runs; informative only) and,
      with early stopping, ``best_epoch``.

    Raises:
      TypeError / ValueError: naming the argument, for a bad argument, a
        model :meth:`Network.from_keras` refuses (the layer named with its
        class) or one without a layer graph, bad inputs/labels, or a
        ``checkpoint_dir`` that is a file; all before any training.
      ValueError: for a checkpoint of a different configuration, naming the
        differing field, a corrupt one, or one with more epochs than
        ``epochs``; before any training.

    Example:
      >>> ds = data.half_moons(1000)
      >>> model = models.mlp((2,), 2, hidden=(64,))
      >>> post = vi.fit(model, ds.train_x, ds.train_y, epochs=100,
      ...               batch_size=64, learning_rate=1e-2, verbose=0,
      ...               checkpoint_dir="/tmp/vi_ckpt")   # Ctrl-C, rerun: resumes
      >>> post.sample_ensemble(100, seed=1).accuracy(ds.test_x, ds.test_y)
    """
    epochs = validate.positive_int(epochs, "epochs")
    batch_size = validate.positive_int(batch_size, "batch_size")
    learning_rate = validate.positive_real(learning_rate, "learning_rate")
    init_scale = validate.positive_real(init_scale, "init_scale")
    validate.positive_real(prior_scale, "prior_scale")
    validate.positive_real(kl_weight, "kl_weight")
    validate.choice(estimator, ESTIMATORS, "estimator")
    validate.choice(init, INITS, "init")
    if init == "paper":
        if init_scale != DEFAULT_INIT_SCALE:
            raise ValueError(
                f"init_scale={init_scale!r} has no effect with init='paper', "
                "which draws every scale as softplus(N(0, 1)); leave "
                f"init_scale at its default {DEFAULT_INIT_SCALE} or use "
                "init='default'.")
        init_scale = None  # recorded as such: no scale was set
    seed = validate.seed_int(seed)
    requested_xla = xla.stochastic_jit(jit_compile)
    checkpoint_dir = validate.directory(checkpoint_dir, "checkpoint_dir",
                                        optional=True)
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}.")
    network = model if isinstance(model, Network) else Network.from_keras(model)
    _require_graph(network)
    mask = _variational_mask(network)
    x, y = network.check_inputs(train_x, train_y, x_name="train_x",
                                y_name="train_y")
    validation_split, validation_data, patience = _check_validation(
        validation_split, validation_data, early_stopping_patience, network)
    x, y = x.numpy(), y.numpy()
    if validation_split:
        order = np.random.default_rng(seed).permutation(x.shape[0])
        num_val = int(round(validation_split * x.shape[0]))
        if num_val < 1 or num_val >= x.shape[0]:
            raise ValueError(f"validation_split={validation_split} leaves "
                             f"{num_val} of {x.shape[0]} points for validation; "
                             "need at least one each for training and "
                             "validation.")
        validation_data = (x[order[:num_val]], y[order[:num_val]])
        x, y = x[order[num_val:]], y[order[num_val:]]
    elif validation_data is not None:
        validation_data = tuple(t.numpy() for t in validation_data)
    if checkpoint_dir is not None:
        try:
            os.makedirs(checkpoint_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"checkpoint_dir {checkpoint_dir!r} cannot be "
                             f"created: {e}") from e

    if init == "default":
        loc = network.init_params(seed)
        initial = dict(scale=[np.full(s, init_scale, np.float32) if v else None
                              for s, v in zip(network.param_shapes, mask)])
    else:
        loc, rho = _paper_init(network, seed, mask)
        initial = dict(untransformed_scale=rho)
    post = VIPosterior(network, loc, estimator=estimator,
                       prior_scale=prior_scale, kl_weight=kl_weight,
                       num_train=x.shape[0], seed=seed, **initial)
    vmodel = post.variational_model
    # Adam's own XLA switch is on by default with a GPU only; off, the whole
    # step follows the one argument.
    optimizer = tf_keras.optimizers.Adam(learning_rate=learning_rate,
                                         jit_compile=False)
    vmodel.compile(
        optimizer=optimizer,
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=requested_xla)
    # What tf_keras took (it falls back to TF's kernels without XLA).
    use_xla = bool(vmodel.jit_compile)
    # Built now, so that its variables exist to checkpoint and restore.
    optimizer.build(vmodel.trainable_variables)
    stopping = None if patience is None else _EarlyStopping(patience)

    history: dict[str, list] = {}
    start_epoch, seconds = 0, 0.0
    checkpoint = None
    if checkpoint_dir is not None:
        fields = json.loads(json.dumps({
            "architecture": files.config_digest(network.get_config()),
            "train_data": files.array_digest(x, y),
            "validation_data": (None if validation_data is None
                                else files.array_digest(*validation_data)),
            "estimator": estimator, "prior_scale": float(prior_scale),
            "init": init, "init_scale": init_scale,
            "kl_weight": float(kl_weight),
            "batch_size": batch_size, "learning_rate": learning_rate,
            "validation_split": validation_split,
            "early_stopping_patience": patience, "seed": seed,
            "jit_compile": use_xla}))
        checkpoint = _Checkpoint(checkpoint_dir, fields)
        restored = checkpoint.load(post, optimizer, stopping)
        if restored is not None:
            start_epoch, history, seconds = restored
            if start_epoch > epochs:
                raise ValueError(
                    f"The checkpoint in {checkpoint_dir!r} has {start_epoch} "
                    f"epochs, more than epochs={epochs}; pass epochs >= "
                    f"{start_epoch} or use another checkpoint_dir.")
            logging.info("VI: resuming from %s after epoch %d/%d.",
                         checkpoint.path, start_epoch, epochs)
    logging.info("VI (%s): %d training points, %d parameters (%d in variational "
                 "tensors, the rest point estimates), up to %d epochs of batch "
                 "%d.", estimator, x.shape[0], network.num_params,
                 sum(int(np.prod(shape)) for shape, v in
                     zip(network.param_shapes, mask) if v),
                 epochs, batch_size)
    if start_epoch < epochs and not (stopping is not None and stopping.stopped):
        recorder = _EpochEnd(post, optimizer, history, stopping, checkpoint,
                             seconds)
        try:
            vmodel.fit(_epoch_batches(x, y, batch_size, seed, start_epoch, epochs),
                       epochs=epochs, initial_epoch=start_epoch,
                       steps_per_epoch=-(-x.shape[0] // batch_size),
                       validation_data=validation_data, callbacks=[recorder],
                       verbose=verbose)
        except KeyboardInterrupt:
            logging.warning(
                "VI: interrupted after %d epochs%s.", len(history.get("loss", [])),
                f"; they are saved in {checkpoint_dir!r}: run again with the "
                "same arguments to resume" if checkpoint_dir else
                ", saved nowhere (no checkpoint_dir)")
            raise
        seconds = recorder.seconds
    if stopping is not None and stopping.best_weights is not None:
        post._assign(*stopping.best_weights)  # pylint: disable=protected-access
    post.history = history
    post.settings.update({
        "epochs": epochs, "batch_size": batch_size,
        "learning_rate": learning_rate, "init": init,
        "init_scale": init_scale, "validation_split": validation_split,
        "validation_size": 0 if validation_data is None else len(validation_data[1]),
        "early_stopping_patience": patience,
        "jit_compile": use_xla, "compile_path": xla.path_name(use_xla),
        "epochs_run": len(history.get("loss", [])),
        "train_seconds": seconds})
    if stopping is not None:
        post.settings["best_epoch"] = stopping.best_epoch
    logging.info("VI done in %.1f s, %d epochs: final loss %.4f.", seconds,
                 post.settings["epochs_run"], post.history["loss"][-1])
    return post
