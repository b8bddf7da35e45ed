"""How well a run mixed: weight-, likelihood- and function-space diagnostics.

Weight-space R-hat means little for a BNN: permuting hidden units gives the
same function, so chains in different, equivalent modes disagree on every
weight.  What must agree across chains is the *function*: for each input of
a probe set, the predictive probability of each kept sample.
:func:`function_space` computes, per probe point, the rank-normalised split
R-hat and bulk ESS of Vehtari et al. (2021) of that probability (of the
class the pooled ensemble predicts), and summarises them: median, 90th
percentile, the fraction of points with R-hat < 1.1, and the ESS minimum and
median.  A posterior is *converged* when the median is at most ``max_rhat``
(default 1.1): :attr:`Diagnostics.converged`.

:func:`to_inference_data` exports the traces to ArviZ (optional extra
``pip install ".[arviz]"``), and :func:`plot_traces` draws a trace and rank
plot with matplotlib alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_bnn_adv import files
from tfp_bnn_adv import seeds

__all__ = ["Diagnostics", "rhat_ess", "rank_normalized_rhat_ess",
           "function_space", "probe_probabilities", "weight_projection",
           "to_inference_data", "plot_traces", "convergence_summary"]

_PROJECTION_SEED = (20200, 3)
# Fewer kept draws per chain than this leave the function-space R-hat
# undefined (so the posterior counts as unconverged): split into halves of
# a few draws, R-hat lands near 1 by chance.
MIN_DRAWS_FOR_RHAT = 20
# Probe points whose predictive probability is kept per draw in the
# ensemble's metadata (for to_inference_data and the trace plots).
_TRACED_PROBE_POINTS = 16


def _finite_or_none(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """What a run did and how well it mixed.

    Attributes:
      kernel: ``"hmc"`` or ``"nuts"``.
      num_chains: ``C``.
      num_results: kept samples per chain ``R``.
      acceptance_rate: per chain, mean Metropolis acceptance probability
        over the post-warm-up steps.
      burnin_acceptance_rate: the same over warm-up (NaN without warm-up).
      step_size: per chain, the final (adapted) step size.
      num_divergent: divergent transitions after warm-up, summed over chains.
      num_divergent_burnin: the same during warm-up.
      rhat_log_likelihood: split R-hat of the traced log-likelihood (of the
        target density for :func:`run_chains` without ``monitor_fn``); NaN
        with fewer than 4 kept samples.
      ess_log_likelihood: its effective sample size, pooled over chains.
      rhat_projection: split R-hat of a fixed random unit projection of all
        weights (weight space: expected to be large for BNNs).
      ess_projection: its pooled effective sample size.
      function_rhat_median: median over probe points of the rank-normalised
        split R-hat of the predictive probability (NaN when not computed:
        :func:`run_chains` on a generic target, one chain, or fewer than
        ``MIN_DRAWS_FOR_RHAT`` = 20 draws per chain).
      function_rhat_p90: its 90th percentile.
      function_rhat_frac_below: fraction of probe points with R-hat < 1.1.
      function_ess_min: smallest bulk ESS over probe points.
      function_ess_median: median bulk ESS over probe points.
      num_probe_points: size of the probe set.
      probe_source: ``"held_out"`` or ``"train"``.
      probe_accuracy_per_chain: per chain, accuracy of its own predictive on
        the probe set (empty without labels).
      inverse_mass_min, inverse_mass_max: range of the adapted diagonal
        inverse mass matrix over all weights and chains.
      mean_leapfrog_steps: leapfrog steps per iteration after warm-up.
      max_rhat: the convergence threshold.
      wall_seconds: wall time of all segments (over resumed runs too).
      compile_seconds: estimated compilation time (NaN if unknown).
      leapfrog_steps_per_second: steady-state leapfrog steps per second,
        summed over chains.
      num_leapfrog_steps: leapfrog steps of the whole run, summed over chains.
      jit: ``"xla"`` or ``"default"`` (TF kernels).
      num_segments: compiled calls the run was split into.
      emulation: ``None``, or for a run with ``restart_batch_size`` or
        ``resample_draws`` set (:meth:`HMCConfig.as_authors`) what was
        emulated: ``{"restart_batch_size", "num_batches", "num_train",
        "last_batch_start", "last_batch_stop", "last_batch_points",
        "resample_draws", "draws_before_resampling", "distinct_samples",
        "wall_seconds_all_batches"}``.  Every other field, ``converged``
        included, describes the last run's chains before resampling.

    Example:
      >>> _, diag = sample(model, x, y, num_chains=4, seed=0)
      >>> diag.converged, diag.function_rhat_median
      (True, 1.02)
      >>> files.write_json("diagnostics.json", diag.to_dict())
    """

    kernel: str
    num_chains: int
    num_results: int
    acceptance_rate: tuple
    burnin_acceptance_rate: tuple
    step_size: tuple
    num_divergent: int
    num_divergent_burnin: int
    rhat_log_likelihood: float
    ess_log_likelihood: float
    rhat_projection: float
    ess_projection: float
    wall_seconds: float
    compile_seconds: float
    leapfrog_steps_per_second: float
    num_leapfrog_steps: int
    jit: str
    num_segments: int
    function_rhat_median: float = float("nan")
    function_rhat_p90: float = float("nan")
    function_rhat_frac_below: float = float("nan")
    function_ess_min: float = float("nan")
    function_ess_median: float = float("nan")
    num_probe_points: int = 0
    probe_source: str = ""
    probe_accuracy_per_chain: tuple = ()
    inverse_mass_min: float = float("nan")
    inverse_mass_max: float = float("nan")
    mean_leapfrog_steps: float = float("nan")
    max_rhat: float = 1.1
    emulation: dict | None = None

    @property
    def converged(self) -> bool:
        """Function-space R-hat median at most ``max_rhat`` (False if unknown)."""
        return bool(math.isfinite(self.function_rhat_median) and
                    self.function_rhat_median <= self.max_rhat)

    def to_dict(self) -> dict:
        """A JSON-able dict; non-finite numbers become ``None``."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = [_finite_or_none(e) for e in v]
            elif isinstance(v, float):
                v = _finite_or_none(v)
            out[f.name] = v
        if self.emulation is None:
            # Only emulations carry the key: other runs' dicts stay as they were.
            del out["emulation"]
        out["converged"] = self.converged
        return out

    def summary(self) -> str:
        """One line for logs and tables (an emulation says what it is)."""
        state = "converged" if self.converged else "UNCONVERGED"
        return (f"{self._emulation_text()}{state}: function R-hat median {self.function_rhat_median:.3f}"
                f" (p90 {self.function_rhat_p90:.3f}, "
                f"{100 * self.function_rhat_frac_below:.0f}% < 1.1), ESS min "
                f"{self.function_ess_min:.0f}; log-lik R-hat "
                f"{self.rhat_log_likelihood:.3f}, acceptance "
                f"{np.mean(self.acceptance_rate):.2f}, divergent "
                f"{self.num_divergent}")

    def _emulation_text(self) -> str:
        e = self.emulation
        if e is None:
            return ""
        parts = []
        if e.get("restart_batch_size") is not None:
            parts.append(
                f"posterior conditioned on the last batch only (training "
                f"points {e['last_batch_start']}-{e['last_batch_stop'] - 1}, "
                f"{e['last_batch_points']} of {e['num_train']}; HMC restarted "
                f"on each of {e['num_batches']} batches of "
                f"{e['restart_batch_size']})")
        if e.get("resample_draws") is not None:
            parts.append(
                f"{e['resample_draws']} draws with replacement from the "
                f"{'last ' if e.get('restart_batch_size') else ''}run's "
                f"{e['draws_before_resampling']}, "
                f"{e['distinct_samples']} distinct")
        return ("PAPER EMULATION (" + "; ".join(parts) +
                "); diagnostics of the last run before resampling: ")


