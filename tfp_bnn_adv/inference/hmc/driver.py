"""The driver: compiled segments, adaptation windows, checkpoints and resume.

A run is ``num_burnin_steps + num_results * thinning`` iterations of ``C``
chains that advance together in one vectorised compiled step.  It goes in
segments of at most ``checkpoint_every`` iterations; each is one compiled
``tfp.mcmc.sample_chain`` call with a minimal ``trace_fn``, and no segment
straddles an adaptation window's boundary (:func:`~.kernel.warmup_windows`)
or the end of warm-up.  A window's adaptation is restarted on the host
(:func:`~.kernel.begin_window`) before its first segment.

With a ``checkpoint_dir`` the chain state, every tensor of the kernel
results (the dual-averaging state, the running variances and the mass
matrix included), the counters and the samples so far are written
atomically after each segment; a run started again with the same arguments
continues from there and gives bit-identical samples, because segment ``j``
runs with the stateless seed ``fold_in(seed, j)``.  A checkpoint from a
different configuration, or from an earlier format, is refused with a
message naming the difference.

Compilers: segments run under XLA (``jit_compile=True``, and ``"auto"``
with a GPU or TPU) or with TensorFlow's default kernels (``False``, and
``"auto"`` on a CPU-only host); the choice is never timed
(:func:`tfp_bnn_adv.xla.stochastic_jit`), because an HMC chain is chaotic:
the rounding differences between the two paths grow into different
(equally valid) chains.  Every random draw of the kernels goes through
:func:`tfp_bnn_adv.seeds.portable_samplers`, so both paths draw the same
momenta, jitters and acceptance uniforms from one seed.  The path is
recorded in the diagnostics (``jit``) and the checkpoint; a resumed run
keeps the path it started on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_bnn_adv import files
from tfp_bnn_adv import seeds
from tfp_bnn_adv import validate
from tfp_bnn_adv import xla
from tfp_bnn_adv.inference.hmc import diagnostics as diag_lib
from tfp_bnn_adv.inference.hmc import kernel as kernel_lib
from tfp_bnn_adv.inference.hmc.config import HMCConfig
from tfp_bnn_adv.inference.hmc.init import check_state

__all__ = ["run_chains", "ChainResult", "CHECKPOINT_FILE", "plan_segments",
           "check_checkpoint_dir"]

CHECKPOINT_FILE = "hmc_checkpoint.npz"
_SEGMENT_FILE = "hmc_samples_{:05d}.npz"
_FORMAT = "tfp_bnn_adv.hmc_checkpoint"
# Version 2: preconditioned kernels with windowed adaptation (results hold
# running variances and the adapted mass matrix).
_FORMAT_VERSION = 2


class ChainResult(NamedTuple):
    """What :func:`run_chains` returns.

    Attributes:
      states: list of float32 numpy arrays ``[R, C, *shape]``: the kept
        samples of every chain after warm-up and thinning.
      trace: float32 numpy ``[R, C]``: the monitored value (target
        log-density, or ``monitor_fn``) at each kept sample.
      diagnostics: a :class:`~.diagnostics.Diagnostics`.
      inverse_mass: the adapted diagonal inverse mass matrix, one float32
        array ``[C, *shape]`` per state part (ones for
        ``mass_matrix="identity"``).
    """

    states: list
    trace: np.ndarray
    diagnostics: diag_lib.Diagnostics
    inverse_mass: list


class _Segment(NamedTuple):
    phase: str          # "burnin" or "sampling"
    steps: int          # iterations
    kept: int           # samples kept (0 in burn-in)
    window: tuple | None  # (kind, length) when this segment opens a window


def plan_segments(config: HMCConfig) -> list[_Segment]:
    """Segments of a run: windows, the rest of burn-in, then sampling."""
    every, thin = config.checkpoint_every, config.thinning
    plan = []
    blocks = list(kernel_lib.warmup_windows(config.num_adaptation_steps))
    rest = config.num_burnin_steps - config.num_adaptation_steps
    if rest:
        # Non-adapting burn-in: a "window" that adapts nothing.
        blocks.append(("none", rest))
    for kind, length in blocks:
        left, first = length, True
        while left > 0:
            n = min(every, left)
            plan.append(_Segment("burnin", n, 0,
                                 (kind, length) if first and kind != "none"
                                 else None))
            left -= n
            first = False
    per = max(1, every // thin)
    left = config.num_results
    while left > 0:
        n = min(per, left)
        plan.append(_Segment("sampling", n * thin, n, None))
        left -= n
    return plan


def check_checkpoint_dir(checkpoint_dir) -> str | None:
    """Validates a ``checkpoint_dir`` before any work: ``None`` or a path
    that is a directory or can become one (see
    :func:`tfp_bnn_adv.validate.directory`)."""
    return validate.directory(checkpoint_dir, "checkpoint_dir", optional=True)


_META_TYPES = {"format": str, "format_version": int, "config": dict,
               "digest": str, "segments_done": int, "iteration": int,
               "summaries": list, "num_mass_parts": int,
               "wall_seconds": (int, float), "use_xla": bool}


def _check_meta(path: str, meta) -> dict:
    """Refuses checkpoint metadata with missing or mistyped fields."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path!r}: checkpoint metadata must be a JSON "
                         f"object, got {type(meta).__name__}. The checkpoint "
                         "is corrupt; delete it to start afresh.")
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path!r} is not an HMC checkpoint "
                         f"(format={meta.get('format')!r}).")
    for key, kind in _META_TYPES.items():
        value = meta.get(key)
        ok = isinstance(value, kind) and not (
            kind is not bool and isinstance(value, bool))
        if key == "format_version" and ok and value != _FORMAT_VERSION:
            break  # reported below with the version's history
        if not ok:
            raise ValueError(f"{path!r}: checkpoint field {key!r} is "
                             f"{_describe(value)}, not a "
                             f"{getattr(kind, '__name__', 'number')}. The "
                             "checkpoint is corrupt; delete it to start "
                             "afresh.")
    return meta


