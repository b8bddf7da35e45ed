"""The layer graph of a Keras 3 model, flattened into one list of steps.

:func:`walk` turns a ``Sequential`` or functional model (nested models
expanded, at any depth) into a topologically ordered list of :class:`Step`
records, each one call of one layer on values named by integer ids.  Both
paths of :class:`~tfp_bnn_adv.network.Network` and the variational model of
:mod:`tfp_bnn_adv.inference.vi` are built from this one walk, so the Keras
graph is read in one place.

A model that has no static graph -- a subclassed ``keras.Model`` with its
own ``call`` -- cannot be walked; :func:`walk` raises :class:`GraphError`,
and callers fall back to the model's own ``stateless_call``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import keras

__all__ = ["Step", "Graph", "GraphError", "walk", "model_graph"]


class GraphError(ValueError):
    """The model has no static layer graph that can be walked."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One call of one layer inside the flattened graph.

    Attributes:
      layer: the Keras layer (never a model: nested models are expanded).
      inputs: ids of the values this call reads, in the order of the Keras
        node's input tensors.
      outputs: ids of the values it writes, one per output tensor.
      in_shapes: shape of each input for one example (no batch axis).
      out_shapes: shape of each output for one example.
      node: the Keras node; ``node.arguments.fill_in`` rebuilds the call's
        arguments (tensors, lists of tensors, keyword settings) from values
        keyed by ``id`` of the node's input tensors, see :meth:`arguments`.
    """

    layer: Any
    inputs: tuple
    outputs: tuple
    in_shapes: tuple
    out_shapes: tuple
    node: Any

    def arguments(self, values: dict) -> tuple[list, dict]:
        """The call's ``(args, kwargs)`` with tensors taken from ``values``.

        Args:
          values: dict from value id to the value computed for it.
        """
        by_tensor = {id(t): values[i]
                     for t, i in zip(self.node.input_tensors, self.inputs)}
        args, kwargs = self.node.arguments.fill_in(by_tensor)
        return list(args), dict(kwargs)


@dataclasses.dataclass(frozen=True)
class Graph:
    """A flattened model: steps in execution order from ``input`` to ``output``.

    Attributes:
      steps: tuple of :class:`Step`.
      input: id of the model's input value.
      output: id of the model's output value.
      input_shape, output_shape: one example's shapes.
    """

    steps: tuple
    input: int
    output: int
    input_shape: tuple
    output_shape: tuple

    def consumers(self, value: int) -> list[Step]:
        """The steps that read ``value``."""
        return [s for s in self.steps if value in s.inputs]

    def producer(self, value: int) -> Step | None:
        """The step that writes ``value`` (None for the input)."""
        for s in self.steps:
            if value in s.outputs:
                return s
        return None


def _shape(t) -> tuple:
    return tuple(None if d is None else int(d) for d in t.shape[1:])


def _functional_of(model):
    """The functional graph behind ``model`` (a Sequential's own), or None."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if hasattr(model, "_nodes_by_depth") and hasattr(model, "_operations"):
        return model
    return None


def _walk(model, input_ids: list, ids: Callable, steps: list) -> list:
    """Appends ``model``'s steps, its inputs bound to ``input_ids``; returns
    the ids of its outputs."""
    graph = _functional_of(model)
    if graph is None:
        raise GraphError(
            f"model {model.name!r} ({type(model).__name__}) has no static "
            "layer graph (a subclassed model with its own call).")
    if len(graph.inputs) != len(input_ids):
        raise GraphError(f"model {model.name!r} takes {len(graph.inputs)} "
                         f"inputs where {len(input_ids)} are given.")
    value_of = {id(t): i for t, i in zip(graph.inputs, input_ids)}
    for depth in sorted(graph._nodes_by_depth, reverse=True):  # pylint: disable=protected-access
        for node in graph._nodes_by_depth[depth]:  # pylint: disable=protected-access
            layer = node.operation
            if layer is None or node.is_input:
                continue
            missing = [t for t in node.input_tensors if id(t) not in value_of]
            if missing:
                raise GraphError(
                    f"layer {layer.name!r} ({type(layer).__name__}) of model "
                    f"{model.name!r} reads a tensor that is not computed "
                    "from the model's input.")
            inputs = tuple(value_of[id(t)] for t in node.input_tensors)
            if isinstance(layer, keras.Model) and len(node.input_tensors) == len(
                    getattr(_functional_of(layer), "inputs", ())) and not [
                        v for v in node.arguments.kwargs.values()
                        if v is not None]:
                outs = _walk(layer, list(inputs), ids, steps)
                if len(outs) != len(node.outputs):
                    raise GraphError(f"model {layer.name!r} returns "
                                     f"{len(outs)} outputs where its caller "
                                     f"expects {len(node.outputs)}.")
            else:
                outs = [ids() for _ in node.outputs]
                steps.append(Step(layer, inputs, tuple(outs),
                                  tuple(_shape(t) for t in node.input_tensors),
                                  tuple(_shape(t) for t in node.outputs), node))
            for t, i in zip(node.outputs, outs):
                value_of[id(t)] = i
    missing = [t for t in graph.outputs if id(t) not in value_of]
    if missing:
        raise GraphError(f"model {model.name!r}: an output is not computed "
                         "from its inputs.")
    return [value_of[id(t)] for t in graph.outputs]


def walk(model) -> Graph:
    """Flattens a built single-input, single-output Keras 3 model.

    Args:
      model: a built ``keras.Sequential`` or functional ``keras.Model``;
        nested Sequential/functional models are expanded into their layers
        (a nested model called with extra keyword arguments, or with a
        different number of inputs than it declares, stays one step).

    Returns:
      A :class:`Graph`.

    Raises:
      GraphError: if the model (or a nested one) is subclassed and so has
        no static graph, or it does not have exactly one input and one
        output.
    """
    graph = _functional_of(model)
    if graph is None:
        raise GraphError(
            f"model {model.name!r} ({type(model).__name__}) has no static "
            "layer graph (a subclassed model with its own call).")
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise GraphError(f"model {model.name!r} has {len(graph.inputs)} inputs "
                         f"and {len(graph.outputs)} outputs; tfp_bnn_adv needs "
                         "exactly one of each.")
    counter = iter(range(1, 1 << 62))
    steps: list[Step] = []
    out = _walk(model, [0], lambda: next(counter), steps)
    return Graph(tuple(steps), 0, out[0], _shape(graph.inputs[0]),
                 _shape(graph.outputs[0]))


def model_graph(model) -> tuple[Graph | None, str | None]:
    """:func:`walk`, or ``(None, reason)`` where the model cannot be walked."""
    try:
        return walk(model), None
    except GraphError as e:
        return None, str(e)