def convergence_summary(diagnostics: dict | None, max_rhat: float = 1.1
                        ) -> dict:
    """The columns every study table shows, from a diagnostics dict.

    Args:
      diagnostics: ``Diagnostics.to_dict()`` (e.g. an HMC ensemble's
        ``metadata["diagnostics"]``), or ``None``.
      max_rhat: the threshold for ``converged``.

    Returns:
      ``{"function_rhat_median", "function_rhat_frac_below",
      "function_ess_min", "acceptance", "num_divergent", "converged"}``;
      ``converged`` is False when the R-hat is missing.
    """
    d = diagnostics or {}
    med = d.get("function_rhat_median")
    acc = d.get("acceptance_rate") or []
    acc = [a for a in acc if a is not None]
    return {
        "function_rhat_median": med,
        "function_rhat_frac_below": d.get("function_rhat_frac_below"),
        "function_ess_min": d.get("function_ess_min"),
        "acceptance": float(np.mean(acc)) if acc else None,
        "num_divergent": d.get("num_divergent"),
        "converged": bool(med is not None and math.isfinite(med) and
                          med <= max_rhat),
    }


@contextlib.contextmanager
def _quiet_tf_logger():
    # TFP's FFT autocorrelation casts complex to real on purpose and warns
    # about it on every call.
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


