"""The paper's reference architectures as plain Keras 3 models.

Users can bring any model :meth:`Network.from_keras` accepts; these builders
give the architectures of Carbone et al. (2020): fully connected nets with
Leaky-ReLU hidden layers, and a small CNN (conv 5x5 -> pool -> conv 5x5 ->
pool -> dense).  Models output logits (no final softmax).
"""

from __future__ import annotations

from typing import Sequence

import keras

from tfp_bnn_adv import validate

__all__ = ["mlp", "cnn"]


def mlp(input_shape: Sequence[int], num_classes: int,
        hidden: Sequence[int] = (512,), activation: str = "leaky_relu",
        name: str = "mlp"):
    """A fully connected classifier, flattening its input first.

    Args:
      input_shape: shape of one example, e.g. ``(28, 28, 1)`` or ``(2,)``.
      num_classes: number of output logits ``C >= 2``.
      hidden: width of each hidden layer, e.g. ``(512, 512)``.
      activation: hidden activation (Keras name); the paper uses Leaky-ReLU.
      name: model name.

    Returns:
      A built ``keras.Sequential`` mapping ``[B, *input_shape]`` to logits
      ``[B, C]``.
    """
    input_shape = validate.int_sequence(input_shape, "input_shape")
    hidden = validate.int_sequence(hidden, "hidden")
    num_classes = validate.integer(num_classes, "num_classes", minimum=2)
    layers = [keras.Input(input_shape)]
    if len(input_shape) > 1:
        layers.append(keras.layers.Flatten())
    layers += [keras.layers.Dense(h, activation=activation) for h in hidden]
    layers.append(keras.layers.Dense(num_classes))
    return keras.Sequential(layers, name=name)


def cnn(input_shape: Sequence[int], num_classes: int,
        filters: Sequence[int] = (32, 64), kernel_size: int = 5,
        hidden: Sequence[int] = (), activation: str = "relu",
        name: str = "cnn"):
    """Conv ``kernel_size`` -> max-pool 2 blocks, then dense layers.

    Args:
      input_shape: ``(H, W, C)``.
      num_classes: number of output logits ``C >= 2``.
      filters: filters of each conv block (the paper: 32 then h).
      kernel_size: square kernel size of every conv ('valid' padding).
      hidden: optional dense layers before the output.
      activation: activation of convs and hidden dense layers.
      name: model name.

    Returns:
      A built ``keras.Sequential`` producing logits ``[B, C]``.
    """
    input_shape = validate.int_sequence(input_shape, "input_shape")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got "
                         f"{input_shape!r}.")
    filters = validate.int_sequence(filters, "filters")
    # An empty (or None) ``hidden`` means no dense layer before the output.
    hidden = validate.int_sequence(hidden, "hidden") if hidden else ()
    num_classes = validate.integer(num_classes, "num_classes", minimum=2)
    layers = [keras.Input(input_shape)]
    for f in filters:
        layers += [keras.layers.Conv2D(f, kernel_size, activation=activation),
                   keras.layers.MaxPooling2D(2)]
    layers.append(keras.layers.Flatten())
    layers += [keras.layers.Dense(h, activation=activation) for h in hidden]
    layers.append(keras.layers.Dense(num_classes))
    return keras.Sequential(layers, name=name)
