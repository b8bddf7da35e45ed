"""Mean-field variational inference with TensorFlow Probability's Keras layers.

:func:`fit` takes the same Keras 3 classifier that
:meth:`~tfp_bnn_adv.network.Network.from_keras` accepts, builds its variational
counterpart from ``tfp.layers`` (which are ``tf_keras``, i.e. Keras 2, layers)
and trains it with ``tf_keras`` ``fit``.  The result, a :class:`VIPosterior`,
draws ``S`` full weight sets from the trained posterior into a
:class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` in the Network's parameter
layout, so gradients and attacks treat VI exactly like HMC.

The variational model, layer by layer:

* ``Dense``  -> ``tfp.layers.DenseFlipout`` (``DenseReparameterization`` with
  ``estimator="reparameterization"``);
* ``Conv2D`` -> ``tfp.layers.Convolution2DFlipout`` (or
  ``Convolution2DReparameterization``);
* pooling, ``Flatten``, ``Reshape``, ``Activation``, ``ReLU``, ``LeakyReLU``
  and ``Dropout`` -> the ``tf_keras`` layer of the same name and settings.
  Activations are the user's own Keras 3 activation functions, so the
  variational model computes exactly what the Keras model and the
  :class:`Network` compute.

A final softmax is dropped, as in :class:`Network`: the variational model
outputs logits and the loss is a cross-entropy *from logits*, so softmax is
applied once.

The variational family: every kernel **and** bias gets a prior
``N(0, prior_scale**2)`` (independent per scalar) and a mean-field normal
posterior ``N(loc, softplus(rho)**2)``.  ``loc`` starts at a draw from the
Keras initialiser of the user's layer (stateless, from ``seed``), ``rho`` at
``softplus^-1(init_scale)``, the same for every weight.

The training loss is the negative ELBO **per training point**::

    loss = mean_b[-log p(y_b | x_b, w)] + kl_weight * KL(q || p) / N,

with ``w`` drawn from ``q`` by the layers (Flipout or reparameterization), the
mean over the ``B`` examples of the mini-batch and ``N`` the number of
training points (after any validation split).  Its expectation over
mini-batches is ``-ELBO / N``; ``kl_weight = 1`` is the ELBO itself.  The KL
term enters through ``model.losses``, which ``tf_keras`` ``compile``/``fit``
add to the loss in the compiled training step.

Determinism: the initial ``loc`` and every :meth:`VIPosterior.sample_ensemble`
draw are stateless functions of their seeds.  The ``tfp.layers`` draw their
noise with TensorFlow's stateful RNG, so :func:`fit` and
:meth:`VIPosterior.predict_proba_flipout` seed the global RNGs
(``tf_keras.utils.set_random_seed``: Python, NumPy and TensorFlow) and give
every layer a fixed op seed; on the same machine and TensorFlow build, the
same seed gives the same trained posterior.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from tfp_bnn_adv import files
from tfp_bnn_adv import seeds as seeds_lib
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.network import Network
from tfp_bnn_adv.network import check_positive_int

__all__ = ["fit", "VIPosterior", "ESTIMATORS", "DEFAULT_INIT_SCALE",
           "FORMAT_VERSION"]

ESTIMATORS = ("flipout", "reparameterization")
# Small enough that the initial posterior acts almost like the Keras network
# it starts from (logit noise ~1e-2 x input norm), large enough that the
# softplus gradient of the scale is not vanishingly small.
DEFAULT_INIT_SCALE = 1e-2
FORMAT_VERSION = 1
_FORMAT_NAME = "tfp_bnn_adv.VIPosterior"
_PARAM_LAYERS = ("Dense", "Conv2D")


# --------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------
def _check_positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def _check_seed_int(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}.")
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed!r}.")
    return int(seed)


def _check_estimator(estimator) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got "
                         f"{estimator!r}.")
    return estimator


# --------------------------------------------------------------------------
# The variational model.
# --------------------------------------------------------------------------
def _flatten_layers(model) -> list:
    """Keras 3 layers in execution order, nested models expanded.

    :meth:`Network.from_keras` has already checked that the model is a chain
    of supported layers, so this order is the Network's order.
    """
    import keras  # pylint: disable=g-import-not-at-top
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(_flatten_layers(layer))
        elif type(layer).__name__ != "InputLayer":
            out.append(layer)
    return out


def _mean_field_normal_fn(untransformed_scale: float):
    """A ``tfp.layers`` posterior builder: ``N(loc, softplus(rho)^2)``.

    ``loc`` starts at zero and is overwritten right after the model is built
    (:meth:`VIPosterior._assign`), which keeps the Keras-initialiser draw
    stateless and in the Network's layout.
    """
    import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top
    import tf_keras  # pylint: disable=g-import-not-at-top

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
    import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top

    def fn(dtype, shape, name, trainable, add_variable_fn):
        del name, trainable, add_variable_fn  # the prior has no variables
        return tfp.distributions.Independent(
            tfp.distributions.Normal(loc=tf.zeros(shape, dtype),
                                     scale=tf.cast(prior_scale, dtype)),
            reinterpreted_batch_ndims=len(shape))

    return fn


def _divergence_fn(weight: float):
    """Analytic ``KL(q || p)`` times ``weight`` (``kl_weight / N``)."""
    import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top

    def fn(posterior, prior, sample):
        del sample  # the Normal-Normal KL is exact, no Monte Carlo needed
        return tfp.distributions.kl_divergence(posterior, prior) * weight

    return fn


def _build_variational_model(network: Network, *, estimator: str,
                             prior_scale: float, kl_weight: float,
                             num_train: int, seed: int):
    """The ``tf_keras`` variational counterpart of ``network.keras_model``.

    Returns:
      ``(model, variational_layers)``: a built ``tf_keras.Sequential`` that
      maps ``[B, *input_shape]`` to logits ``[B, C]``, and its ``tfp.layers``
      in the Network's parameter order.
    """
    import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top
    import tf_keras  # pylint: disable=g-import-not-at-top

    flipout = estimator == "flipout"
    layers = _flatten_layers(network.keras_model)
    layer_seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(
        len(layers), dtype=np.uint32) % (2**31)]
    common = dict(
        kernel_posterior_fn=_mean_field_normal_fn(0.0),
        kernel_prior_fn=_prior_fn(prior_scale),
        kernel_divergence_fn=_divergence_fn(kl_weight / num_train),
    )
    out = [tf_keras.Input(network.input_shape)]
    variational = []
    for k, layer in enumerate(layers):
        cls = type(layer).__name__
        last = k == len(layers) - 1
        activation = getattr(layer, "activation", None)
        if last and network.stripped_output_activation is not None:
            if cls == "Activation":
                continue
            activation = None
        if cls in _PARAM_LAYERS:
            kwargs = dict(common)
            if layer.use_bias:
                kwargs.update(bias_posterior_fn=_mean_field_normal_fn(0.0),
                              bias_prior_fn=_prior_fn(prior_scale),
                              bias_divergence_fn=_divergence_fn(
                                  kl_weight / num_train))
            else:
                kwargs.update(bias_posterior_fn=None, bias_prior_fn=None)
            if flipout:
                kwargs["seed"] = layer_seeds[k]
            if cls == "Dense":
                make = (tfp.layers.DenseFlipout if flipout
                        else tfp.layers.DenseReparameterization)
                new = make(int(layer.units), activation=activation,
                           name=layer.name, **kwargs)
            else:
                make = (tfp.layers.Convolution2DFlipout if flipout
                        else tfp.layers.Convolution2DReparameterization)
                new = make(int(layer.filters), tuple(layer.kernel_size),
                           strides=tuple(layer.strides), padding=layer.padding,
                           dilation_rate=tuple(layer.dilation_rate),
                           activation=activation, name=layer.name, **kwargs)
            variational.append(new)
        elif cls in ("MaxPooling2D", "AveragePooling2D"):
            make = getattr(tf_keras.layers, cls)
            new = make(pool_size=tuple(layer.pool_size),
                       strides=(tuple(layer.strides) if layer.strides is not None
                                else None),
                       padding=layer.padding, name=layer.name)
        elif cls == "Flatten":
            new = tf_keras.layers.Flatten(name=layer.name)
        elif cls == "Reshape":
            new = tf_keras.layers.Reshape(tuple(layer.target_shape),
                                          name=layer.name)
        elif cls == "Activation":
            new = tf_keras.layers.Activation(activation, name=layer.name)
        elif cls == "ReLU":
            new = tf_keras.layers.ReLU(
                max_value=layer.max_value, negative_slope=layer.negative_slope,
                threshold=layer.threshold, name=layer.name)
        elif cls == "LeakyReLU":
            new = tf_keras.layers.LeakyReLU(alpha=layer.negative_slope,
                                            name=layer.name)
        elif cls == "Dropout":
            new = tf_keras.layers.Dropout(layer.rate, seed=layer_seeds[k],
                                          name=layer.name)
        else:
            # Network.from_keras accepts exactly the layers handled above.
            raise ValueError(f"Layer {layer.name!r} ({cls}) has no variational "
                             "counterpart in tfp_bnn_adv.inference.vi.")
        out.append(new)
    with warnings.catch_warnings():
        # tfp.layers create their variables through the deprecated
        # Layer.add_variable; the warning is TFP's, not the user's.
        warnings.filterwarnings("ignore", message=".*add_variable.*")
        model = tf_keras.Sequential(out, name=network.keras_model.name + "_vi")
    return model, variational


def _posteriors(variational_layers) -> list:
    """The layers' posterior distributions in the Network's parameter order."""
    out = []
    for layer in variational_layers:
        out.append(layer.kernel_posterior)
        if layer.bias_posterior is not None:
            out.append(layer.bias_posterior)
    return out


def _priors(variational_layers) -> list:
    out = []
    for layer in variational_layers:
        out.append(layer.kernel_prior)
        if layer.bias_prior is not None:
            out.append(layer.bias_prior)
    return out


# --------------------------------------------------------------------------
# The trained posterior.
# --------------------------------------------------------------------------
class VIPosterior:
    """A mean-field normal posterior held by ``tfp.layers`` variational layers.

    Every parameter tensor ``i`` of the Network (kernel then bias per layer)
    has a posterior ``N(loc[i], scale[i]**2)`` per scalar, of shape
    ``network.param_shapes[i]``.  Build one with :func:`fit`, directly from
    ``loc``/``scale`` lists, or with :meth:`load`.

    Args:
      network: the :class:`Network` (or a Keras 3 model to import).
      loc: list of float arrays, ``loc[i]`` of shape ``param_shapes[i]``.
      scale: list of float arrays of the same shapes, every entry finite and
        ``> 0``.
      estimator: ``"flipout"`` or ``"reparameterization"`` (the layers' own
        gradient estimator, used by :func:`fit` and
        :meth:`predict_proba_flipout`).
      prior_scale: standard deviation of the ``N(0, prior_scale**2)`` prior on
        every weight and bias.
      kl_weight: multiplier of ``KL / num_train`` in the training loss.
      num_train: ``N``, the number of training points the KL is divided by.
      seed: int seeding the layers' op-level RNG seeds.

    Attributes:
      network: the :class:`Network`.
      variational_model: the ``tf_keras`` model of ``tfp.layers`` (logits out).
      settings: JSON-able dict of the settings above plus, after :func:`fit`,
        the training settings.
      history: dict ``metric -> list`` per epoch (``loss``, ``accuracy``, and
        ``val_*`` with validation data); empty if not trained.

    Raises:
      TypeError / ValueError: for a bad argument, naming it.

    Example:
      >>> post = vi.fit(keras_model, x_train, y_train, epochs=5)
      >>> ens = post.sample_ensemble(100, seed=0)      # S = 100 weight sets
      >>> ens.predict_proba(x_test).shape              # [B, C]
      >>> post.posterior_scale()[0].shape              # first kernel's scale
    """

    def __init__(self, network, loc: Sequence, scale: Sequence, *,
                 estimator: str = "flipout", prior_scale: float = 1.0,
                 kl_weight: float = 1.0, num_train: int = 1, seed: int = 0):
        if not isinstance(network, Network):
            network = Network.from_keras(network)
        loc = [t.numpy() for t in network.check_params(loc, stacked=False,
                                                       name="loc")]
        scale = [t.numpy() for t in network.check_params(scale, stacked=False,
                                                         name="scale")]
        for i, (m, s) in enumerate(zip(loc, scale)):
            name = network.param_specs[i].name
            if not np.all(np.isfinite(m)):
                raise ValueError(f"loc for {name!r} holds NaN or infinite values.")
            if not np.all(np.isfinite(s)) or np.any(s <= 0):
                raise ValueError(f"scale for {name!r} must be finite and > 0 "
                                 f"everywhere; its minimum is {s.min()!r}.")
        self.network = network
        self.settings = {
            "estimator": _check_estimator(estimator),
            "prior_scale": _check_positive_float(prior_scale, "prior_scale"),
            "kl_weight": _check_positive_float(kl_weight, "kl_weight"),
            "num_train": check_positive_int(num_train, "num_train"),
            "seed": _check_seed_int(seed),
        }
        self.history: dict[str, list] = {}
        self.variational_model, self._layers = _build_variational_model(
            network, estimator=estimator, prior_scale=self.settings["prior_scale"],
            kl_weight=self.settings["kl_weight"],
            num_train=self.settings["num_train"], seed=self.settings["seed"])
        self._assign(loc, scale)

    def _assign(self, loc, scale) -> None:
        import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top
        for dist, m, s in zip(_posteriors(self._layers), loc, scale):
            normal = dist.distribution
            normal.loc.assign(m)
            normal.scale.pretransformed_input.assign(
                tfp.math.softplus_inverse(tf.constant(s, tf.float32)))

    # ------------------------------------------------------------- the posterior
    def posterior_loc(self) -> list[np.ndarray]:
        """Posterior means, float32 arrays of shapes ``network.param_shapes``."""
        return [dist.distribution.loc.numpy() for dist in _posteriors(self._layers)]

    def posterior_scale(self) -> list[np.ndarray]:
        """Posterior standard deviations ``softplus(rho)``, same layout."""
        return [tf.convert_to_tensor(dist.distribution.scale).numpy()
                for dist in _posteriors(self._layers)]

    def kl_divergence(self) -> float:
        """``KL(q || p)`` summed over every weight and bias (not divided by N)."""
        import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top
        return float(sum(tfp.distributions.kl_divergence(q, p).numpy()
                         for q, p in zip(_posteriors(self._layers),
                                         _priors(self._layers))))

    def sample_ensemble(self, num_samples: int, seed=0) -> PosteriorEnsemble:
        """Draws ``S`` full weight sets from the posterior.

        Every parameter tensor is drawn at once as
        ``loc + scale * stateless_normal([S, *shape])``, an exact draw from
        the mean-field posterior; the same seed gives the same ensemble.

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
        num_samples = check_positive_int(num_samples, "num_samples")
        seed = seeds_lib.stateless(seed)
        dists = _posteriors(self._layers)
        params = []
        for dist, s in zip(dists, tf.unstack(seeds_lib.split(seed, len(dists)))):
            loc = tf.convert_to_tensor(dist.distribution.loc)
            scale = tf.convert_to_tensor(dist.distribution.scale)
            eps = tf.random.stateless_normal([num_samples] + loc.shape.as_list(),
                                             s, dtype=tf.float32)
            params.append(loc + scale * eps)
        metadata = {"method": "vi", "settings": dict(self.settings),
                    "sample_seed": [int(v) for v in seed.numpy()]}
        return PosteriorEnsemble(self.network, params, metadata=metadata)

    def predict_proba_flipout(self, x, num_samples: int = 100, seed: int = 0, *,
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
          seed: int; seeds the global RNGs (``tf_keras.utils.set_random_seed``:
            Python, NumPy, TensorFlow) before the passes, so the same seed
            gives the same result.
          batch_size: inputs per forward pass.

        Returns:
          float32 numpy array ``[B, C]``; rows sum to 1.

        Raises:
          TypeError / ValueError: for a bad argument.
        """
        import tf_keras  # pylint: disable=g-import-not-at-top
        num_samples = check_positive_int(num_samples, "num_samples")
        batch_size = check_positive_int(batch_size, "batch_size")
        seed = _check_seed_int(seed)
        x, _ = self.network.check_inputs(x)
        model = self.variational_model

        def passes(xb):
            def body(i, total):
                return i + 1, total + tf.nn.softmax(model(xb, training=False))

            init = tf.zeros([tf.shape(xb)[0], self.network.num_classes])
            # One pass at a time: concurrent passes would take their stateful
            # noise in a racy order, and the result would not be repeatable.
            return tf.while_loop(lambda i, _: i < num_samples, body,
                                 (tf.constant(0), init),
                                 parallel_iterations=1)[1] / num_samples

        # A fresh function per call: its stateful RNG ops are created after
        # the seeding, so the same seed replays the same noise.
        tf_keras.utils.set_random_seed(seed)
        fn = tf.function(passes, autograph=False)
        return np.concatenate([fn(x[i:i + batch_size]).numpy()
                               for i in range(0, x.shape[0], batch_size)])

    def __repr__(self) -> str:
        return (f"VIPosterior(estimator={self.settings['estimator']!r}, "
                f"prior_scale={self.settings['prior_scale']}, {self.network!r})")

    # ------------------------------------------------------------ save / load
    def save(self, path: str) -> None:
        """Saves to one ``.npz`` file, atomically, with no pickle.

        Stores ``loc_i`` and ``scale_i`` float32 arrays per parameter tensor,
        the Keras model's JSON config, the settings and the history.
        """
        loc, scale = self.posterior_loc(), self.posterior_scale()
        arrays = {f"loc_{i}": m for i, m in enumerate(loc)}
        arrays.update({f"scale_{i}": s for i, s in enumerate(scale)})
        meta = {"format": _FORMAT_NAME, "format_version": FORMAT_VERSION,
                "network": self.network.get_config(),
                "param_names": [s.name for s in self.network.param_specs],
                "param_shapes": [list(s) for s in self.network.param_shapes],
                "settings": self.settings, "history": self.history}
        files.save_arrays(path, arrays, meta)

    @classmethod
    def load(cls, path: str) -> "VIPosterior":
        """Loads a posterior written by :meth:`save`.

        Raises:
          FileNotFoundError: if ``path`` does not exist.
          ValueError: if the file is corrupt, not a VIPosterior, from a newer
            format, or its arrays or settings do not fit its architecture.
        """
        arrays, meta = files.load_arrays(path)
        if meta.get("format") != _FORMAT_NAME:
            raise ValueError(f"{path!r} is not a saved VIPosterior "
                             f"(format={meta.get('format')!r}).")
        if not isinstance(meta.get("format_version"), int) or (
                meta["format_version"] > FORMAT_VERSION):
            raise ValueError(f"{path!r} has format version "
                             f"{meta.get('format_version')!r}; this tfp_bnn_adv "
                             f"reads up to {FORMAT_VERSION}.")
        try:
            network = Network.from_config(meta["network"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path!r}: cannot rebuild the architecture: {e}") from e
        n = len(network.param_specs)
        expected = {f"{k}_{i}" for k in ("loc", "scale") for i in range(n)}
        if set(arrays) != expected:
            raise ValueError(f"{path!r}: expected arrays loc_0..loc_{n - 1} and "
                             f"scale_0..scale_{n - 1}, found {sorted(arrays)}.")
        settings = meta.get("settings")
        if not isinstance(settings, dict):
            raise ValueError(f"{path!r}: settings missing or not a dict.")
        known = ("estimator", "prior_scale", "kl_weight", "num_train", "seed")
        try:
            post = cls(network, [arrays[f"loc_{i}"] for i in range(n)],
                       [arrays[f"scale_{i}"] for i in range(n)],
                       **{k: settings[k] for k in known})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path!r}: arrays or settings do not fit the "
                             f"architecture: {e}") from e
        post.settings.update(settings)
        post.history = {str(k): list(v) for k, v in
                        dict(meta.get("history") or {}).items()}
        return post


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------
def _check_validation(validation_split, validation_data, patience, network):
    if isinstance(validation_split, bool) or not isinstance(
            validation_split, (int, float, np.number)) or not (
                0.0 <= validation_split < 1.0):
        raise ValueError(f"validation_split must be a number in [0, 1), got "
                         f"{validation_split!r}.")
    if validation_split and validation_data is not None:
        raise ValueError("Give validation_split or validation_data, not both.")
    if patience is not None:
        patience = check_positive_int(patience, "early_stopping_patience")
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
    return float(validation_split), validation_data, patience


def fit(model, train_x, train_y, *, epochs: int = 10, batch_size: int = 128,
        learning_rate: float = 1e-3, prior_scale: float = 1.0,
        init_scale: float = DEFAULT_INIT_SCALE, kl_weight: float = 1.0,
        estimator: str = "flipout", validation_split: float = 0.0,
        validation_data=None, early_stopping_patience: int | None = None,
        seed: int = 0, verbose: int = 1) -> VIPosterior:
    """Mean-field VI of a Keras classifier with ``tfp.layers`` and Keras fit.

    Minimises the per-datapoint negative ELBO
    ``mean_b[-log p(y_b | x_b, w)] + kl_weight * KL(q || p) / N``
    (``N`` = number of training points after the validation split; see the
    module docstring) with Adam, in a compiled ``tf_keras`` training step.

    Args:
      model: a built Keras 3 classifier (or a :class:`Network`) made of the
        layers :data:`~tfp_bnn_adv.network.SUPPORTED_LAYERS`; a final softmax
        is dropped (the variational model outputs logits).
      train_x: float inputs ``[N, *input_shape]``.
      train_y: int labels ``[N]`` in ``[0, C)``.
      epochs: maximum number of passes over the data, ``>= 1``.
      batch_size: mini-batch size ``B >= 1``.
      learning_rate: Adam learning rate ``> 0``.
      prior_scale: std of the ``N(0, prior_scale**2)`` prior on every weight
        and bias (the paper: 1).
      init_scale: initial posterior std of every weight and bias ``> 0``.
      kl_weight: multiplier of the KL term ``> 0`` (1 is the ELBO).
      estimator: ``"flipout"`` (default) or ``"reparameterization"``.
      validation_split: fraction in ``[0, 1)`` of the training data held out
        (a random subset drawn from ``seed``) for ``val_loss``/``val_accuracy``.
      validation_data: alternatively, a pair ``(x_val, y_val)``.  Never pass
        the test set: early stopping on it leaks it into training.
      early_stopping_patience: if set, stop when ``val_loss`` has not improved
        for this many epochs and restore the best posterior.
      seed: int; the initial ``loc`` (stateless draw from the Keras
        initialisers), the validation split, shuffling and the layers' noise.
      verbose: Keras progress display: 0 silent, 1 progress bar, 2 one line
        per epoch.

    Returns:
      The trained :class:`VIPosterior`; its ``history`` holds ``loss``,
      ``accuracy`` (and ``val_*``) per epoch, its ``settings`` every argument
      above plus ``epochs_run`` and ``train_seconds``.

    Raises:
      TypeError / ValueError: naming the argument, for a bad argument,
        unsupported layer (named with its class), or bad inputs/labels; all
        before any training.

    Example:
      >>> ds = data.half_moons(1000)
      >>> model = models.mlp((2,), 2, hidden=(64,))
      >>> post = vi.fit(model, ds.train_x, ds.train_y, epochs=100,
      ...               batch_size=64, learning_rate=1e-2, verbose=0)
      >>> post.sample_ensemble(100, seed=1).accuracy(ds.test_x, ds.test_y)
    """
    import tf_keras  # pylint: disable=g-import-not-at-top
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    learning_rate = _check_positive_float(learning_rate, "learning_rate")
    init_scale = _check_positive_float(init_scale, "init_scale")
    _check_positive_float(prior_scale, "prior_scale")
    _check_positive_float(kl_weight, "kl_weight")
    _check_estimator(estimator)
    seed = _check_seed_int(seed)
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}.")
    network = model if isinstance(model, Network) else Network.from_keras(model)
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

    tf_keras.utils.set_random_seed(seed)
    loc = network.init_params(seed)
    scale = [np.full(s, init_scale, np.float32) for s in network.param_shapes]
    post = VIPosterior(network, loc, scale, estimator=estimator,
                       prior_scale=prior_scale, kl_weight=kl_weight,
                       num_train=x.shape[0], seed=seed)
    vmodel = post.variational_model
    vmodel.compile(
        optimizer=tf_keras.optimizers.Adam(learning_rate=learning_rate),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    callbacks = []
    if patience is not None:
        callbacks.append(tf_keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=patience, restore_best_weights=True))
    logging.info("VI (%s): %d training points, %d parameters, up to %d epochs "
                 "of batch %d.", estimator, x.shape[0], network.num_params,
                 epochs, batch_size)
    start = time.perf_counter()
    hist = vmodel.fit(x, y, batch_size=batch_size, epochs=epochs,
                      validation_data=validation_data, shuffle=True,
                      callbacks=callbacks, verbose=verbose)
    seconds = time.perf_counter() - start
    post.history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    post.settings.update({
        "epochs": epochs, "batch_size": batch_size,
        "learning_rate": learning_rate, "init_scale": init_scale,
        "validation_split": validation_split,
        "validation_size": 0 if validation_data is None else len(validation_data[1]),
        "early_stopping_patience": patience,
        "epochs_run": len(post.history.get("loss", [])),
        "train_seconds": seconds})
    logging.info("VI done in %.1f s, %d epochs: final loss %.4f.", seconds,
                 post.settings["epochs_run"], post.history["loss"][-1])
    return post