def _fingerprint_diff(saved: dict, current: dict) -> str | None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return key
    return None


def _describe(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _load_checkpoint(path: str, config: dict):
    """Reads a checkpoint, refusing one from another configuration or format."""
    arrays, meta = files.load_arrays(path)
    meta = _check_meta(path, meta)
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{path!r} is an HMC checkpoint of format version "
            f"{meta.get('format_version')!r}, written before the sampler "
            f"gained windowed mass-matrix adaptation (this is version "
            f"{_FORMAT_VERSION}); its kernel state cannot be continued. "
            "Delete it (or use another checkpoint_dir) to start afresh.")
    field = _fingerprint_diff(meta["config"], config)
    if field is not None:
        raise ValueError(
            f"The checkpoint in {os.path.dirname(path)!r} comes from a "
            f"different configuration: {field} is "
            f"{_describe(meta['config'].get(field))} there but "
            f"{_describe(config.get(field))} now. Use another checkpoint_dir "
            "or delete it to start afresh; runs are never mixed.")
    return arrays, meta


def _leaves(results) -> list:
    return tf.nest.flatten(results, expand_composites=True)


def _restore(path: str, arrays: dict, template, state_template):
    """The chain state and kernel results, checked against their templates."""
    state = [arrays.get(f"state_{i}") for i in range(len(state_template))]
    leaves = _leaves(template)
    loaded = [arrays.get(f"results_{i}") for i in range(len(leaves))]
    for i, (a, t) in enumerate(zip(state + loaded,
                                   list(state_template) + leaves)):
        if a is None or tuple(a.shape) != tuple(t.shape) or (
                a.dtype != t.dtype.as_numpy_dtype):
            raise ValueError(f"{path!r}: tensor {i} is missing or has the "
                             f"wrong shape or dtype; expected "
                             f"{tuple(t.shape)} {t.dtype.name}. The checkpoint "
                             "is corrupt.")
    for i, a in enumerate(state):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{path!r}: chain state part {i} holds "
                             f"{int(np.sum(~np.isfinite(a)))} non-finite "
                             "values. The checkpoint is corrupt; delete it to "
                             "start afresh.")
    results = tf.nest.pack_sequence_as(
        template, [tf.constant(a) for a in loaded], expand_composites=True)
    # What the next iteration starts from must be finite (proposals of a
    # divergent transition, also stored in the results, may not be).
    adapted = results.inner_results
    current = {"target log-density": kernel_lib.target_log_prob(adapted),
               "step size": kernel_lib.per_chain_step_size(adapted)}
    for i, m in enumerate(kernel_lib.inverse_mass(adapted)):
        current[f"inverse mass {i}"] = m
    for name, t in current.items():
        v = t.numpy()
        bad = ~np.isfinite(v) | ((v <= 0) if name != "target log-density"
                                 else False)
        if np.any(bad):
            raise ValueError(f"{path!r}: the {name} holds {int(np.sum(bad))} "
                             "non-finite (or non-positive) values. The "
                             "checkpoint is corrupt; delete it to start "
                             "afresh.")
    return [tf.constant(s) for s in state], results


