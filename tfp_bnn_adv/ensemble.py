"""A posterior held as a stack of weight sets with a leading sample axis ``S``.

HMC chains, variational samples, an SGD-trained network (``S = 1``) and a
deep ensemble (``S = K``) are all a :class:`PosteriorEnsemble`; gradients,
attacks and metrics only ever see this class.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from tfp_bnn_adv import chunking
from tfp_bnn_adv import files
from tfp_bnn_adv import validate
from tfp_bnn_adv import xla
from tfp_bnn_adv.network import Network

__all__ = ["PosteriorEnsemble", "FORMAT_VERSION", "predict_proba_graph",
           "log_predictive_graph",
           "check_ensemble"]

FORMAT_VERSION = 1
_FORMAT_NAME = "tfp_bnn_adv.PosteriorEnsemble"
DEFAULT_BATCH_SIZE = 512


def predict_proba_graph(network: Network, params, x, chunk_size: int):
    """Mean over samples of the per-sample softmax, chunked over ``S``.

    Pure and traceable: ``params`` ``[S, ...]``, ``x`` ``[B, ...]`` ->
    float32 ``[B, C]``.
    """
    s = params[0].shape[0]

    def body(total, chunk):
        return total + tf.reduce_sum(
            tf.nn.softmax(network.apply_stack(chunk, x)), axis=0)

    init = tf.zeros([tf.shape(x)[0], network.num_classes], tf.float32)
    return chunking.fold_sample_chunks(params, chunk_size, body, init) / s


# A finite stand-in for -inf in a running log-sum-exp: exp(_NEG - m) == 0.
_NEG = -1e30


def log_predictive_graph(network: Network, params, x, chunk_size: int):
    """``log (1/S) sum_s softmax f(x, w_s)``, float32 ``[B, C]``, chunked over ``S``.

    A running log-sum-exp of the per-sample log-softmax over sample chunks,
    so a class whose mean probability rounds to 0 or 1 in float32 keeps a
    finite, exact log-probability (and a gradient).  Pure and traceable.
    """
    s = params[0].shape[0]

    def body(lse, chunk):
        ls = tf.nn.log_softmax(network.apply_stack(chunk, x))
        return tf.reduce_logsumexp(
            tf.stack([lse, tf.reduce_logsumexp(ls, axis=0)]), axis=0)

    init = tf.fill([tf.shape(x)[0], network.num_classes],
                   tf.constant(_NEG, tf.float32))
    return chunking.fold_sample_chunks(params, chunk_size, body, init) - math.log(s)


def _check_finite(network: Network, params: Sequence[tf.Tensor]) -> None:
    """Raises naming every parameter tensor with NaN/inf values, and counts.

    One reduction per tensor and a single host sync for all of them.
    """
    counts = tf.stack([tf.math.count_nonzero(~tf.math.is_finite(p))
                       for p in params]).numpy()
    bad = [f"params[{i}] ({spec.name}, shape {tuple(p.shape)}): {int(c)} of "
           f"{int(np.prod(p.shape))} entries"
           for i, (p, spec, c) in enumerate(zip(params, network.param_specs,
                                                counts)) if c]
    if bad:
        raise ValueError(
            "params hold NaN or infinite values (a diverged sampler or "
            "optimiser, or values beyond the float32 range): "
            + "; ".join(bad) + ".")


class PosteriorEnsemble:
    """A network plus a stack of ``S`` weight sets.

    Attributes:
      network: the :class:`~tfp_bnn_adv.network.Network`.
      params: list of float32 tensors, ``params[i]`` of shape
        ``[S, *network.param_shapes[i]]``.
      metadata: a JSON-serialisable dict (method, settings, diagnostics),
        saved with the ensemble.

    Example:
      >>> ens = PosteriorEnsemble(net, net.init_params(seed=0, num_samples=10))
      >>> ens.num_samples
      10
      >>> ens.predict_proba(x_test).shape        # [B, C], mean softmax
      >>> ens[::2].num_samples                   # thinning
      5
    """

    def __init__(self, network: Network, params: Sequence, *,
                 metadata: Mapping[str, Any] | None = None):
        """Validates and stacks the weights.

        Args:
          network: the :class:`~tfp_bnn_adv.network.Network`.
          params: list of float tensors/arrays ``[S, *param_shapes[i]]``
            (converted to float32).
          metadata: a JSON-serialisable mapping, or None.

        Raises:
          TypeError: if ``network`` is not a Network, ``params`` not a list
            or ``metadata`` not a mapping.
          ValueError: if the shapes do not match the network, ``S = 0``, or
            a tensor holds NaN or infinite values (named, with their count;
            a diverged sampler or optimiser, or values beyond the float32
            range).
        """
        validate.instance(network, Network, "network")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping or None, got "
                            f"{type(metadata).__name__}.")
        params = network.check_params(params, stacked=True)
        if params[0].shape[0] == 0:
            raise ValueError("params has an empty sample axis (S = 0).")
        _check_finite(network, params)
        self.network = network
        self.params = params
        self.metadata = dict(metadata or {})

    @classmethod
    def _from_checked(cls, network: Network, params: list,
                      metadata: Mapping[str, Any]) -> "PosteriorEnsemble":
        """An ensemble of weights selected from a validated one, unchecked.

        Slicing cannot make finite weights non-finite, so it skips the
        finiteness reduction over every parameter.
        """
        ens = cls.__new__(cls)
        ens.network, ens.params, ens.metadata = network, params, dict(metadata)
        return ens

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_params(cls, network: Network, params: Sequence, **kwargs
                    ) -> "PosteriorEnsemble":
        """An ensemble of size 1 from one (unstacked) weight set."""
        params = network.check_params(params, stacked=False)
        return cls(network, [p[None] for p in params], **kwargs)

    @classmethod
    def from_keras(cls, model, **kwargs) -> "PosteriorEnsemble":
        """A deterministic Keras model's current weights as an ensemble of 1."""
        network = Network.from_keras(model)
        weights = [w.numpy() if hasattr(w, "numpy") else np.asarray(w)
                   for w in model.trainable_weights]
        return cls.from_params(network, weights, **kwargs)

    @classmethod
    def concatenate(cls, ensembles: Sequence["PosteriorEnsemble"], **kwargs
                    ) -> "PosteriorEnsemble":
        """Joins ensembles of the same architecture along the sample axis."""
        ensembles = list(ensembles)
        if not ensembles:
            raise ValueError("ensembles is empty.")
        first = ensembles[0]
        for i, e in enumerate(ensembles[1:], 1):
            if e.network.param_shapes != first.network.param_shapes:
                raise ValueError(f"ensembles[{i}] has a different architecture "
                                 "from ensembles[0].")
        params = [tf.concat([e.params[i] for e in ensembles], axis=0)
                  for i in range(len(first.params))]
        kwargs.setdefault("metadata", first.metadata)
        return cls(first.network, params, **kwargs)

    # ---------------------------------------------------------------- the stack
    @property
    def num_samples(self) -> int:
        """The number ``S`` of weight sets."""
        return int(self.params[0].shape[0])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index) -> "PosteriorEnsemble":
        """Selects samples: an int (ensemble of 1), a slice or index array."""
        s = self.num_samples
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            if not -s <= index < s:
                raise IndexError(f"sample index {index} out of range for S={s}.")
            idx = np.array([index % s])
        elif isinstance(index, slice):
            idx = np.arange(s)[index]
        else:
            idx = np.asarray(index)
            if idx.dtype == bool:
                if idx.shape != (s,):
                    raise IndexError(f"boolean index has shape {idx.shape}; "
                                     f"expected ({s},).")
                idx = np.nonzero(idx)[0]
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise IndexError(f"index must be an int, slice or 1-D integer "
                                 f"array, got {index!r}.")
            if idx.size and (idx.min() < -s or idx.max() >= s):
                raise IndexError(f"sample index out of range for S={s}.")
            idx = idx % s
        if idx.size == 0:
            raise IndexError(f"index {index!r} selects no samples.")
        params = [tf.gather(p, idx) for p in self.params]
        return PosteriorEnsemble._from_checked(self.network, params,
                                               self.metadata)

    def thin(self, every: int) -> "PosteriorEnsemble":
        """Keeps every ``every``-th sample (``every >= 1``)."""
        return self[::validate.positive_int(every, "every")]

    def __repr__(self) -> str:
        method = self.metadata.get("method", "?")
        return (f"PosteriorEnsemble(S={self.num_samples}, method={method!r}, "
                f"{self.network!r})")

    # -------------------------------------------------------------- prediction
    def batch_and_chunk(self, n: int, batch_size, chunk_size, *,
                        cache_bound: bool = True) -> tuple[int, int]:
        """Validated batch size and sample-chunk size for ``n`` inputs.

        ``chunk_size=None`` picks one (:func:`tfp_bnn_adv.chunking.
        auto_chunk_size`): the memory bound, and with ``cache_bound`` the
        host's cache bound (:func:`tfp_bnn_adv.chunking.host_cache_budget`).
        Computations that take an extra pass over the stack when it is
        split in chunks pass ``cache_bound=False``.
        """
        if batch_size is None:
            batch_size = min(n, DEFAULT_BATCH_SIZE)
        batch_size = validate.positive_int(batch_size, "batch_size")
        chunk_size = chunking.check_chunk_size(chunk_size)
        if chunk_size is None:
            chunk_size = chunking.auto_chunk_size(
                self.network, self.num_samples, min(n, batch_size),
                cache_budget=(chunking.host_cache_budget() if cache_bound
                              else None))
        return batch_size, min(chunk_size, self.num_samples)

    def logits(self, x, *, batch_size: int | None = None,
               jit_compile=None) -> np.ndarray:
        """Per-sample logits.

        Args:
          x: inputs ``[B, *input_shape]``.
          batch_size: inputs per compiled call (the last batch is padded).
          jit_compile: see :func:`tfp_bnn_adv.xla.compile_fn`.

        Returns:
          float32 numpy array ``[S, B, C]``.
        """
        x, _ = self.network.check_inputs(x)
        batch_size, _ = self.batch_and_chunk(x.shape[0], batch_size, None)
        fn = xla.cached_function(
            self.network, ("logits", jit_compile), lambda net: xla.compile_fn(
                lambda p, xb: net.apply_stack(p, xb), jit_compile, "logits"))
        return chunking.map_batches(lambda xb: fn(self.params, xb), [x],
                                    batch_size, batch_axis=[1])

    def predict_proba(self, x, *, batch_size: int | None = None,
                      chunk_size: int | None = None, jit_compile=None
                      ) -> np.ndarray:
        """Posterior predictive ``(1/S) sum_s softmax(f(x, w_s))``.

        Args:
          x: inputs ``[B, *input_shape]``.
          batch_size: inputs per compiled call.
          chunk_size: samples per chunk inside the call (memory bound).
          jit_compile: see :func:`tfp_bnn_adv.xla.compile_fn`.

        Returns:
          float32 numpy array ``[B, C]``; rows sum to 1.
        """
        x, _ = self.network.check_inputs(x)
        batch_size, chunk = self.batch_and_chunk(x.shape[0], batch_size, chunk_size)
        return predict_proba_checked(self, x, batch_size, chunk, jit_compile)

    def predict(self, x, **kwargs) -> np.ndarray:
        """Predicted classes ``argmax_c p(c | x, D)``, int64 ``[B]``."""
        return np.argmax(self.predict_proba(x, **kwargs), axis=-1)

    def accuracy(self, x, y, **kwargs) -> float:
        """Accuracy of the posterior-predictive classifier on ``(x, y)``."""
        _, y = self.network.check_inputs(x, y)
        return float(np.mean(self.predict(x, **kwargs) == y.numpy()))

    # ------------------------------------------------------------------ export
    def to_keras(self, output: str = "log_predictive", *,
                 chunk_size: int | None = None):
        """The ensemble as a Keras 3 model, for attack libraries.

        A thin delegate to :func:`tfp_bnn_adv.export.to_keras`.  The default
        output is the log posterior predictive ``[B, C]``: logits whose
        softmax is :meth:`predict_proba` and whose cross-entropy is the
        predictive loss ``-log p(y | x, D)``.

        Args:
          output: ``"log_predictive"`` (``[B, C]``), ``"mean_logits"``
            (``[B, C]``) or ``"logits_stack"`` (``[B, S, C]``).
          chunk_size: samples per chunk inside the model; ``None`` picks one.

        Returns:
          A ``keras.Model`` taking float32 ``[B, *input_shape]``; it saves to
          and loads from ``.keras`` files (with ``tfp_bnn_adv`` imported).

        Raises:
          TypeError/ValueError: naming the argument, for a bad ``output`` or
            ``chunk_size``.

        Example:
          >>> model = ens.to_keras()
          >>> np.allclose(np.exp(model(x)), ens.predict_proba(x), atol=1e-6)
          True
          >>> art_clf = TensorFlowV2Classifier(model=model, nb_classes=10, ...)
        """
        from tfp_bnn_adv import export as export_lib  # pylint: disable=g-import-not-at-top
        return export_lib.to_keras(self, output, chunk_size=chunk_size)

    def export(self, path: str, *, output: str = "log_predictive",
               chunk_size: int | None = None, overwrite: bool = False) -> str:
        """Writes the ensemble's function as a TensorFlow SavedModel.

        A thin delegate to :func:`tfp_bnn_adv.export.export`: a
        ``serving_default`` signature ``x`` float32 ``[None, *input_shape]``
        -> ``{output: tensor}``, the weights as variables, and the network
        config and metadata as JSON in ``assets/``; written atomically.

        Args:
          path: the SavedModel directory (missing or empty unless
            ``overwrite``).
          output: one of :data:`tfp_bnn_adv.export.OUTPUTS`.
          chunk_size: samples per chunk in the graph; ``None`` picks one.
          overwrite: replace an existing non-empty ``path``.

        Returns:
          ``path``.

        Raises:
          TypeError/ValueError: naming the argument, for a bad ``path``,
            ``output``, ``chunk_size`` or ``overwrite``.
          FileExistsError: for a non-empty ``path`` without ``overwrite``.

        Example:
          >>> ens.export("/tmp/bnn")
          >>> serve = tf.saved_model.load("/tmp/bnn").signatures[
          ...     "serving_default"]
          >>> np.exp(serve(x=tf.constant(x))["log_predictive"])  # [B, C]
        """
        from tfp_bnn_adv import export as export_lib  # pylint: disable=g-import-not-at-top
        return export_lib.export(self, path, output=output,
                                 chunk_size=chunk_size, overwrite=overwrite)

    # ------------------------------------------------------------ save / load
    def save(self, path: str) -> None:
        """Saves to one ``.npz`` file, atomically, with no pickle.

        Weights are stored as float32 arrays ``param_0 .. param_{n-1}``; the
        architecture as the Keras model's JSON config, with the metadata.
        """
        arrays = {f"param_{i}": p.numpy() for i, p in enumerate(self.params)}
        meta = {"format": _FORMAT_NAME, "format_version": FORMAT_VERSION,
                "network": self.network.get_config(),
                "param_names": [s.name for s in self.network.param_specs],
                "param_shapes": [list(s) for s in self.network.param_shapes],
                "num_samples": self.num_samples,
                "metadata": self.metadata}
        files.save_arrays(path, arrays, meta)

    @classmethod
    def load(cls, path: str) -> "PosteriorEnsemble":
        """Loads an ensemble written by :meth:`save`.

        Raises:
          FileNotFoundError: if ``path`` does not exist.
          ValueError: naming the file and the field if the file is corrupt,
            not an ensemble, from a newer format, has malformed metadata
            (e.g. a non-integer ``format_version`` or non-dict
            ``metadata``), or its arrays do not match its architecture,
            hold NaN/inf or values beyond the float32 range.
        """
        arrays, meta = files.load_arrays(path)
        if meta.get("format") != _FORMAT_NAME:
            raise ValueError(f"{path!r} is not a saved PosteriorEnsemble "
                             f"(format={meta.get('format')!r}).")
        version = meta.get("format_version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"{path!r}: metadata field 'format_version' must "
                             f"be an int, got {version!r:.100}.")
        if version > FORMAT_VERSION:
            raise ValueError(f"{path!r} has format version {version}; this "
                             f"tfp_bnn_adv reads up to {FORMAT_VERSION}. "
                             "Upgrade the package.")
        user_meta = meta.get("metadata", {})
        if not isinstance(user_meta, dict):
            raise ValueError(f"{path!r}: metadata field 'metadata' must be a "
                             f"JSON object, got {type(user_meta).__name__}.")
        if not isinstance(meta.get("network"), dict):
            raise ValueError(f"{path!r}: metadata field 'network' must be a "
                             "JSON object (the architecture), got "
                             f"{type(meta.get('network')).__name__}.")
        try:
            network = Network.from_config(meta["network"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path!r}: cannot rebuild the architecture from "
                             f"metadata field 'network': {e}") from e
        n = len(network.param_specs)
        missing = [f"param_{i}" for i in range(n) if f"param_{i}" not in arrays]
        if missing or len(arrays) != n:
            raise ValueError(f"{path!r}: expected arrays param_0..param_{n - 1} "
                             f"for the architecture, found {sorted(arrays)}.")
        params = [arrays[f"param_{i}"] for i in range(n)]
        f32_max = np.finfo(np.float32).max
        for i, (p, spec) in enumerate(zip(params, network.param_specs)):
            if tuple(p.shape[1:]) != spec.shape or not np.issubdtype(
                    p.dtype, np.floating):
                raise ValueError(
                    f"{path!r}: param_{i} ({spec.name}) has shape {p.shape} "
                    f"and dtype {p.dtype}; the architecture needs float "
                    f"[S, {', '.join(map(str, spec.shape))}].")
            bad = int(np.count_nonzero(~np.isfinite(p)))
            if bad:
                raise ValueError(f"{path!r}: param_{i} ({spec.name}) holds "
                                 f"{bad} NaN or infinite values.")
            # Checked before the float32 cast, which would turn them into inf.
            if p.dtype.itemsize > 4 and p.size and np.abs(p).max() > f32_max:
                raise ValueError(
                    f"{path!r}: param_{i} ({spec.name}) holds values up to "
                    f"{float(np.abs(p).max()):.3g} in {p.dtype}, beyond the "
                    f"float32 range (+-{float(f32_max):.3g}) the ensemble "
                    "computes in.")
        return cls(network, params, metadata=user_meta)


def predict_proba_checked(ensemble: PosteriorEnsemble, x: tf.Tensor,
                          batch_size: int, chunk: int, jit_compile
                          ) -> np.ndarray:
    """:meth:`PosteriorEnsemble.predict_proba` of inputs already checked.

    For callers that validated ``x`` (``Network.check_inputs``) and chose
    ``batch_size`` and ``chunk`` (:meth:`PosteriorEnsemble.batch_and_chunk`)
    themselves, so neither is done twice.

    Returns:
      float32 numpy array ``[B, C]``.
    """
    fn = xla.cached_function(
        ensemble.network, ("proba", chunk, jit_compile),
        lambda net: xla.compile_fn(
            lambda p, xb: predict_proba_graph(net, p, xb, chunk), jit_compile,
            "predict_proba"))
    return chunking.map_batches(lambda xb: fn(ensemble.params, xb), [x],
                                batch_size)


def check_ensemble(value, name: str = "ensemble") -> PosteriorEnsemble:
    """``value`` if it is a :class:`PosteriorEnsemble`, else a TypeError.

    The one type check of every public function that takes an ensemble
    (gradients, attacks, metrics).
    """
    return validate.instance(value, PosteriorEnsemble, name)
