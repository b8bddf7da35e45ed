"""The generic path of :class:`~tfp_bnn_adv.network.Network`: any Keras 3 model.

A model the fast path does not cover is evaluated by Keras itself, as a pure
function of its weights: each layer of the flattened graph
(:mod:`tfp_bnn_adv.keras_graph`) through its own
``layer.stateless_call(trainable, non_trainable, *args)``, or, for a model
with no static graph (a subclassed ``keras.Model``), the whole model through
``model.stateless_call``.  Evaluating layer by layer is what lets the path
strip a final softmax and choose each layer's ``training`` flag.

The sample axis ``S`` is vectorised with ``tf.vectorized_map`` where every op
of the model has a vectorising converter and the result lowers to XLA (tried
once per network and call signature, on symbolic shapes; the answer depends
only on the model and the TensorFlow build, never on a timing), and
otherwise by ``tf.map_fn`` over samples, a static-size loop that XLA
compiles.  Both compute the same function; they differ only by rounding.

Semantics, the same on every path:

* Non-trainable state (BatchNormalization's moving statistics, a
  Normalization layer's mean and variance, frozen weights) is a constant
  snapshot taken at import: the same for every sample, never updated.
* BatchNormalization always runs in inference mode.  Every other layer gets
  ``training`` as given to ``apply_stack``: dropout and noise layers are off
  unless ``training=True``, and then draw from stateless seeds (each
  layer's seed generator state is set from the call's seed, the sample and
  the layer's position), so the same seed gives the same masks.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tfp_bnn_adv import keras_graph
from tfp_bnn_adv import xla

__all__ = ["GenericFunction", "is_seed_state", "state_variables",
           "drops_when_stripped", "training_kwargs", "linear_clone",
           "VECTORIZE_MODES"]

# How the sample axis is evaluated: one vectorised graph, or a loop.
VECTORIZE_MODES = ("vectorized_map", "map_fn")


def is_seed_state(variable) -> bool:
    """Whether a Keras variable is a random seed generator's state."""
    return "seed_generator_state" in variable.path


def state_variables(model) -> list:
    """The model's constant state: non-trainable variables but seed states."""
    return [v for v in model.non_trainable_variables if not is_seed_state(v)]


def drops_when_stripped(layer) -> bool:
    """Whether stripping this layer's output softmax removes the whole call.

    An ``Activation`` or ``Softmax`` layer is only its softmax; any other
    layer keeps its call with a linear activation (:func:`linear_clone`).
    """
    return type(layer).__name__ in ("Activation", "Softmax")


def training_kwargs(layer, kwargs: dict, training: bool) -> dict:
    """``kwargs`` with the ``training`` flag this path gives ``layer``.

    Every layer that takes ``training`` gets it, overriding any value fixed
    in the model's graph, except BatchNormalization, which always runs in
    inference mode.
    """
    if getattr(layer, "_call_has_training_arg", False) or "training" in kwargs:
        kwargs["training"] = bool(training) and not isinstance(
            layer, keras.layers.BatchNormalization)
    return kwargs


def linear_clone(layer, in_shapes):
    """A copy of ``layer`` with its activation replaced by the identity.

    Built but never holding the weights used: its ``stateless_call`` gets
    the original layer's weights, which match because the copy has the
    same class and configuration.
    """
    config = dict(layer.get_config())
    config["activation"] = "linear"
    clone = type(layer).from_config(config)
    clone.build(*[(None,) + tuple(s) for s in in_shapes])
    if (len(clone.trainable_variables) != len(layer.trainable_variables) or
            len(clone.non_trainable_variables) != len(layer.non_trainable_variables)):
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}): a copy of it "
            "with a linear activation does not have the same weights, so "
            "its output softmax cannot be stripped; end the model in logits.")
    return clone


def _first_line(error: Exception) -> str:
    """The line of a pfor/XLA error that says what failed."""
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    for line in lines:
        if "expected to be loop invariant" in line or "No converter" in line:
            return line[:300]
    return (lines[0] if lines else type(error).__name__)[:300]


@dataclasses.dataclass
class _Call:
    """One layer call: what to call and where its variables come from."""
    step: keras_graph.Step | None   # None: the whole model
    layer: object                   # what stateless_call is called on
    trainable: tuple                # indices into the parameter list
    non_trainable: tuple            # ("state", j) or ("seed", dtype)
    alias: bool = False             # pass the input on (a stripped softmax)


