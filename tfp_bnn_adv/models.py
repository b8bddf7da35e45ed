"""The paper's reference architectures as plain Keras 3 models.

Users can bring any model :meth:`Network.from_keras` accepts; these builders
give the architectures of Carbone et al. (2020): fully connected nets with
Leaky-ReLU hidden layers, and a small CNN (conv 5x5 -> pool -> conv 5x5 ->
pool -> dense).  Models output logits (no final softmax).

Leaky-ReLU's slope: the string activation ``"leaky_relu"`` is Keras' own,
slope 0.2; the authors' PyTorch nets used ``nn.LeakyReLU()``, slope 0.01.
``negative_slope=0.01`` builds that net (each hidden layer a linear layer
followed by ``keras.layers.LeakyReLU(negative_slope=0.01)``); the default
``None`` keeps the string activation and its slope.
"""

from __future__ import annotations

import functools
from typing import Sequence

import keras

from tfp_bnn_adv import validate

__all__ = ["mlp", "cnn"]


def _check_negative_slope(negative_slope, activation):
    """``negative_slope`` as a float ``>= 0`` (or ``None``), for Leaky-ReLU."""
    if negative_slope is None:
        return None
    negative_slope = validate.nonnegative_real(negative_slope, "negative_slope")
    if activation != "leaky_relu":
        raise ValueError(f"negative_slope={negative_slope!r} sets the slope of "
                         f"Leaky-ReLU; it needs activation='leaky_relu', got "
                         f"activation={activation!r}.")
    return negative_slope


def _activated(make, activation, negative_slope):
    """``[make(activation=activation)]``, or with a slope
    ``[make(), LeakyReLU(negative_slope)]``."""
    if negative_slope is None:
        return [make(activation=activation)]
    return [make(), keras.layers.LeakyReLU(negative_slope=negative_slope)]


def mlp(input_shape: Sequence[int], num_classes: int,
        hidden: Sequence[int] = (512,), activation: str = "leaky_relu",
        name: str = "mlp", negative_slope: float | None = None):
    """A fully connected classifier, flattening its input first.

    Args:
      input_shape: shape of one example, e.g. ``(28, 28, 1)`` or ``(2,)``.
      num_classes: number of output logits ``C >= 2``.
      hidden: width of each hidden layer, e.g. ``(512, 512)`` (the paper's
        MNIST HMC net; its half-moons nets have two hidden layers too).
      activation: hidden activation (Keras name); the paper uses Leaky-ReLU.
      name: model name.
      negative_slope: ``None`` (default): every hidden layer is
        ``Dense(h, activation=activation)``, so ``"leaky_relu"`` has Keras'
        slope 0.2.  A float ``>= 0`` (only with
        ``activation="leaky_relu"``): every hidden layer is ``Dense(h)``
        followed by ``keras.layers.LeakyReLU(negative_slope)``; 0.01 is
        PyTorch's default, the authors' nets.

    Returns:
      A built ``keras.Sequential`` mapping ``[B, *input_shape]`` to logits
      ``[B, C]``.

    Raises:
      TypeError / ValueError: for a bad argument, naming it; a
        ``negative_slope`` with another ``activation`` names both.

    Example:
      >>> paper_net = mlp((28, 28, 1), 10, hidden=(512, 512),
      ...                 negative_slope=0.01)
    """
    input_shape = validate.int_sequence(input_shape, "input_shape")
    hidden = validate.int_sequence(hidden, "hidden")
    num_classes = validate.integer(num_classes, "num_classes", minimum=2)
    negative_slope = _check_negative_slope(negative_slope, activation)
    layers = [keras.Input(input_shape)]
    if len(input_shape) > 1:
        layers.append(keras.layers.Flatten())
    for h in hidden:
        layers += _activated(functools.partial(keras.layers.Dense, h),
                             activation, negative_slope)
    layers.append(keras.layers.Dense(num_classes))
    return keras.Sequential(layers, name=name)


def cnn(input_shape: Sequence[int], num_classes: int,
        filters: Sequence[int] = (32, 64), kernel_size: int = 5,
        hidden: Sequence[int] = (), activation: str = "relu",
        name: str = "cnn", negative_slope: float | None = None):
    """Conv ``kernel_size`` -> max-pool 2 blocks, then dense layers.

    Args:
      input_shape: ``(H, W, C)``.
      num_classes: number of output logits ``C >= 2``.
      filters: filters of each conv block (the paper: 32 then h).
      kernel_size: square kernel size of every conv ('valid' padding).
      hidden: optional dense layers before the output.
      activation: activation of convs and hidden dense layers.
      name: model name.
      negative_slope: as in :func:`mlp` (only with
        ``activation="leaky_relu"``): each conv and hidden dense layer is
        linear and followed by ``keras.layers.LeakyReLU(negative_slope)``
        (before the pooling); ``None`` keeps the string activation.

    Returns:
      A built ``keras.Sequential`` producing logits ``[B, C]``.

    Raises:
      TypeError / ValueError: for a bad argument, naming it.
    """
    input_shape = validate.int_sequence(input_shape, "input_shape")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got "
                         f"{input_shape!r}.")
    filters = validate.int_sequence(filters, "filters")
    # An empty (or None) ``hidden`` means no dense layer before the output.
    hidden = validate.int_sequence(hidden, "hidden") if hidden else ()
    num_classes = validate.integer(num_classes, "num_classes", minimum=2)
    negative_slope = _check_negative_slope(negative_slope, activation)
    layers = [keras.Input(input_shape)]
    for f in filters:
        layers += _activated(
            functools.partial(keras.layers.Conv2D, f, kernel_size),
            activation, negative_slope)
        layers.append(keras.layers.MaxPooling2D(2))
    layers.append(keras.layers.Flatten())
    for h in hidden:
        layers += _activated(functools.partial(keras.layers.Dense, h),
                             activation, negative_slope)
    layers.append(keras.layers.Dense(num_classes))
    return keras.Sequential(layers, name=name)