def _split_rhat(t: np.ndarray) -> np.ndarray:
    """Split R-hat of ``[R, C, ...]`` (TFP's ``potential_scale_reduction``)."""
    return tfp.mcmc.potential_scale_reduction(
        tf.constant(t, tf.float64), split_chains=True).numpy()


def _halves(t: np.ndarray) -> np.ndarray:
    """``[R, C, ...] -> [R // 2, 2C, ...]``: each chain split in two."""
    n = t.shape[0] // 2
    return np.concatenate([t[:n], t[t.shape[0] - n:]], axis=1)


def _split_rhat_sqrt(t: np.ndarray) -> np.ndarray:
    """Split R-hat of ``[R, C, ...]`` in the form of Vehtari et al. (2021).

    ``sqrt(((n - 1) / n * W + B / n) / W)`` over the ``2C`` half-chains of
    length ``n = R // 2`` (the middle draw of an odd ``R`` is dropped), the
    form Stan and ArviZ report and the 1.1 / 1.01 thresholds refer to.
    TFP's ``potential_scale_reduction`` is the Brooks-Gelman variant
    without the square root, so larger for the same draws.
    """
    n = t.shape[0] // 2
    halves = _halves(t)
    w = np.var(halves, axis=0, ddof=1).mean(axis=0)
    b_over_n = np.var(halves.mean(axis=0), axis=0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(((n - 1) / n * w + b_over_n) / w)


def _pooled_ess(t: np.ndarray) -> np.ndarray:
    c = t.shape[1]
    with _quiet_tf_logger():
        ess = tfp.mcmc.effective_sample_size(
            tf.constant(t, tf.float64), filter_beyond_positive_pairs=True,
            cross_chain_dims=1 if c > 1 else None)
    ess = ess.numpy()
    return ess if c > 1 else np.sum(ess, axis=0)


def rhat_ess(trace: np.ndarray) -> tuple[float, float]:
    """Split R-hat and pooled ESS of a ``[R, C]`` trace (NaN if too short)."""
    r, c = trace.shape
    if r < 4 or not np.all(np.isfinite(trace)):
        return float("nan"), float("nan")
    rhat = float(_split_rhat(trace))
    return rhat, float(_pooled_ess(trace))


def _rank_normalize(t: np.ndarray) -> np.ndarray:
    """Ranks over all ``R * C`` draws to normal scores, per trailing index.

    Ties (saturated probabilities are common) share their average rank.
    """
    r, c = t.shape[:2]
    n = r * c
    flat = t.reshape((n,) + t.shape[2:])
    order = np.argsort(flat, axis=0, kind="stable")
    sv = np.take_along_axis(flat, order, axis=0)
    idx = np.broadcast_to(np.arange(n).reshape((-1,) + (1,) * (flat.ndim - 1)),
                          flat.shape)
    edge = sv[1:] != sv[:-1]
    starts = np.concatenate([np.ones_like(edge[:1]), edge], axis=0)
    ends = np.concatenate([edge, np.ones_like(edge[:1])], axis=0)
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=0)
    last = np.flip(np.minimum.accumulate(
        np.flip(np.where(ends, idx, n - 1), axis=0), axis=0), axis=0)
    ranks = np.empty(flat.shape, np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=0)
    u = (ranks - 0.375) / (n + 0.25)
    z = tfp.distributions.Normal(np.float64(0), np.float64(1)).quantile(u)
    return np.asarray(z).reshape(t.shape)


