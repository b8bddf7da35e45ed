"""Hand a posterior to other tools: a Keras 3 model or a TensorFlow SavedModel.

Attack libraries (ART, cleverhans, foolbox) take a model that maps inputs to
logits.  :func:`to_keras` bakes a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`
into such a model, and :func:`export` writes the same function as a
SavedModel for TF Serving or any TensorFlow runtime.  Both compute one of
:data:`OUTPUTS` from an input batch ``x`` ``[B, *input_shape]``:

* ``"log_predictive"``: ``log (1/S) sum_s softmax(f(x, w_s))``, ``[B, C]``.
  Its softmax is the posterior predictive (it is already normalised), so a
  cross-entropy "from logits" on it is the predictive loss
  ``-log p(y | x, D)``, and an attack library's gradient of it is
  :func:`~tfp_bnn_adv.gradients.predictive_loss_gradient`.  Hand this one
  to an attack library.
* ``"mean_logits"``: ``(1/S) sum_s f(x, w_s)``, ``[B, C]`` (not the
  predictive: a mean of logits is not a mean of probabilities).
* ``"logits_stack"``: every sample's logits, ``[B, S, C]``, batch first as
  Keras needs.

The sample axis is walked in chunks of ``chunk_size`` samples inside the
graph (:func:`tfp_bnn_adv.chunking.fold_sample_chunks`), so a large posterior
never holds all ``S`` sets of activations at once.  The model depends on the
network only through ``Network.apply_stack`` and its config, so every network
the package imports exports.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Sequence

import keras
import tensorflow as tf

from tfp_bnn_adv import chunking
from tfp_bnn_adv import files
from tfp_bnn_adv import validate
from tfp_bnn_adv import xla
from tfp_bnn_adv.ensemble import DEFAULT_BATCH_SIZE
from tfp_bnn_adv.ensemble import check_ensemble
from tfp_bnn_adv.ensemble import log_predictive_graph
from tfp_bnn_adv.network import Network

__all__ = ["OUTPUTS", "to_keras", "export", "load_metadata", "output_graph",
           "PosteriorEnsembleLayer", "METADATA_FILE", "FORMAT_VERSION"]

OUTPUTS = ("log_predictive", "mean_logits", "logits_stack")
METADATA_FILE = "tfp_bnn_adv.json"
FORMAT_VERSION = 1
_FORMAT_NAME = "tfp_bnn_adv.ExportedEnsemble"


# ------------------------------------------------------------------- the graph
def _mean_logits(network, params, x, chunk_size):
    s = params[0].shape[0]

    def body(total, chunk):
        return total + tf.reduce_sum(network.apply_stack(chunk, x), axis=0)

    init = tf.zeros([tf.shape(x)[0], network.num_classes], tf.float32)
    return chunking.fold_sample_chunks(params, chunk_size, body, init) / s


def _logits_stack(network, params, x, chunk_size):
    stack = chunking.map_sample_chunks(
        params, chunk_size, lambda chunk: network.apply_stack(chunk, x))
    return tf.transpose(stack, [1, 0, 2])


_GRAPHS = {"log_predictive": log_predictive_graph, "mean_logits": _mean_logits,
           "logits_stack": _logits_stack}


def output_graph(network: Network, params: Sequence[tf.Tensor], x: tf.Tensor,
                 output: str, chunk_size: int) -> tf.Tensor:
    """One of :data:`OUTPUTS` of a weight stack; pure and traceable.

    Performs no validation (the public functions do).

    Args:
      network: the :class:`~tfp_bnn_adv.network.Network`.
      params: list of float32 tensors ``[S, *param_shapes[i]]`` with a
        static ``S``.
      x: float32 inputs ``[B, *input_shape]``.
      output: one of :data:`OUTPUTS`.
      chunk_size: samples per chunk (>= 1).

    Returns:
      float32 ``[B, C]`` for ``"log_predictive"`` and ``"mean_logits"``,
      ``[B, S, C]`` for ``"logits_stack"``.

    Example:
      >>> output_graph(net, ens.params, tf.zeros([2, 4]), "log_predictive",
      ...              chunk_size=2).shape
      TensorShape([2, 3])
    """
    return _GRAPHS[output](network, params, x, chunk_size)


def _check_output(output) -> str:
    return validate.choice(output, OUTPUTS, "output")


def _resolve_chunk(ensemble, chunk_size) -> int:
    """``chunk_size``, or the package default for a batch of the default size.

    The exported model's batch size is unknown when it is built; the default
    bounds memory for batches up to the package's default batch size.  It
    is the memory bound alone, without the CPU cache bound
    (:func:`tfp_bnn_adv.chunking.auto_chunk_size`): the chunk is saved with
    the model, which may run on another kind of device.
    """
    return ensemble.batch_and_chunk(DEFAULT_BATCH_SIZE, None, chunk_size,
                                    cache_bound=False)[1]


# ---------------------------------------------------------------- Keras model
@keras.saving.register_keras_serializable(package="tfp_bnn_adv")
class PosteriorEnsembleLayer(keras.layers.Layer):
    """A posterior ensemble as a Keras 3 layer with non-trainable weights.

    Holds the ``S`` weight sets as non-trainable weights ``param_i`` of shape
    ``[S, *param_shapes[i]]`` and computes :func:`output_graph`.  Built by
    :func:`to_keras`; its config holds the network's config, ``S``, the
    output and the chunk size, so ``model.save("m.keras")`` and
    ``keras.saving.load_model`` round-trip (with ``tfp_bnn_adv`` imported,
    which registers this class).

    Args:
      network: a :class:`~tfp_bnn_adv.network.Network`, or its
        ``get_config()`` dict.
      num_samples: ``S`` (>= 1).
      output: one of :data:`OUTPUTS`.
      chunk_size: samples per chunk (>= 1; capped at ``S``).
      **kwargs: Keras layer arguments (``name``, ...); the dtype is float32.

    Raises:
      TypeError: if ``network`` is neither a Network nor a dict, or a count
        is not an int.
      ValueError: for an unknown ``output`` or a count < 1.

    Example:
      >>> layer = PosteriorEnsembleLayer(net, 4, chunk_size=2)
      >>> y = layer(keras.Input(net.input_shape))          # [B, C]
      >>> layer.set_params(ens.params)
    """

    def __init__(self, network, num_samples: int,
                 output: str = "log_predictive", chunk_size: int = 1,
                 **kwargs):
        if isinstance(network, dict):
            network = Network.from_config(network)
        elif not isinstance(network, Network):
            raise TypeError(f"network must be a Network or its config dict, "
                            f"got {validate.type_name(network)}.")
        num_samples = validate.positive_int(num_samples, "num_samples")
        output = _check_output(output)
        chunk_size = validate.positive_int(chunk_size, "chunk_size")
        kwargs["dtype"] = "float32"
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.network = network
        self.num_samples = num_samples
        self.output_kind = output
        self.chunk_size = min(chunk_size, num_samples)
        self._params = []

    def build(self, input_shape):
        """Checks the input shape and creates the weights (zeros)."""
        if tuple(input_shape[1:]) != self.network.input_shape:
            raise ValueError(
                f"input_shape is {tuple(input_shape)}; the network expects "
                f"(batch, {', '.join(map(str, self.network.input_shape))}).")
        self._params = [
            self.add_weight(name=f"param_{i}",
                            shape=(self.num_samples,) + tuple(spec.shape),
                            initializer="zeros", trainable=False)
            for i, spec in enumerate(self.network.param_specs)]

    def set_params(self, params: Sequence) -> None:
        """Assigns a weight stack (list of ``[S, *param_shapes[i]]`` arrays)."""
        params = self.network.check_params(list(params), stacked=True)
        if params[0].shape[0] != self.num_samples:
            raise ValueError(f"params has {params[0].shape[0]} samples; the "
                             f"layer holds {self.num_samples}.")
        for v, p in zip(self._params, params):
            v.assign(p)

    def call(self, inputs):
        x = tf.convert_to_tensor(inputs, tf.float32)
        params = [tf.convert_to_tensor(v.value) for v in self._params]
        if tf.executing_eagerly():
            # Eager callers (an attack library's GradientTape) would otherwise
            # run the sample loop op by op in Python.
            key = ("export", self.output_kind, self.chunk_size)
            output, chunk = self.output_kind, self.chunk_size
            fn = xla.cached_function(
                self.network, key, lambda net: tf.function(
                    lambda p, xb: output_graph(net, p, xb, output, chunk),
                    reduce_retracing=True))
            return fn(params, x)
        return output_graph(self.network, params, x, self.output_kind,
                            self.chunk_size)

    def compute_output_shape(self, input_shape):
        c = self.network.num_classes
        if self.output_kind == "logits_stack":
            return (input_shape[0], self.num_samples, c)
        return (input_shape[0], c)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(network=self.network.get_config(),
                      num_samples=self.num_samples, output=self.output_kind,
                      chunk_size=self.chunk_size)
        return config


def to_keras(ensemble, output: str = "log_predictive", *,
             chunk_size: int | None = None) -> keras.Model:
    """The ensemble as a Keras 3 model: inputs in, one of :data:`OUTPUTS` out.

    With the default ``output="log_predictive"`` the model returns the
    logits an attack library should see: their softmax is the posterior
    predictive ``(1/S) sum_s softmax(f(x, w_s))``, and a cross-entropy
    ``from_logits=True`` on them is the predictive loss ``-log p(y | x, D)``,
    so the library's gradient is
    :func:`~tfp_bnn_adv.gradients.predictive_loss_gradient` and its FGSM is
    ``attacks.fgsm(..., gradient="predictive")``.

    The weights are non-trainable weights of one
    :class:`PosteriorEnsembleLayer`; ``model.save("m.keras")`` and
    ``keras.saving.load_model("m.keras")`` round-trip when ``tfp_bnn_adv``
    is imported.

    Args:
      ensemble: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` with ``S``
        samples.
      output: ``"log_predictive"`` (``[B, C]``), ``"mean_logits"``
        (``[B, C]``) or ``"logits_stack"`` (``[B, S, C]``).
      chunk_size: posterior samples per chunk inside the model (memory);
        ``None`` picks the package's default for a batch of 512 inputs.

    Returns:
      A ``keras.Model`` with one float32 input ``x`` ``[B, *input_shape]``
      and one float32 output named after ``output``.

    Raises:
      TypeError: if ``ensemble`` is not a PosteriorEnsemble or
        ``chunk_size`` not an int.
      ValueError: for an unknown ``output`` or ``chunk_size < 1``.

    Example:
      >>> model = to_keras(ens)                     # log predictive, [B, C]
      >>> np.allclose(np.exp(model(x)), ens.predict_proba(x), atol=1e-6)
      True
    """
    check_ensemble(ensemble)
    output = _check_output(output)
    chunk = _resolve_chunk(ensemble, chunk_size)
    network = ensemble.network
    layer = PosteriorEnsembleLayer(network, ensemble.num_samples,
                                   output=output, chunk_size=chunk, name=output)
    inputs = keras.Input(shape=network.input_shape, dtype="float32", name="x")
    model = keras.Model(inputs, layer(inputs), name="posterior_ensemble")
    layer.set_params(ensemble.params)
    return model


# ----------------------------------------------------------------- SavedModel
class _Serving(tf.Module):
    """The SavedModel's root: the weights as variables and the signature."""

    def __init__(self, network: Network, params, output: str, chunk: int):
        super().__init__(name="tfp_bnn_adv_ensemble")
        variables = [tf.Variable(p, trainable=False, name=f"param_{i}")
                     for i, p in enumerate(params)]
        self.params = variables
        spec = tf.TensorSpec([None, *network.input_shape], tf.float32,
                             name="x")

        @tf.function(input_signature=[spec])
        def serve(x):
            values = [tf.convert_to_tensor(v) for v in variables]
            return {output: output_graph(network, values, x, output, chunk)}

        self.serve = serve


def _metadata(ensemble, output: str, chunk: int) -> dict[str, Any]:
    network = ensemble.network
    return {"format": _FORMAT_NAME, "format_version": FORMAT_VERSION,
            "signature": {"name": "serving_default", "input": "x",
                          "output": output},
            "output": output, "chunk_size": chunk,
            "num_samples": ensemble.num_samples,
            "input_shape": list(network.input_shape),
            "num_classes": network.num_classes,
            "network": network.get_config(),
            "param_names": [s.name for s in network.param_specs],
            "param_shapes": [list(s.shape) for s in network.param_specs],
            "metadata": ensemble.metadata}


def _move_into_place(tmp: str, path: str) -> None:
    """Renames the finished directory ``tmp`` to ``path``.

    A missing or empty ``path`` is replaced in one rename.  An existing
    one (``overwrite``) is first renamed aside and deleted only once the
    new one is in place, so a failure leaves the old export.
    """
    if not os.path.isdir(path) or not os.listdir(path):
        os.replace(tmp, path)
        return
    old = tempfile.mkdtemp(prefix=os.path.basename(tmp) + ".", suffix=".old",
                           dir=os.path.dirname(tmp))
    old_path = os.path.join(old, "export")
    os.rename(path, old_path)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old_path, path)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def export(ensemble, path, *, output: str = "log_predictive",
           chunk_size: int | None = None, overwrite: bool = False) -> str:
    """Writes the ensemble's function as a TensorFlow SavedModel.

    The SavedModel has a ``serving_default`` signature taking ``x`` float32
    ``[None, *input_shape]`` and returning ``{output: tensor}`` (the tensors
    of :func:`to_keras`), the weights as non-trainable ``tf.Variable``\\ s,
    and ``assets/tfp_bnn_adv.json``: the network's Keras config, ``S``, the
    output, the chunk size, the parameter names and shapes and the
    ensemble's metadata (JSON, never pickle; :func:`load_metadata` reads
    it).  Load it with ``tf.saved_model.load(path)``, with no need for
    ``tfp_bnn_adv``.

    The export is written into a temporary sibling directory and renamed
    into place, so ``path`` never holds a half-written SavedModel.

    Args:
      ensemble: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` with ``S``
        samples.
      path: the SavedModel directory; missing or empty, unless
        ``overwrite``.
      output: one of :data:`OUTPUTS`.
      chunk_size: posterior samples per chunk in the graph; ``None`` as in
        :func:`to_keras`.
      overwrite: replace an existing non-empty ``path``.

    Returns:
      ``path``.

    Raises:
      TypeError: for a bad ``ensemble``, ``path``, ``chunk_size`` or a
        non-bool ``overwrite``.
      ValueError: for an unknown ``output``, ``chunk_size < 1``, or a
        ``path`` that is a file or lies in an unwritable directory.
      FileExistsError: if ``path`` is a non-empty directory and not
        ``overwrite``.

    Example:
      >>> export(ens, "/tmp/bnn_savedmodel")
      >>> serve = tf.saved_model.load("/tmp/bnn_savedmodel").signatures[
      ...     "serving_default"]
      >>> serve(x=tf.constant(x_test))["log_predictive"].shape   # [B, C]
    """
    check_ensemble(ensemble)
    path = validate.directory(path, "path")
    output = _check_output(output)
    chunk = _resolve_chunk(ensemble, chunk_size)
    validate.instance(overwrite, bool, "overwrite")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"path={path!r} is a non-empty directory; pass "
                              "overwrite=True to replace it.")
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                           dir=parent)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            meta_path = os.path.join(scratch, METADATA_FILE)
            files.write_json(meta_path, _metadata(ensemble, output, chunk))
            module = _Serving(ensemble.network, ensemble.params, output, chunk)
            module.metadata = tf.saved_model.Asset(meta_path)
            tf.saved_model.save(module, tmp,
                                signatures={"serving_default": module.serve})
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_metadata(path) -> dict[str, Any]:
    """The JSON record :func:`export` wrote into a SavedModel's assets.

    Args:
      path: a directory written by :func:`export`.

    Returns:
      A dict with ``format``, ``format_version``, ``signature``, ``output``,
      ``chunk_size``, ``num_samples``, ``input_shape``, ``num_classes``,
      ``network`` (``Network.from_config`` rebuilds it), ``param_names``,
      ``param_shapes`` and the ensemble's ``metadata``.

    Raises:
      FileNotFoundError: if ``path`` holds no such record.
      ValueError: if the record is not valid JSON or not an export's.
    """
    meta_path = os.path.join(os.fspath(path), "assets", METADATA_FILE)
    meta = files.read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME:
        raise ValueError(f"{meta_path!r} is not a tfp_bnn_adv export record.")
    return meta
