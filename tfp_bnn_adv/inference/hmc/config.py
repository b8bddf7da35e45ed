"""One frozen, validated description of an HMC run: :class:`HMCConfig`.

Every setting of :func:`~tfp_bnn_adv.inference.hmc.sample` and
:func:`~tfp_bnn_adv.inference.hmc.run_chains` lives here, is checked once in
``__post_init__`` (a clear ``TypeError``/``ValueError`` naming the field and
its value, before any work) and is then passed down unchanged to the kernel,
driver, init and diagnostics modules.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

from tfp_bnn_adv import distribute
from tfp_bnn_adv import seeds
from tfp_bnn_adv import validate
from tfp_bnn_adv import xla

__all__ = ["HMCConfig", "KERNELS", "MASS_MATRICES", "INITS", "check_int",
           "check_positive_real", "check_seed"]

KERNELS = ("hmc", "nuts")
MASS_MATRICES = ("diagonal", "identity")
INITS = ("prior", "sgd")


def check_int(value, name: str, minimum: int) -> int:
    """``value`` as an int ``>= minimum`` (:func:`tfp_bnn_adv.validate.integer`)."""
    return validate.integer(value, name, minimum=minimum)


check_positive_real = validate.positive_real


def check_seed(seed) -> list[int]:
    """A stateless seed ``[2]`` as a JSON-able list (for fingerprints).

    An int must be in ``[0, 2**31)`` (:func:`tfp_bnn_adv.validate.seed_int`);
    anything else must be a shape-``[2]`` integer seed.
    """
    if isinstance(seed, (numbers.Integral, np.integer, bool, np.bool_)):
        seed = validate.seed_int(seed)
    return [int(v) for v in seeds.stateless(seed).numpy()]


@dataclasses.dataclass(frozen=True)
class HMCConfig:
    """Every setting of an HMC/NUTS run, validated once.

    Sampler:
      kernel: ``"hmc"`` (``tfp.mcmc.HamiltonianMonteCarlo``) or ``"nuts"``
        (``tfp.mcmc.NoUTurnSampler``), both run with the adapted diagonal
        mass matrix (see :mod:`~tfp_bnn_adv.inference.hmc.kernel`).
      num_chains: independent chains ``C``.
      num_burnin_steps: warm-up iterations per chain, discarded.
      num_results: kept samples per chain ``R``.
      thinning: iterations per kept sample after warm-up.
      num_adaptation_steps: warm-up iterations that adapt step size and mass
        matrix (Stan-style windows); default all of ``num_burnin_steps``.
      step_size: initial leapfrog step size; dual averaging adapts one per
        chain.
      trajectory_length: HMC's integration time ``L`` in the preconditioned
        coordinates; each iteration takes
        ``ceil(u * L / step_size)`` leapfrog steps with ``u`` uniform in
        ``[1 - trajectory_jitter, 1 + trajectory_jitter]`` (jitter avoids
        periodic orbits), at most ``max_leapfrog_steps``.  Measured on
        half-moons and Fashion-MNIST BNNs (README, "HMC defaults"): the
        adapted step sizes were 0.006-0.01, so with the default ``L = 4``
        the cap of 100 steps binds; 100 steps per iteration mixed the
        function better than 50 or 78 at the same number of iterations.
      num_leapfrog_steps: a fixed leapfrog count instead (no jitter); give
        either this or ``trajectory_length``, not both.
      max_leapfrog_steps: the upper bound on leapfrog steps per iteration.
      trajectory_jitter: relative jitter of the trajectory length in
        ``[0, 1)``.
      mass_matrix: ``"diagonal"`` (adapted in the slow windows from the
        chain's own draws) or ``"identity"`` (plain HMC).
      target_accept_prob: acceptance probability dual averaging aims for.
      max_tree_depth: NUTS' maximum tree depth.
      checkpoint_every: iterations per compiled segment (and checkpoint);
        default about a tenth of the run.
      jit_compile: ``True``, ``False``, ``"auto"`` or ``None`` (see
        :func:`tfp_bnn_adv.xla.resolve_jit`).
      seed: an int or a stateless seed ``[2]``.

    BNN target and start (used by :func:`sample` only):
      prior_scale: prior standard deviation of every weight.
      init: ``"prior"`` (a prior draw per chain: over-dispersed starts) or
        ``"sgd"`` (a short MAP fit per chain from its own Keras
        initialisation, plus jitter).
      init_steps, init_batch_size, init_learning_rate, init_jitter: the
        ``"sgd"`` fit.
      shard_size: training points per likelihood shard (``None``: by a
        memory budget).
      parallelism: ``"data"`` or ``"chains"`` across replicas.
      matmul_precision: ``"highest"`` or ``"default"``.
      num_probe_points: training inputs used as the function-space probe set
        when no held-out probe set is given.
      max_rhat: a posterior is *converged* when the median function-space
        R-hat is at most this (>= 1).

    Emulating the paper's sampler (used by :func:`sample` only; both
    ``None`` by default, which leaves every result as it was):
      restart_batch_size: ``None`` conditions on all training data.  An int
        ``B`` emulates the code of Carbone et al. (2020), which restarted
        HMC on every batch of ``B`` training points: the data are cut into
        consecutive batches in data order (the last one possibly partial),
        one complete run (warm-up, adaptation and sampling as configured)
        is made per batch with the likelihood summed over that batch only,
        each from a fresh start (the ``init`` rule) with its own seed
        ``fold_in(seed, batch index)``, and only the LAST run is kept.  The
        posterior is then conditioned on the last batch only; the
        diagnostics say so (``Diagnostics.emulation``).
      resample_draws: ``None`` keeps every kept draw of every chain.  An int
        ``k`` returns ``k`` draws with replacement, in the order drawn, from
        the pooled draws of the (last) run, as Pyro's
        ``MCMC.get_samples(k)`` did; the draw indices come from
        ``fold_in(seed, -1)`` (no batch index uses it).  The diagnostics
        stay those of the chains before resampling.

    Example:
      >>> cfg = HMCConfig(num_chains=4, num_burnin_steps=500,
      ...                 trajectory_length=3.0)
      >>> cfg.replace(num_results=50).num_results
      50
    """

    kernel: str = "hmc"
    num_chains: int = 4
    num_burnin_steps: int = 500
    num_results: int = 200
    thinning: int = 1
    num_adaptation_steps: Any = None
    step_size: float = 0.01
    trajectory_length: Any = None
    num_leapfrog_steps: Any = None
    max_leapfrog_steps: int = 100
    trajectory_jitter: float = 0.2
    mass_matrix: str = "diagonal"
    target_accept_prob: float = 0.8
    max_tree_depth: int = 10
    checkpoint_every: Any = None
    jit_compile: Any = None
    seed: Any = 0
    prior_scale: float = 1.0
    init: str = "prior"
    init_steps: int = 300
    init_batch_size: int = 256
    init_learning_rate: float = 1e-3
    init_jitter: float = 0.01
    shard_size: Any = None
    parallelism: str = "data"
    matmul_precision: str = "highest"
    num_probe_points: int = 256
    max_rhat: float = 1.1
    restart_batch_size: Any = None
    resample_draws: Any = None

    # The default integration time, used when neither trajectory_length nor
    # num_leapfrog_steps is given.
    DEFAULT_TRAJECTORY_LENGTH = 4.0

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        validate.choice(self.kernel, KERNELS, "kernel")
        validate.choice(self.mass_matrix, MASS_MATRICES, "mass_matrix")
        put("num_chains", validate.positive_int(self.num_chains, "num_chains"))
        b = validate.integer(self.num_burnin_steps, "num_burnin_steps",
                             minimum=0)
        put("num_burnin_steps", b)
        put("num_results", validate.positive_int(self.num_results,
                                                 "num_results"))
        put("thinning", validate.positive_int(self.thinning, "thinning"))
        a = b if self.num_adaptation_steps is None else validate.integer(
            self.num_adaptation_steps, "num_adaptation_steps", minimum=0)
        if a > b:
            raise ValueError(
                f"num_adaptation_steps ({a}) must not exceed num_burnin_steps "
                f"({b}): samples drawn while the sampler adapts are not from "
                "the posterior.")
        put("num_adaptation_steps", a)
        put("step_size", validate.positive_real(self.step_size, "step_size"))
        put("max_leapfrog_steps", validate.positive_int(
            self.max_leapfrog_steps, "max_leapfrog_steps"))
        if self.num_leapfrog_steps is not None:
            if self.trajectory_length is not None:
                raise ValueError(
                    "Give trajectory_length or num_leapfrog_steps, not both; "
                    f"got trajectory_length={self.trajectory_length!r} and "
                    f"num_leapfrog_steps={self.num_leapfrog_steps!r}.")
            put("num_leapfrog_steps", validate.positive_int(
                self.num_leapfrog_steps, "num_leapfrog_steps"))
        else:
            length = (self.DEFAULT_TRAJECTORY_LENGTH
                      if self.trajectory_length is None else
                      validate.positive_real(self.trajectory_length,
                                             "trajectory_length"))
            put("trajectory_length", float(length))
        put("trajectory_jitter", validate.real(
            self.trajectory_jitter, "trajectory_jitter", minimum=0, maximum=1,
            max_open=True))
        put("target_accept_prob", validate.real(
            self.target_accept_prob, "target_accept_prob", minimum=0,
            maximum=1, min_open=True, max_open=True))
        put("max_tree_depth", validate.positive_int(self.max_tree_depth,
                                                    "max_tree_depth"))
        total = b + self.num_results * self.thinning
        every = (max(1, -(-total // 10)) if self.checkpoint_every is None else
                 validate.positive_int(self.checkpoint_every, "checkpoint_every"))
        put("checkpoint_every", every)
        mode = xla.resolve_jit(self.jit_compile)
        put("jit_compile", mode if isinstance(mode, str) else bool(mode))
        put("seed", check_seed(self.seed))
        put("prior_scale", validate.positive_real(self.prior_scale,
                                                  "prior_scale"))
        if not isinstance(self.init, str) or self.init not in INITS:
            raise ValueError(f"init must be one of {INITS} (or, in sample(), "
                             f"a list of arrays [C, *shape]), got "
                             f"{self.init!r}.")
        put("init_steps", validate.positive_int(self.init_steps, "init_steps"))
        put("init_batch_size", validate.positive_int(self.init_batch_size,
                                                     "init_batch_size"))
        put("init_learning_rate", validate.positive_real(
            self.init_learning_rate, "init_learning_rate"))
        put("init_jitter", validate.nonnegative_real(self.init_jitter,
                                                     "init_jitter"))
        if self.shard_size is not None:
            put("shard_size", validate.positive_int(self.shard_size, "shard_size"))
        validate.choice(self.parallelism, ("data", "chains"), "parallelism")
        distribute.check_matmul_precision(self.matmul_precision)
        put("num_probe_points", validate.positive_int(self.num_probe_points,
                                                      "num_probe_points"))
        mr = validate.real(self.max_rhat, "max_rhat")
        if mr < 1:
            raise ValueError(f"max_rhat must be >= 1 (R-hat is never below 1 "
                             f"in expectation), got {self.max_rhat!r}.")
        put("max_rhat", mr)
        put("restart_batch_size", validate.optional_positive_int(
            self.restart_batch_size, "restart_batch_size"))
        put("resample_draws", validate.optional_positive_int(
            self.resample_draws, "resample_draws"))

    @classmethod
    def as_authors(cls, **overrides) -> "HMCConfig":
        """The HMC of Carbone et al. (2020), as their code ran it on MNIST.

        Pyro's ``HMC(step_size=0.005, num_steps=10)`` with 50 warm-up steps
        and one chain, restarted on every batch of 5000 training points,
        then ``get_samples(100)`` from the last run: ``restart_batch_size=
        5000``, ``resample_draws=100``, ``num_burnin_steps=50``,
        ``num_leapfrog_steps=10``, ``step_size=0.005``, ``num_chains=1``,
        ``mass_matrix="identity"``, ``num_results=100`` and, as for every
        config, the N(0, 1) prior (``prior_scale=1``).

        Pyro adapts the step size during warm-up by dual averaging (target
        acceptance 0.8, Stan's windows); ours does the same, so 0.005 is
        only the starting step size: all 50 warm-up steps adapt
        (``num_adaptation_steps`` = 50: Stan's shrunk windows of 7 fast,
        38 slow and 5 fast iterations, as Pyro's).

        Not emulated exactly:

        * Pyro's ``HMC`` also adapts a diagonal mass matrix by default
          (``adapt_mass_matrix=True``) and keeps the *trajectory length*
          ``step_size * num_steps = 0.05`` fixed, so its leapfrog count
          follows the adapted step size; for that, override
          ``mass_matrix="diagonal", num_leapfrog_steps=None,
          trajectory_length=0.05, trajectory_jitter=0.0`` (our count is
          ``ceil`` where Pyro's is ``floor``, at most
          ``max_leapfrog_steps``).
        * The authors kept ``int(100 / (N // 5000)) + 1`` draws per run (9
          on MNIST's 60,000 points), not 100; pass ``num_results`` to match
          a given ``N``.
        * Pyro starts from ``init_to_uniform`` (uniform on [-2, 2]) and
          searches a reasonable first step size; we start from the
          ``init`` rule (a prior draw) at ``step_size``.
        * Their MNIST loader shuffled before batching; we batch in data
          order (shuffle the data first to emulate that).
        * The random numbers are ours, so no draw is reproduced.

        Args:
          **overrides: any fields of :class:`HMCConfig`, replacing these;
            a ``trajectory_length`` replaces ``num_leapfrog_steps=10``
            (the two exclude each other).

        Returns:
          A validated :class:`HMCConfig`.

        Example:
          >>> cfg = HMCConfig.as_authors(seed=3)
          >>> cfg.restart_batch_size, cfg.resample_draws, cfg.num_chains
          (5000, 100, 1)
        """
        settings = dict(restart_batch_size=5000, resample_draws=100,
                        num_burnin_steps=50, num_leapfrog_steps=10,
                        step_size=0.005, num_chains=1,
                        mass_matrix="identity", num_results=100)
        if "trajectory_length" in overrides and (
                "num_leapfrog_steps" not in overrides):
            settings.pop("num_leapfrog_steps")
        settings.update(overrides)
        return cls(**settings)

    @property
    def emulates_paper(self) -> bool:
        """Whether ``restart_batch_size`` or ``resample_draws`` is set."""
        return (self.restart_batch_size is not None or
                self.resample_draws is not None)

    def replace(self, **changes) -> "HMCConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def sampler_settings(self) -> dict:
        """The JSON-able settings that decide the Markov chain."""
        keys = ("kernel", "num_burnin_steps", "num_results", "thinning",
                "num_adaptation_steps", "step_size", "trajectory_length",
                "num_leapfrog_steps", "max_leapfrog_steps",
                "trajectory_jitter", "mass_matrix", "target_accept_prob",
                "max_tree_depth", "checkpoint_every", "jit_compile")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.field_names()}