def rank_normalized_rhat_ess(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank-normalised split R-hat and bulk ESS of ``[R, C, ...]`` draws.

    Vehtari, Gelman, Simpson, Carpenter and Bürkner (2021): the draws of all
    chains are ranked together and mapped to normal scores before the
    split R-hat (their square-root form, as Stan and ArviZ report it) and
    TFP's cross-chain ESS over the half-chains, so heavy tails and saturated values (a
    probability stuck at 1) do not break them.  A quantity that is exactly
    constant over every draw of every chain gets R-hat 1 and ESS ``R * C``
    (all chains agree); one that is constant within each chain but differs
    between chains gets R-hat ``inf``.

    Returns:
      ``(rhat, ess)``, float64 arrays of the trailing shape.
    """
    t = np.asarray(t, np.float64)
    r, c = t.shape[:2]
    trailing = t.shape[2:]
    if r < 4:
        nan = np.full(trailing, np.nan)
        return nan, nan
    flat = t.reshape((r * c,) + trailing)
    constant = np.all(flat == flat[:1], axis=0)
    z = _rank_normalize(t)
    with np.errstate(invalid="ignore", divide="ignore"):
        rhat = np.where(constant, 1.0, _split_rhat_sqrt(z))
        ess = np.where(constant, float(r * c), _pooled_ess(_halves(z)))
    # Constant within every chain but not across: the chains disagree.
    stuck = (~constant) & np.all(t == t[:1], axis=(0, 1))
    rhat = np.where(stuck, np.inf, rhat)
    return np.asarray(rhat, np.float64), np.asarray(ess, np.float64)


def probe_probabilities(network, params_rc: Sequence[np.ndarray], probe_x,
                        chunk: int = 64) -> np.ndarray:
    """Per-draw softmax probabilities on the probe set, ``[R, C, P, K]``.

    Args:
      network: the :class:`~tfp_bnn_adv.network.Network`.
      params_rc: kept states, float32 ``[R, C, *shape]`` per part.
      probe_x: float32 ``[P, *input_shape]``.
      chunk: weight sets per forward pass (bounded memory).
    """
    r, c = params_rc[0].shape[:2]
    flat = [np.reshape(p, (r * c,) + p.shape[2:]) for p in params_rc]
    x = tf.convert_to_tensor(probe_x, tf.float32)
    fn = tf.function(lambda ps: tf.nn.softmax(tf.cast(
        network.apply_stack(ps, x), tf.float64)), autograph=False,
        reduce_retracing=True)
    out = []
    for i in range(0, r * c, chunk):
        out.append(fn([tf.constant(p[i:i + chunk]) for p in flat]).numpy())
    probs = np.concatenate(out, axis=0)
    return probs.reshape((r, c) + probs.shape[1:])


def function_space(probs: np.ndarray, probe_y=None) -> dict:
    """Function-space diagnostics from per-draw probabilities ``[R, C, P, K]``.

    The monitored quantity at each probe point is the probability of the
    class the pooled ensemble (all draws of all chains) predicts there.

    Returns:
      A dict with ``function_rhat_median``, ``function_rhat_p90``,
      ``function_rhat_frac_below``, ``function_ess_min``,
      ``function_ess_median``, ``num_probe_points``,
      ``probe_accuracy_per_chain`` and the per-point arrays ``rhat``, ``ess``
      and the monitored ``trace`` ``[R, C, P]``.
    """
    r, c, p, _ = probs.shape
    # Half-chains of a few draws give R-hats near 1 by chance.
    enough = c >= 2 and r >= MIN_DRAWS_FOR_RHAT
    predicted = np.argmax(probs.mean(axis=(0, 1)), axis=-1)  # [P]
    trace = np.take_along_axis(probs, predicted[None, None, :, None],
                               axis=-1)[..., 0]  # [R, C, P]
    out = {"num_probe_points": int(p), "trace": trace}
    if not enough:
        rhat = np.full(p, np.nan)
        ess = np.full(p, np.nan)
    else:
        rhat, ess = rank_normalized_rhat_ess(trace)
    out["rhat"], out["ess"] = rhat, ess
    finite = np.isfinite(rhat) | np.isposinf(rhat)
    if enough and finite.any():
        out["function_rhat_median"] = float(np.median(rhat))
        out["function_rhat_p90"] = float(np.quantile(rhat, 0.9))
        out["function_rhat_frac_below"] = float(np.mean(rhat < 1.1))
        out["function_ess_min"] = float(np.min(ess))
        out["function_ess_median"] = float(np.median(ess))
    if probe_y is not None:
        chain_pred = np.argmax(probs.mean(axis=0), axis=-1)  # [C, P]
        out["probe_accuracy_per_chain"] = tuple(
            float(a) for a in np.mean(chain_pred == np.asarray(probe_y)[None],
                                      axis=1))
    return out


def _projection_vectors(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A fixed random unit vector over all weights, one array per part."""
    vs = [seeds.normal(p.shape[2:], [_PROJECTION_SEED[0],
                                     _PROJECTION_SEED[1] + i],
                       dtype=tf.float64).numpy()
          for i, p in enumerate(parts)]
    norm = math.sqrt(sum(float(np.sum(v * v)) for v in vs))
    return [v / norm for v in vs]


