"""The entry point: a network and a dataset in, a diagnosed posterior out."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

from absl import logging
import numpy as np
import tensorflow as tf

from tfp_bnn_adv import distribute
from tfp_bnn_adv import files
from tfp_bnn_adv import seeds
from tfp_bnn_adv import validate
from tfp_bnn_adv import xla
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.inference.hmc import diagnostics as diag_lib
from tfp_bnn_adv.inference.hmc import init as init_lib
from tfp_bnn_adv.inference.hmc import target as target_lib
from tfp_bnn_adv.inference.hmc.config import HMCConfig
from tfp_bnn_adv.inference.hmc.driver import CHECKPOINT_FILE
from tfp_bnn_adv.inference.hmc.driver import check_checkpoint_dir
from tfp_bnn_adv.inference.hmc.driver import run_chains
from tfp_bnn_adv.network import Network

__all__ = ["sample", "restart_batches", "resample_indices",
           "distinct_samples"]

# One run per restart batch, each checkpointed in its own subdirectory.
_BATCH_DIR = "batch_{:05d}"


def _architecture_hash(network: Network) -> str:
    return files.config_digest(network.get_config())


def _has_checkpoint(checkpoint_dir) -> bool:
    return checkpoint_dir is not None and os.path.exists(
        os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_FILE))


def _probe_set(network, x, y, probe_x, probe_y, num_points):
    """The probe inputs (held-out when given, else a fixed training subset)."""
    if probe_x is None:
        if probe_y is not None:
            raise ValueError("probe_y was given without probe_x.")
        n = int(x.shape[0])
        idx = np.unique(np.linspace(0, n - 1, min(n, num_points)).astype(int))
        return tf.gather(x, idx), tf.gather(y, idx).numpy(), "train"
    px, py = network.check_inputs(probe_x, probe_y, x_name="probe_x",
                                  y_name="probe_y")
    return px, (None if py is None else py.numpy()), "held_out"


def sample(network, train_x, train_y, *, config: HMCConfig | None = None,
           init=None, probe_x=None, probe_y=None,
           checkpoint_dir: str | None = None,
           segment_callback: Callable[[dict], Any] | None = None,
           strategy=None, **settings
           ) -> tuple[PosteriorEnsemble, diag_lib.Diagnostics]:
    """Samples a BNN posterior with full-batch preconditioned HMC (or NUTS).

    The target is ``log p(w) + sum_n log softmax(f(x_n, w))[y_n]`` with the
    prior ``N(0, prior_scale^2)`` on every weight and bias and the
    likelihood summed over *all* training points.  ``num_chains`` chains
    start from over-dispersed points (prior draws by default), adapt a step
    size and a diagonal mass matrix each in Stan's windows, and advance
    together in one compiled, vectorised step; see
    :mod:`~tfp_bnn_adv.inference.hmc.kernel` and
    :func:`~tfp_bnn_adv.inference.hmc.run_chains`.

    Afterwards the function-space diagnostics are computed on a probe set
    (``probe_x``, else a fixed subset of the training inputs): per probe
    point, the rank-normalised split R-hat and bulk ESS of the predictive
    probability across chains.  A posterior whose median R-hat exceeds
    ``max_rhat`` is logged as UNCONVERGED and marked so in its
    diagnostics (``diagnostics.converged``).

    Args:
      network: a :class:`~tfp_bnn_adv.network.Network` or a built Keras 3
        model (imported with ``Network.from_keras``).
      train_x: inputs ``[N, *input_shape]``.
      train_y: integer labels ``[N]`` in ``[0, num_classes)``.
      config: an :class:`~tfp_bnn_adv.inference.hmc.HMCConfig`; keyword
        ``settings`` override its fields.
      init: ``"prior"``, ``"sgd"`` (see ``HMCConfig.init``) or an explicit
        list of float32 arrays ``[C, *shape]``; default the config's.
      probe_x: optional held-out inputs ``[P, *input_shape]`` for the
        function-space diagnostics.
      probe_y: optional labels ``[P]`` (per-chain probe accuracy).
      checkpoint_dir: where to checkpoint and resume (``None``: nowhere).
      segment_callback: called with progress figures after every segment.
      strategy: a ``tf.distribute.Strategy`` to spread the likelihood over;
        ``None`` uses the strategy whose scope is open, if any.
      **settings: any field of :class:`HMCConfig`: ``num_chains`` (4),
        ``num_burnin_steps`` (500), ``num_results`` (200), ``thinning``,
        ``step_size`` (initial, 0.01), ``trajectory_length`` (default
        ``HMCConfig.DEFAULT_TRAJECTORY_LENGTH``) or ``num_leapfrog_steps``,
        ``max_leapfrog_steps`` (100), ``trajectory_jitter`` (0.2),
        ``mass_matrix`` (``"diagonal"``), ``kernel`` (``"hmc"``),
        ``target_accept_prob`` (0.8), ``num_adaptation_steps`` (all of
        warm-up), ``prior_scale`` (1), ``seed``, ``init_steps``,
        ``init_batch_size``, ``init_learning_rate``, ``init_jitter``,
        ``shard_size``, ``jit_compile``, ``parallelism``,
        ``matmul_precision``, ``num_probe_points`` (256), ``max_rhat``
        (1.1), ``checkpoint_every``, ``max_tree_depth``,
        ``restart_batch_size`` and ``resample_draws`` (``None``).

    Returns:
      ``(ensemble, diagnostics)``: a
      :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` of ``S = C * R`` weight
      sets (chain-major: sample ``c * R + r`` is chain ``c``'s ``r``-th kept
      state), float32 parameters ``[S, *shape]``, with ``metadata``
      ``{"method": "hmc", "settings", "diagnostics", "traces",
      "num_chains", "converged"}`` (an emulation adds ``"emulation"``:
      ``Diagnostics.emulation`` and the ``resample_indices`` into the
      last run's chain-major draws; then ``S = resample_draws`` and the
      traces are the last run's chains); and the
      :class:`~tfp_bnn_adv.inference.hmc.Diagnostics`.

    Raises:
      ValueError / TypeError: for a bad setting (naming it), inputs whose
        shape does not fit the network, ``train_x``/``train_y`` length
        mismatch, bad labels, a probe set of the wrong shape, or a
        checkpoint written by another configuration or an older version
        (a batch-restarted run and a full-data run never share a
        ``checkpoint_dir``).

    Example:
      >>> data = tfp_bnn_adv.data.half_moons(n=500)
      >>> model = tfp_bnn_adv.models.mlp((2,), 2, hidden=(16,))
      >>> ens, diag = sample(model, data.train_x, data.train_y, num_chains=4,
      ...                    num_burnin_steps=500, num_results=200, seed=0)
      >>> ens.num_samples, diag.converged
      (800, True)
    """
    unknown = set(settings) - set(HMCConfig.field_names())
    if unknown:
        raise TypeError(f"sample() got unexpected keyword arguments "
                        f"{sorted(unknown)}; the settings are the fields of "
                        "HMCConfig.")
    explicit_state = None
    if init is not None and not isinstance(init, str):
        explicit_state = init
    elif init is not None:
        settings["init"] = init
    if config is None:
        config = HMCConfig(**settings)
    else:
        validate.instance(config, HMCConfig, "config")
        config = config.replace(**settings) if settings else config
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    if not isinstance(network, Network):
        network = Network.from_keras(network)
    x, y = network.check_inputs(train_x, train_y, x_name="train_x",
                                y_name="train_y")
    n = int(x.shape[0])
    probe = _probe_set(network, x, y, probe_x, probe_y,
                       config.num_probe_points)
    strategy = distribute.current_strategy(strategy)
    replicas = distribute.num_replicas(strategy)
    target_lib.check_parallelism(config.parallelism, config.num_chains,
                                 replicas)
    if explicit_state is not None:
        init_cfg, explicit_state = init_lib.check_explicit_init(
            network, config.num_chains, explicit_state)
    elif config.init == "prior":
        init_cfg = "prior"
    else:
        init_cfg = {"kind": "sgd", "steps": config.init_steps,
                    "batch_size": config.init_batch_size,
                    "learning_rate": config.init_learning_rate,
                    "jitter": config.init_jitter}
    data_hash = init_lib.array_hash(x.numpy(), y.numpy())
    batches = restart_batches(n, config.restart_batch_size)
    _check_checkpoint_layout(checkpoint_dir, config)
    run = functools.partial(
        _run, network, config=config, strategy=strategy, replicas=replicas,
        explicit_state=explicit_state)
    def run_fingerprint(points: int):
        """The shard size of a run on ``points`` and its checkpoint fields."""
        shard_size = config.shard_size or target_lib.auto_shard_size(
            network, config.num_chains, points)
        return shard_size, {"architecture": _architecture_hash(network),
                            "data": data_hash, "num_train": n,
                            "num_chains": config.num_chains,
                            "prior_scale": config.prior_scale,
                            "shard_size": shard_size, "init": init_cfg}

    if batches is None:
        shard_size, fingerprint = run_fingerprint(n)
        if config.resample_draws is not None:
            # Only when set, so every other run's checkpoints keep their digest.
            fingerprint["resample_draws"] = config.resample_draws
        result = run(x, y, seed=config.seed, shard_size=shard_size,
                     fingerprint=fingerprint, checkpoint_dir=checkpoint_dir,
                     segment_callback=segment_callback)
        batch_wall = result.diagnostics.wall_seconds
    else:
        result, shard_size, fingerprint, batch_wall = _run_batches(
            run, run_fingerprint, x, y, batches, config=config,
            checkpoint_dir=checkpoint_dir, segment_callback=segment_callback)

    probs = diag_lib.probe_probabilities(network, result.states, probe[0])
    fs = diag_lib.function_space(probs, probe[1])
    fields = {f.name for f in dataclasses.fields(diag_lib.Diagnostics)}
    diagnostics = dataclasses.replace(
        result.diagnostics, probe_source=probe[2],
        **{k: v for k, v in fs.items() if k in fields})
    # [R, C, ...] -> chain-major [C * R, ...].
    params = [np.reshape(np.swapaxes(p, 0, 1), (-1,) + p.shape[2:])
              for p in result.states]
    indices = None
    if config.emulates_paper:
        if config.resample_draws is not None:
            indices = resample_indices(config.seed, params[0].shape[0],
                                       config.resample_draws)
            params = [p[indices] for p in params]
        lo, hi = (0, n) if batches is None else batches[-1]
        diagnostics = dataclasses.replace(diagnostics, emulation={
            "restart_batch_size": config.restart_batch_size,
            "num_batches": 1 if batches is None else len(batches),
            "num_train": n, "last_batch_start": lo, "last_batch_stop": hi,
            "last_batch_points": hi - lo,
            "resample_draws": config.resample_draws,
            "draws_before_resampling": int(result.states[0].shape[0] *
                                           result.states[0].shape[1]),
            "distinct_samples": distinct_samples(params),
            "wall_seconds_all_batches": float(batch_wall)})
    log = logging.info if diagnostics.converged else logging.warning
    log("HMC posterior (%d chains x %d draws): %s", config.num_chains,
        config.num_results, diagnostics.summary())
    settings_out = dict(fingerprint)
    settings_out.update(config.to_dict())
    settings_out.update(seed=config.seed, num_replicas=replicas,
                        shard_size=shard_size, init=init_cfg,
                        compile_path=diagnostics.jit)
    metadata = {"method": "hmc", "settings": settings_out,
                "num_chains": config.num_chains,
                "diagnostics": diagnostics.to_dict(),
                "converged": diagnostics.converged,
                "traces": diag_lib.traces_metadata(
                    result.trace, diag_lib.weight_projection(result.states),
                    fs["trace"])}
    if diagnostics.emulation is not None:
        metadata["emulation"] = dict(
            diagnostics.emulation,
            resample_indices=None if indices is None else indices.tolist())
    return PosteriorEnsemble(network, params, metadata=metadata), diagnostics


def restart_batches(num_train: int, restart_batch_size: int | None
                    ) -> list[tuple[int, int]] | None:
    """The ``[start, stop)`` ranges of the restart batches, in data order.

    Args:
      num_train: training points ``N``.
      restart_batch_size: ``B``, or ``None`` (no restarts).

    Returns:
      ``None`` without restarts; else ``ceil(N / B)`` consecutive ranges of
      ``B`` points, the last one holding the remaining ``N - (k - 1) B``.

    Example:
      >>> restart_batches(12, 5)
      [(0, 5), (5, 10), (10, 12)]
    """
    if restart_batch_size is None:
        return None
    return [(lo, min(lo + restart_batch_size, num_train))
            for lo in range(0, num_train, restart_batch_size)]


def resample_indices(seed, num_draws: int, k: int) -> np.ndarray:
    """``k`` indices drawn uniformly with replacement from ``[0, num_draws)``.

    The stateless seed is ``fold_in(seed, -1)``: batch restarts fold in
    their indices ``0, 1, ...``, so the two never share a seed.

    Returns:
      int64 numpy ``[k]``, in the order drawn.
    """
    draws = seeds.integers([k], seeds.fold_in(seed, -1), maxval=num_draws)
    return draws.numpy().astype(np.int64)


def distinct_samples(params) -> int:
    """How many different weight sets a stack ``[S, *shape]`` holds."""
    rows = np.concatenate([np.reshape(np.asarray(p), (p.shape[0], -1))
                           for p in params], axis=1)
    return len({r.tobytes() for r in rows})


def _batch_dir(checkpoint_dir: str, batch: int) -> str:
    return os.path.join(checkpoint_dir, _BATCH_DIR.format(batch))


def _check_checkpoint_layout(checkpoint_dir, config: HMCConfig) -> None:
    """Refuses to mix a full-data run and batch restarts in one directory."""
    if checkpoint_dir is None or not os.path.isdir(checkpoint_dir):
        return
    restarts = config.restart_batch_size is not None
    if restarts and _has_checkpoint(checkpoint_dir):
        raise ValueError(
            f"checkpoint_dir {checkpoint_dir!r} holds a full-data HMC run "
            f"({CHECKPOINT_FILE}), but restart_batch_size="
            f"{config.restart_batch_size} checkpoints one run per batch in "
            "batch_NNNNN/ subdirectories. Use another checkpoint_dir or "
            "delete it to start afresh; runs are never mixed.")
    if not restarts and os.path.isdir(_batch_dir(checkpoint_dir, 0)):
        raise ValueError(
            f"checkpoint_dir {checkpoint_dir!r} holds batch-restarted runs "
            f"({_BATCH_DIR.format(0)}/, ...) of restart_batch_size=<int>, "
            "but restart_batch_size is None (full data) now. Use another "
            "checkpoint_dir or delete it to start afresh; runs are never "
            "mixed.")


def _run_batches(run, run_fingerprint, x, y, batches, *, config,
                 checkpoint_dir, segment_callback):
    """One run per restart batch; returns the last one's result.

    ``run_fingerprint(points)`` gives a run's shard size and checkpoint
    fields, as for a full-data run.

    Returns:
      ``(result, shard_size, fingerprint, wall_seconds)``: the last run's
      :class:`ChainResult`, shard size and fingerprint, and the wall time of
      all runs' segments.
    """
    n, total = int(x.shape[0]), len(batches)
    wall = 0.0
    for b, (lo, hi) in enumerate(batches):
        shard_size, fingerprint = run_fingerprint(hi - lo)
        fingerprint.update({
            # Named so that a refused checkpoint of another batch size
            # names restart_batch_size (keys are compared in sorted order).
            "restart_batch_size": config.restart_batch_size,
            "restart_batch_index": b, "restart_num_batches": total,
            "restart_range": [lo, hi],
            "resample_draws": config.resample_draws})
        batch_dir = (None if checkpoint_dir is None else
                     _batch_dir(checkpoint_dir, b))
        logging.info("HMC paper emulation: batch %d/%d (training points "
                     "%d-%d of %d)%s.", b + 1, total, lo, hi - 1, n,
                     "" if b + 1 < total else
                     "; the last: its run is the posterior")
        callback = None
        if segment_callback is not None:
            def batch_callback(info, b=b):
                return segment_callback(dict(info, batch=b, num_batches=total))
            callback = batch_callback
        result = run(x[lo:hi], y[lo:hi],
                     seed=[int(v) for v in seeds.fold_in(config.seed, b).numpy()],
                     shard_size=shard_size, fingerprint=fingerprint,
                     checkpoint_dir=batch_dir, segment_callback=callback)
        wall += result.diagnostics.wall_seconds
    return result, shard_size, fingerprint, wall


def _run(network, x, y, *, config, strategy, replicas, explicit_state, seed,
         shard_size, fingerprint, checkpoint_dir, segment_callback):
    """One HMC run on ``(x, y)``: the target, the start, :func:`run_chains`."""
    run_jit = config.jit_compile
    if replicas == 1:
        shards = target_lib.shard_data(x, y, shard_size)

        def likelihood(*params):
            return target_lib.log_likelihood(network, params, *shards)
    else:
        # The segment loop holds one copy of the state and runs on the host
        # device; each replica's likelihood gradient is compiled on its own.
        # Never timed: the chain is chaotic, so its path must not depend on
        # a measurement (see tfp_bnn_adv.xla).
        local_jit = xla.stochastic_jit(run_jit)
        likelihood = target_lib.replicated_log_likelihood(
            network, strategy, x, y, shard_size=shard_size,
            parallelism=config.parallelism, num_chains=config.num_chains,
            jit_compile=local_jit)
        run_jit = False
        logging.info("HMC over %d replicas (%s-parallel, per-replica XLA: %s).",
                     replicas, config.parallelism, local_jit)

    prior_scale = config.prior_scale

    def target(*params):
        return likelihood(*params) + target_lib.log_prior(params, prior_scale)

    def monitor(params, tlp):
        return tlp - target_lib.log_prior(params, prior_scale)

    init_seed, chain_seed = tf.unstack(seeds.split(seed, 2))
    if explicit_state is not None:
        state = explicit_state
    elif config.init == "prior" or _has_checkpoint(checkpoint_dir):
        # A resumed run only needs the state's shapes; the SGD fit is skipped.
        state = init_lib.prior_init(network, config.num_chains, prior_scale,
                                    init_seed)
    else:
        # A short one-off loop: XLA unless pinned off (auto-tuning would run
        # the whole fit several times).
        state = init_lib.sgd_init(
            network, x, y, num_chains=config.num_chains,
            prior_scale=prior_scale, seed=init_seed, steps=config.init_steps,
            batch_size=config.init_batch_size,
            learning_rate=config.init_learning_rate,
            jitter=config.init_jitter,
            use_xla=config.jit_compile is not False)
    # The chains know nothing of restarts and resampling: those happen here.
    chain_config = config.replace(
        seed=[int(v) for v in chain_seed.numpy()], jit_compile=run_jit,
        restart_batch_size=None, resample_draws=None)
    with distribute.matmul_precision(config.matmul_precision):
        return run_chains(
            target, state, config=chain_config, checkpoint_dir=checkpoint_dir,
            monitor_fn=monitor, monitor_name="log-likelihood",
            fingerprint=fingerprint, segment_callback=segment_callback)