def _load_segment(directory: str, index: int, digest: str, num_parts: int):
    path = os.path.join(directory, _SEGMENT_FILE.format(index))
    arrays, meta = files.load_arrays(path)
    if meta.get("digest") != digest or meta.get("segment") != index:
        raise ValueError(f"{path!r} belongs to another run than the checkpoint "
                         f"next to it; delete {directory!r} to start afresh.")
    names = [f"state_{i}" for i in range(num_parts)] + ["trace"]
    missing = [k for k in names if k not in arrays]
    if missing:
        raise ValueError(f"{path!r} lacks {missing}; the checkpoint is "
                         f"corrupt: delete {directory!r} to start afresh.")
    for k in names[:-1]:  # the monitored trace may be any value
        if not np.all(np.isfinite(arrays[k])):
            raise ValueError(f"{path!r}: {k} holds non-finite values; the "
                             f"checkpoint is corrupt: delete {directory!r} to "
                             "start afresh.")
    return [arrays[k] for k in names[:-1]], arrays["trace"]


def digest(config: dict) -> str:
    """SHA-256 of a JSON-able dict, independent of key order."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _target_log_prob_monitor(state_parts, target_log_prob):
    del state_parts  # the default monitor is the target density itself
    return target_log_prob


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


_RUN_CHAINS_SETTINGS = ("num_burnin_steps", "num_results", "thinning",
                        "step_size", "num_leapfrog_steps", "trajectory_length",
                        "max_leapfrog_steps", "trajectory_jitter",
                        "mass_matrix", "kernel", "max_tree_depth",
                        "target_accept_prob", "num_adaptation_steps",
                        "checkpoint_every", "jit_compile", "seed")


def run_chains(target_log_prob_fn: Callable[..., tf.Tensor],
               initial_state: Sequence, *, config: HMCConfig | None = None,
               checkpoint_dir: str | None = None,
               monitor_fn: Callable | None = None,
               monitor_name: str = "target log-prob",
               fingerprint: dict | None = None,
               segment_callback: Callable[[dict], Any] | None = None,
               **settings) -> ChainResult:
    """Runs ``C`` independent adaptive HMC/NUTS chains on any batched target.

    The chain runs ``num_burnin_steps + num_results * thinning`` iterations
    and keeps the state after every ``thinning``-th post-warm-up iteration.
    During the first ``num_adaptation_steps`` iterations (default: all of
    warm-up) each chain adapts its step size and diagonal mass matrix in
    Stan's windows (see :mod:`~tfp_bnn_adv.inference.hmc.kernel`); both are
    fixed afterwards.

    Args:
      target_log_prob_fn: ``(*state_parts) -> [C]`` float32, the unnormalised
        log-density of each chain's state; pure and XLA-compilable.
      initial_state: list of float32 tensors ``[C, *shape]``.
      config: an :class:`~.config.HMCConfig`; or give its sampler fields as
        keyword arguments (``num_burnin_steps``, ``num_results``,
        ``thinning``, ``step_size``, ``trajectory_length``,
        ``num_leapfrog_steps``, ``max_leapfrog_steps``,
        ``trajectory_jitter``, ``mass_matrix``, ``kernel``,
        ``max_tree_depth``, ``target_accept_prob``,
        ``num_adaptation_steps``, ``checkpoint_every``, ``jit_compile``,
        ``seed``), validated the same way.
      checkpoint_dir: directory for checkpoints (``None``: none written).  A
        run started again with the same arguments resumes from it.
      monitor_fn: ``(state_parts, target_log_prob) -> [C]``, the value traced
        at every kept sample and diagnosed (default: the target log-density).
      monitor_name: its name in progress lines.
      fingerprint: extra JSON-able fields identifying the target (e.g. a data
        hash); a checkpoint whose fields differ is refused.
      segment_callback: called after each segment (and its checkpoint) with
        a dict of progress figures (``segment``, ``num_segments``,
        ``phase``, ``step``, ``num_steps``, ``acceptance``, ``step_size``,
        ``monitor``, ``rhat``, ``num_divergent``, ``leapfrogs_per_second``,
        ``eta_seconds``); an exception it raises stops the run with every
        finished segment saved.

    Returns:
      A :class:`ChainResult`: kept states ``[R, C, *shape]``, the monitored
      trace ``[R, C]`` and :class:`~.diagnostics.Diagnostics` (without the
      function-space fields, which need a network: see ``sample``).

    Raises:
      ValueError / TypeError: for bad settings or state, naming the argument;
        ValueError for a checkpoint from a different configuration, naming
        the differing field.

    Example:
      >>> def target(x):                  # C chains of a 2-D standard normal
      ...     return -0.5 * tf.reduce_sum(x**2, axis=-1)
      >>> out = run_chains(target, [tf.zeros([4, 2])], num_burnin_steps=200,
      ...                  num_results=200, seed=1)
      >>> out.states[0].shape
      (200, 4, 2)
    """
    unknown = set(settings) - set(_RUN_CHAINS_SETTINGS)
    if unknown:
        raise TypeError(f"run_chains got unexpected keyword arguments "
                        f"{sorted(unknown)}.")
    if config is None:
        config = HMCConfig(**settings)
    elif settings:
        config = config.replace(**settings)
    validate.instance(config, HMCConfig, "config")
    state = check_state(initial_state)
    if not callable(target_log_prob_fn):
        raise TypeError("target_log_prob_fn must be callable.")
    if segment_callback is not None and not callable(segment_callback):
        raise TypeError("segment_callback must be callable or None.")
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    fields = dict(fingerprint or {})
    fields.update(config.sampler_settings())
    fields["seed"] = config.seed
    fields["state_shapes"] = [list(s.shape) for s in state]
    # As it will read back from a checkpoint (tuples become lists).
    fields = json.loads(json.dumps(fields))
    return _ChainRun(target_log_prob_fn, state, config, fields, monitor_fn,
                monitor_name, checkpoint_dir, segment_callback).run()


class _ChainRun:
    """One (possibly resumed) run: the host loop over compiled segments."""

    def __init__(self, target_log_prob_fn, state, config: HMCConfig, fields,
                 monitor_fn, monitor_name, checkpoint_dir, segment_callback):
        self.target = target_log_prob_fn
        self.state = state
        self.cfg = config
        self.fields = fields
        self.digest = digest(fields)
        self.monitor_fn = monitor_fn or _target_log_prob_monitor
        self.monitor_name = monitor_name
        self.dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.callback = segment_callback
        self.plan = plan_segments(config)
        self.kernel = kernel_lib.build_kernel(target_log_prob_fn, state, config)
        self.samples: list[list[np.ndarray]] = []
        self.traces: list[np.ndarray] = []
        self.summaries: list[dict] = []
        self.wall = 0.0
        self.use_xla = None

    # ----------------------------------------------------------- compiling
    def _compile(self):
        kernel, monitor_fn = self.kernel, self.monitor_fn

        def segment(state, results, seed, num_first, num_between, num_kept):
            with seeds.portable_samplers():
                return run_segment(state, results, seed, num_first,
                                   num_between, num_kept)

        def run_segment(state, results, seed, num_first, num_between,
                        num_kept):
            results = kernel_lib.zero_counters(results.inner_results)
            out = tfp.mcmc.sample_chain(
                num_results=num_kept, current_state=list(state),
                previous_kernel_results=results, kernel=kernel,
                num_burnin_steps=num_first,
                num_steps_between_results=num_between,
                trace_fn=lambda s, r: monitor_fn(
                    s, kernel_lib.target_log_prob(r.inner_results)),
                return_final_kernel_results=True, seed=seed)
            final = out.final_kernel_results
            summary = {"accept_prob_sum": final.accept_prob_sum,
                       "num_divergent": final.num_divergent,
                       "num_leapfrogs": final.num_leapfrogs,
                       "step_size": kernel_lib.per_chain_step_size(
                           final.inner_results)}
            return out.all_states, out.trace, final, summary

        self.segment = xla.compile_fn(segment, self.use_xla, "hmc_segment",
                                      stochastic=True)
        # Runs once per run: TF kernels spare an XLA compilation.
        self.bootstrap = xla.compile_fn(
            lambda s: kernel.bootstrap_results(list(s)), False,
            "hmc_bootstrap")

    # ---------------------------------------------------------- checkpoints
    def _ckpt_path(self):
        return os.path.join(self.dir, CHECKPOINT_FILE)

    def _try_resume(self) -> int:
        if self.dir is None or not os.path.exists(self._ckpt_path()):
            return 0
        arrays, meta = _load_checkpoint(self._ckpt_path(), self.fields)
        # An "auto" run keeps the compiler it chose first, so the resumed
        # samples stay bit-identical.
        self.use_xla = bool(meta["use_xla"])
        done = int(meta["segments_done"])
        if done < len(self.plan):
            self._compile()
            template = self.bootstrap(self.state)
            self.state, self.results = _restore(self._ckpt_path(), arrays,
                                                template, self.state)
        self.summaries = list(meta["summaries"])
        self.wall = float(meta["wall_seconds"])
        for j in range(done):
            if self.plan[j].phase == "sampling":
                parts, trace = _load_segment(self.dir, j, self.digest,
                                             len(self.state))
                self.samples.append(parts)
                self.traces.append(trace)
        if done == len(self.plan):
            self.final_inverse_mass = [np.asarray(arrays[f"inverse_mass_{i}"])
                                       for i in range(meta["num_mass_parts"])]
        logging.info("HMC: resuming from %s after segment %d/%d.",
                     self._ckpt_path(), done, len(self.plan))
        return done

    def _save(self, j: int, kept_parts, trace):
        if self.dir is None:
            return
        if kept_parts is not None:
            arrays = {f"state_{i}": p for i, p in enumerate(kept_parts)}
            arrays["trace"] = trace
            files.save_arrays(os.path.join(self.dir, _SEGMENT_FILE.format(j)),
                              arrays, {"digest": self.digest, "segment": j})
        arrays = {f"state_{i}": s.numpy() for i, s in enumerate(self.state)}
        for i, leaf in enumerate(_leaves(self.results)):
            arrays[f"results_{i}"] = leaf.numpy()
        mass = self._inverse_mass()
        for i, m in enumerate(mass):
            arrays[f"inverse_mass_{i}"] = m
        files.save_arrays(self._ckpt_path(), arrays, {
            "format": _FORMAT, "format_version": _FORMAT_VERSION,
            "config": self.fields, "digest": self.digest,
            "segments_done": j + 1,
            "iteration": sum(x["steps"] for x in self.summaries),
            "summaries": self.summaries, "num_mass_parts": len(mass),
            "wall_seconds": self.wall, "use_xla": bool(self.use_xla)})

    def _inverse_mass(self) -> list[np.ndarray]:
        return [m.numpy() for m in
                kernel_lib.inverse_mass(self.results.inner_results)]

    # ----------------------------------------------------------------- loop
    def run(self) -> ChainResult:
        start_segment = self._try_resume()
        if start_segment == 0:
            self.use_xla = xla.stochastic_jit(self.cfg.jit_compile)
            self._compile()
            self.results = self.bootstrap(self.state)
        base_seed = tf.constant(self.cfg.seed, tf.int32)
        seen_shapes = set()  # compiled in this process
        try:
            for j in range(start_segment, len(self.plan)):
                seg = self.plan[j]
                if seg.window is not None:
                    self.results = kernel_lib.begin_window(
                        self.results, self.state, seg.window[0],
                        seg.window[1], self.cfg)
                if seg.phase == "burnin":
                    num_first, num_between, num_kept = seg.steps - 1, 0, 1
                else:
                    thin = self.cfg.thinning
                    num_first, num_between, num_kept = thin - 1, thin - 1, seg.kept
                seed = seeds.fold_in(base_seed, j)
                tic = time.perf_counter()
                states, trace, self.results, summary = self.segment(
                    self.state, self.results, seed, tf.constant(num_first),
                    tf.constant(num_between), num_kept=num_kept)
                # jit_compile=False runs XLA where TF lacks a kernel (e.g.
                # grouped-convolution gradients on some CPUs): record it.
                self.use_xla = self.use_xla or self.segment.uses_xla()
                trace = trace.numpy()
                seconds = time.perf_counter() - tic
                self.wall += seconds
                self.state = [s[-1] for s in states]
                kept_parts = None
                if seg.phase == "sampling":
                    kept_parts = [s.numpy() for s in states]
                    self.samples.append(kept_parts)
                    self.traces.append(trace)
                summary = {k: v.numpy().tolist() for k, v in summary.items()}
                summary.update(segment=j, phase=seg.phase, steps=seg.steps,
                               num_kept=num_kept, seconds=seconds,
                               first_call=num_kept not in seen_shapes,
                               monitor=trace[-1].tolist())
                seen_shapes.add(num_kept)
                self.summaries.append(summary)
                self._save(j, kept_parts, trace)
                info = self._progress(j, summary)
                if self.callback is not None:
                    self.callback(info)
        except KeyboardInterrupt:
            logging.warning(
                "HMC: interrupted; %d segments are saved%s.",
                len(self.summaries),
                f" in {self.dir!r}; run again with the same arguments to "
                "resume" if self.dir else " nowhere (no checkpoint_dir)")
            raise
        if start_segment < len(self.plan):
            self.final_inverse_mass = self._inverse_mass()
        return self._result()

    def _progress(self, j: int, s: dict) -> dict:
        steps = sum(x["steps"] for x in self.summaries)
        total = sum(p.steps for p in self.plan)
        chains = len(s["step_size"])
        leapfrogs = float(sum(s["num_leapfrogs"]))
        rate = leapfrogs / max(s["seconds"], 1e-9)
        remaining = (total - steps) * leapfrogs / max(s["steps"], 1)
        info = {
            "segment": j, "num_segments": len(self.plan), "phase": s["phase"],
            "step": steps, "num_steps": total,
            "acceptance": float(np.sum(s["accept_prob_sum"])) / (
                s["steps"] * chains),
            "step_size": float(np.mean(s["step_size"])),
            "leapfrog_steps_per_iteration": leapfrogs / (s["steps"] * chains),
            "monitor": float(np.mean(s["monitor"])),
            "num_divergent": int(np.sum(s["num_divergent"])),
            "leapfrogs_per_second": rate,
            "eta_seconds": remaining / rate if rate > 0 else float("inf"),
            "rhat": (diag_lib.rhat_ess(
                np.concatenate(self.traces).astype(np.float64))[0]
                     if self.traces else float("nan")),
        }
        logging.info(
            "HMC segment %d/%d (%s): step %d/%d, acceptance %.3f, step size "
            "%.3g x %.1f leapfrogs, %s %.4g (R-hat so far %.3f), divergent %d, "
            "%.4g leapfrog steps/s, ETA %s",
            j + 1, len(self.plan), s["phase"], steps, total,
            info["acceptance"], info["step_size"],
            info["leapfrog_steps_per_iteration"], self.monitor_name,
            info["monitor"], info["rhat"], info["num_divergent"], rate,
            _format_eta(info["eta_seconds"]))
        return info

    def _result(self) -> ChainResult:
        parts = [np.concatenate([seg[i] for seg in self.samples], axis=0)
                 for i in range(len(self.state))]
        trace = np.concatenate(self.traces, axis=0)
        mass = [m.reshape(p.shape[1:]) for m, p in
                zip(self.final_inverse_mass, parts)]
        return ChainResult(parts, trace, self._diagnostics(parts, trace), mass)

    def _diagnostics(self, parts, trace) -> diag_lib.Diagnostics:
        sums = self.summaries
        chains = trace.shape[1]

        def phase_total(key, phase):
            rows = [np.asarray(s[key], np.float64) for s in sums
                    if s["phase"] == phase]
            return np.sum(rows, axis=0) if rows else np.zeros(chains)

        def phase_steps(phase):
            return sum(s["steps"] for s in sums if s["phase"] == phase)

        post = phase_steps("sampling")
        burn = phase_steps("burnin")
        acc = phase_total("accept_prob_sum", "sampling") / post
        burn_acc = (phase_total("accept_prob_sum", "burnin") / burn if burn
                    else np.full(chains, np.nan))
        rhat_ll, ess_ll = diag_lib.rhat_ess(trace.astype(np.float64))
        rhat_p, ess_p = diag_lib.rhat_ess(diag_lib.weight_projection(parts))
        leapfrogs = [float(np.sum(s["num_leapfrogs"])) for s in sums]
        steady = [(l, s["seconds"]) for l, s in zip(leapfrogs, sums)
                  if not s["first_call"]]
        if steady:
            rate = sum(l for l, _ in steady) / max(sum(t for _, t in steady),
                                                   1e-9)
            compile_s = sum(max(0.0, s["seconds"] - l / rate)
                            for l, s in zip(leapfrogs, sums) if s["first_call"])
        else:
            rate = sum(leapfrogs) / max(self.wall, 1e-9)
            compile_s = float("nan")
        mass = np.concatenate([m.reshape(chains, -1)
                               for m in self.final_inverse_mass], axis=1)
        return diag_lib.Diagnostics(
            kernel=self.cfg.kernel, num_chains=chains,
            num_results=trace.shape[0],
            acceptance_rate=tuple(float(a) for a in acc),
            burnin_acceptance_rate=tuple(float(a) for a in burn_acc),
            step_size=tuple(float(v) for v in sums[-1]["step_size"]),
            num_divergent=int(phase_total("num_divergent", "sampling").sum()),
            num_divergent_burnin=int(phase_total("num_divergent", "burnin").sum()),
            rhat_log_likelihood=rhat_ll, ess_log_likelihood=ess_ll,
            rhat_projection=rhat_p, ess_projection=ess_p,
            wall_seconds=float(self.wall), compile_seconds=float(compile_s),
            leapfrog_steps_per_second=float(rate),
            num_leapfrog_steps=int(sum(leapfrogs)),
            jit="xla" if self.use_xla else "default",
            num_segments=len(self.plan),
            inverse_mass_min=float(mass.min()),
            inverse_mass_max=float(mass.max()),
            mean_leapfrog_steps=float(
                phase_total("num_leapfrogs", "sampling").sum() /
                max(post * chains, 1)),
            max_rhat=self.cfg.max_rhat)