def weight_projection(parts: Sequence[np.ndarray]) -> np.ndarray:
    """``[R, C]``: every draw's weights projected on a fixed unit vector."""
    return sum(np.tensordot(p.astype(np.float64), v, axes=v.ndim)
               for p, v in zip(parts, _projection_vectors(parts)))


def traces_metadata(log_likelihood: np.ndarray, projection: np.ndarray,
                    probe_trace: np.ndarray | None) -> dict:
    """The small per-draw traces kept in an ensemble's metadata."""
    out = {"log_likelihood": np.asarray(log_likelihood, np.float64).tolist(),
           "weight_projection": np.asarray(projection, np.float64).tolist()}
    if probe_trace is not None:
        out["probe_probability"] = np.asarray(
            probe_trace[:, :, :_TRACED_PROBE_POINTS], np.float64).tolist()
    return out


def _traces(ensemble_or_traces) -> dict:
    if isinstance(ensemble_or_traces, dict):
        traces = ensemble_or_traces
    else:
        traces = ensemble_or_traces.metadata.get("traces")
    if not traces or "log_likelihood" not in traces:
        raise ValueError("This ensemble carries no HMC traces: only "
                         "ensembles from hmc.sample() have them, in "
                         "metadata['traces'].")
    return {k: np.asarray(v, np.float64) for k, v in traces.items()}


def to_inference_data(ensemble_or_traces):
    """The HMC traces as an ``arviz.InferenceData``.

    Posterior variables (dims ``chain``, ``draw``): ``log_likelihood`` (the
    summed training log-likelihood), ``weight_projection`` (a fixed random
    projection of all weights) and ``probe_probability`` (predictive
    probability at up to 16 probe points, dim ``probe``).  Needs the
    optional extra: ``pip install ".[arviz]"``.

    Args:
      ensemble_or_traces: a PosteriorEnsemble from :func:`sample` (its
        ``metadata["traces"]``) or that dict itself.

    Raises:
      ImportError: without ArviZ, with the install command.
      ValueError: for an ensemble without traces.

    Example:
      >>> idata = to_inference_data(ensemble)
      >>> arviz.summary(idata)       # R-hat, ESS per variable
    """
    traces = _traces(ensemble_or_traces)
    try:  # an optional extra, so imported only when asked for
        import arviz  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("to_inference_data needs ArviZ: pip install "
                          "'.[arviz]' (or pip install arviz).") from e
    # ArviZ wants [chain, draw, ...]; ours are [draw, chain, ...].
    posterior = {k: np.swapaxes(v, 0, 1) for k, v in traces.items()}
    dims = {"probe_probability": ["probe"]} if "probe_probability" in posterior else {}
    return arviz.from_dict(posterior=posterior, dims=dims)


def plot_traces(ensemble_or_traces, path: str, *, title: str = "") -> str:
    """A trace plot and a rank plot of the HMC traces, as one PNG.

    One row per traced quantity (log-likelihood, weight projection and the
    first probe point's probability): left the value per draw with one line
    per chain, right the rank histogram per chain (flat when the chains
    mix).  Matplotlib only; the file is written atomically.

    Returns:
      ``path``.
    """
    # Here, not at the top: choosing the Agg backend on import would change
    # the backend of every program that imports the package.
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    traces = _traces(ensemble_or_traces)
    rows = [("log-likelihood", traces["log_likelihood"]),
            ("weight projection", traces["weight_projection"])]
    if "probe_probability" in traces:
        rows.append(("p(predicted class), probe point 0",
                     traces["probe_probability"][:, :, 0]))
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 2.6 * len(rows)),
                             squeeze=False)
    for (name, t), (ax_trace, ax_rank) in zip(rows, axes):
        r, c = t.shape
        ranks = np.argsort(np.argsort(t.reshape(-1), kind="stable"),
                           kind="stable").reshape(r, c)
        bins = np.linspace(0, r * c, min(20, max(2, r // 5)) + 1)
        rhat, _ = rank_normalized_rhat_ess(t[:, :, None])
        for k in range(c):
            ax_trace.plot(t[:, k], lw=0.7, label=f"chain {k}")
            ax_rank.hist(ranks[:, k], bins=bins, histtype="step", lw=1.0)
        ax_trace.set_title(f"{name} (rank R-hat {float(rhat[0]):.3f})",
                           fontsize=9)
        ax_trace.set_xlabel("draw")
        ax_rank.set_title(f"{name}: ranks per chain", fontsize=9)
        ax_rank.set_xlabel("rank over all chains")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with files.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return path