class GenericFunction:
    """A Keras 3 model as a pure function of a stack of weight sets.

    Args:
      model: the built Keras 3 model.
      graph: its :func:`keras_graph.walk`, or None to call the whole model.
      stripped_step: the graph step whose output softmax is stripped, or
        None.
      var_index: ``id(variable) -> index`` of the trainable variables in the
        parameter list (``model.trainable_variables`` order).
      state: ``id(variable) -> index`` into ``state_values`` of every
        non-trainable variable that is not a seed generator state.
      state_values: the constant snapshot of those variables.
    """

    def __init__(self, model, graph, stripped_step, var_index: dict,
                 state: dict, state_values: Sequence[np.ndarray]):
        self.model = model
        self.graph = graph
        self._state_values = [tf.constant(v) for v in state_values]
        self._modes: dict = {}
        self._mode_reasons: dict = {}
        self._traced: set = set()

        def slots(variables):
            return tuple(("seed", v.dtype) if is_seed_state(v)
                         else ("state", state[id(v)]) for v in variables)

        if graph is None:
            self._calls = [_Call(None, model, tuple(
                var_index[id(v)] for v in model.trainable_variables),
                slots(model.non_trainable_variables))]
            return
        self._calls = []
        for step in graph.steps:
            layer = step.layer
            if step is stripped_step and drops_when_stripped(layer):
                self._calls.append(_Call(step, layer, (), (), alias=True))
                continue
            target = (linear_clone(layer, step.in_shapes)
                      if step is stripped_step else layer)
            self._calls.append(_Call(
                step, target,
                tuple(var_index[id(v)] for v in layer.trainable_variables),
                slots(layer.non_trainable_variables)))

    # ---------------------------------------------------------------- one set
    def _variables(self, call: _Call, params, seed, k: int):
        trainable = [params[i] for i in call.trainable]
        non_trainable = []
        for j, (kind, ref) in enumerate(call.non_trainable):
            if kind == "state":
                non_trainable.append(self._state_values[ref])
            else:
                s = (tf.constant([0, 0], tf.int32) if seed is None else
                     tf.random.experimental.stateless_fold_in(
                         tf.random.experimental.stateless_fold_in(seed, k), j))
                non_trainable.append(tf.cast(s, ref))
        return trainable, non_trainable

    def apply_one(self, params: Sequence[tf.Tensor], x: tf.Tensor,
                  training: bool = False, seed=None) -> tf.Tensor:
        """Logits ``[B, C]`` of one weight set (no sample axis)."""
        if self.graph is None:
            call = self._calls[0]
            tv, ntv = self._variables(call, params, seed, 0)
            kwargs = training_kwargs(self.model, {}, training)
            out, _ = self.model.stateless_call(tv, ntv, x, **kwargs)
            return tf.cast(out, tf.float32)
        values = {self.graph.input: x}
        for k, call in enumerate(self._calls):
            step = call.step
            if call.alias:
                values[step.outputs[0]] = values[step.inputs[0]]
                continue
            args, kwargs = step.arguments(values)
            kwargs = training_kwargs(call.layer, kwargs, training)
            tv, ntv = self._variables(call, params, seed, k)
            out, _ = call.layer.stateless_call(tv, ntv, *args, **kwargs)
            outs = tf.nest.flatten(out)
            for vid, o in zip(step.outputs, outs):
                values[vid] = o
        return tf.cast(values[self.graph.output], tf.float32)

    # ------------------------------------------------------------- the stack
    def _body(self, x, per_sample_inputs: bool, training: bool, seed):
        def body(elems):
            params, xs, index = elems
            sample_seed = (None if seed is None else
                           tf.random.experimental.stateless_fold_in(seed, index))
            return self.apply_one(params, xs if per_sample_inputs else x,
                                  training, sample_seed)
        return body

    @staticmethod
    def _num_samples(params):
        """``S`` of a parameter stack: static where known, else a tensor."""
        s = params[0].shape[0]
        return tf.shape(params[0])[0] if s is None else s

    def _elems(self, params, x, per_sample_inputs):
        index = tf.range(self._num_samples(params))
        return (list(params), x if per_sample_inputs else index, index)

    def mode(self, param_shapes, input_shape, per_sample_inputs: bool,
             training: bool) -> str:
        """``"vectorized_map"`` or ``"map_fn"`` for this kind of call.

        Decided once per kind of call by lowering a two-sample, two-example
        ``tf.vectorized_map`` of the model (with no while-loop fallback) to
        XLA's HLO, without compiling it: if any op lacks a vectorising
        converter or the lowering fails, the loop is used.
        """
        key = (bool(per_sample_inputs), bool(training))
        if key in self._modes:
            return self._modes[key]
        with tf.init_scope():
            self.check_traces(param_shapes, input_shape, per_sample_inputs,
                              training)

            def trial(params, x, seed):
                body = self._body(x, per_sample_inputs, training,
                                  seed if training else None)
                return tf.vectorized_map(body, self._elems(params, x, per_sample_inputs),
                                         fallback_to_while_loop=False)

            params = [tf.zeros((2,) + tuple(s), tf.float32) for s in param_shapes]
            x = tf.zeros(((2,) if per_sample_inputs else ()) + (2,) + tuple(input_shape),
                         tf.float32)
            seed = tf.constant([0, 0], tf.int32)
            tf_logger = tf.get_logger()
            level = tf_logger.level
            tf_logger.setLevel("CRITICAL")  # pfor logs every op it cannot convert
            try:
                tf.function(trial, jit_compile=True, autograph=False
                            ).experimental_get_compiler_ir(params, x, seed)(
                                stage="hlo")
                mode, reason = "vectorized_map", "every op vectorises and lowers to XLA"
            except Exception as e:  # pylint: disable=broad-except
                mode = "map_fn"
                reason = "tf.vectorized_map does not apply: " + _first_line(e)
            finally:
                tf_logger.setLevel(level)
        self._modes[key] = mode
        self._mode_reasons[key] = reason
        logging.info("tfp_bnn_adv generic path of %r (per_sample_inputs=%s, "
                     "training=%s): %s (%s).", self.model.name, key[0], key[1],
                     mode, reason)
        return mode

    def check_traces(self, param_shapes, input_shape, per_sample_inputs=False,
                     training=False) -> None:
        """Traces one weight set on two examples; errors surface as they are.

        Raises:
          ValueError: naming the model, with Keras' or TensorFlow's error,
            if it cannot be evaluated as a pure function of its weights.
        """
        if bool(training) in self._traced:
            return
        params = [tf.TensorSpec(tuple(s), tf.float32) for s in param_shapes]
        x = tf.TensorSpec((2,) + tuple(input_shape), tf.float32)
        fn = lambda p, xx: self.apply_one(p, xx, training,  # noqa: E731
                                          tf.constant([0, 0]) if training else None)
        try:
            with tf.init_scope():
                tf.function(fn, autograph=False).get_concrete_function(params, x)
        except Exception as e:  # pylint: disable=broad-except
            raise ValueError(
                f"model {self.model.name!r} cannot be evaluated as a pure "
                f"function of its weights by its layers' stateless_call: "
                f"{type(e).__name__}: {_first_line(e)}") from e
        self._traced.add(bool(training))

    def mode_reason(self, per_sample_inputs: bool = False,
                    training: bool = False) -> str | None:
        """Why :meth:`mode` chose what it did (None before it was asked)."""
        return self._mode_reasons.get((bool(per_sample_inputs), bool(training)))

    def apply_stack(self, params: Sequence[tf.Tensor], x: tf.Tensor, *,
                    param_shapes, input_shape, per_sample_inputs: bool = False,
                    training: bool = False, seed=None) -> tf.Tensor:
        """Logits ``[S, B, C]`` of every weight set in the stack."""
        mode = self.mode(param_shapes, input_shape, per_sample_inputs, training)
        if (mode == "vectorized_map" and not per_sample_inputs
                and xla.in_xla_context()
                and self.mode(param_shapes, input_shape, True, training)
                == "vectorized_map"):
            # Under XLA, the gradient of a vectorised matmul of a shared
            # (loop-invariant) input takes its transposes' permutations from
            # the runtime shape, which XLA then needs as compile-time
            # constants: every input and weight becomes one, and each new
            # batch compiles anew (measured: 0.3 s a call for a 784-64 layer
            # of 10 samples, against 1 ms).  The input broadcast over the
            # samples vectorises as a batched matmul, with no such shapes.
            x = tf.broadcast_to(x[None], tf.concat(
                [[self._num_samples(params)], tf.shape(x)], 0))
            per_sample_inputs = True
        body = self._body(x, per_sample_inputs, training,
                          seed if training else None)
        elems = self._elems(params, x, per_sample_inputs)
        if mode == "vectorized_map":
            return tf.vectorized_map(body, elems, fallback_to_while_loop=False)
        return tf.map_fn(body, elems, fn_output_signature=tf.float32)
