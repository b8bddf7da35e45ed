"""The semantics of the authors' code, on purpose: :class:`PaperSemantics`.

Carbone et al. (NeurIPS 2020) report that BNNs resist gradient attacks.  Their
code (``ginevracoal/robustBNNs``) made choices that differ from the quantities
the paper defines (``../shared/PAPER.md``, "The original code, exactly").  The
package never makes these choices by accident; this module makes each of
them on purpose, one switch per choice, so that a study can turn them on and
off one at a time and see which of them produced the published numbers
(:mod:`tfp_bnn_adv.studies.paper_ablation`).

Every switch defaults to our corrected behaviour; ``True`` is the authors':

====================  =====  ================================================
switch                item   the authors' code (``True``)
====================  =====  ================================================
``attack_loss``       1      FGSM/PGD follow ``grad_x CE(y, logits = p_bar)``,
                             ``p_bar`` the mean per-sample softmax: a second
                             softmax (gradient kind ``"paper"``).  Corrected:
                             :attr:`PaperSemantics.corrected_gradient`.
``pgd_schedule``      3      PGD: 40 iterations of step ``2 / max(x)`` (every
                             iterate a corner of the eps-box), no random
                             start, projection each step.  Corrected: the
                             study's steps, step ``2.5 eps / steps``, a
                             random start.
``first_samples``     4      The first 10 posterior samples build the attack
                             and score it.  Corrected: all samples.
``softmax_metric``    6      Softmax robustness of a BNN's *probabilities*
                             (a second softmax; floor ~0.853 for 10 classes).
``gradient_measure``  7      Figure 1's size: the L-inf norm of ONE image's
                             expected gradient of the double-softmax loss, on
                             images whose norm falls at every step
                             (:func:`figure1_gradient_norms`).  Corrected: the
                             mean ``|component|`` of the expected gradient
                             over all points.
``hmc_training``      8      Pyro HMC restarted on each batch of 5000
                             points, 50 warm-up steps, 100 draws with
                             replacement from the 9 kept in the last run
                             only (:meth:`hmc_overrides`).
``vi_training``       9      VI with the KL over-weighted by ``N / B`` and
                             loc ~ N(0, 1), scale softplus(N(0, 1)) at the
                             start (:meth:`vi_overrides`).
``architecture``      10     Leaky-ReLU slope 0.01 (PyTorch's; Keras uses
                             0.2), the 2x512 MNIST HMC net, half-moons with
                             two hidden layers, scaled by one global min/max
                             of a fixed 30,000-point pool.
====================  =====  ================================================

Items 2 (FGSM is ``clamp(x + eps sign(g), 0, 1)``) and 5 (accuracy over all
attacked points) are what the package does anyway, so they need no switch.

Example:
  >>> sem = PaperSemantics.original()
  >>> sem.gradient, sem.num_samples_used(100)
  ('paper', 10)
  >>> PaperSemantics.corrected().replace(softmax_metric=True).switches_on()
  ('softmax_metric',)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from tfp_bnn_adv import gradients
from tfp_bnn_adv import metrics
from tfp_bnn_adv import validate
from tfp_bnn_adv.ensemble import check_ensemble

__all__ = ["PaperSemantics", "SWITCHES", "ATTACK_SWITCHES", "TRAINING_SWITCHES",
           "CORRECTED_GRADIENTS", "figure1_gradient_norms",
           "select_figure1_images", "double_softmax_floor"]

# switch -> (item of PAPER.md's list, what the authors' code did).
SWITCHES = {
    "attack_loss": (1, "attack loss CE(y, mean softmax) (double softmax)"),
    "pgd_schedule": (3, "PGD-40, step 2/max(x), no random start"),
    "first_samples": (4, "first 10 samples build and score the attack"),
    "softmax_metric": (6, "second softmax on BNN probabilities in the metric"),
    "gradient_measure": (7, "L-inf of one image's double-softmax gradient"),
    "hmc_training": (8, "HMC restarted per 5000-point batch, last run only"),
    "vi_training": (9, "VI with KL over-weighted by N/B, N(0,1) init"),
    "architecture": (10, "Leaky-ReLU 0.01, the original nets and scaling"),
}
# The switches that change how a trained posterior is attacked and scored.
ATTACK_SWITCHES = ("attack_loss", "pgd_schedule", "first_samples",
                   "softmax_metric")
# The switches that change how a posterior is trained.
TRAINING_SWITCHES = ("hmc_training", "vi_training")
CORRECTED_GRADIENTS = ("predictive", "expected")


def double_softmax_floor(num_classes: int) -> float:
    """The least softmax robustness of a BNN under the authors' metric.

    A second softmax over a probability vector moves each component by at
    most ``(e - 1) / (e + C - 1)`` (from a one-hot vector to another), so
    the metric is at least ``1 - (e - 1) / (e + C - 1)``: 0.853 for 10
    classes.
    """
    c = validate.integer(num_classes, "num_classes", minimum=2)
    return 1.0 - (math.e - 1.0) / (math.e + c - 1.0)


@dataclasses.dataclass(frozen=True)
class PaperSemantics:
    """One switch per choice of the authors' code; ``False`` is corrected.

    Attributes:
      attack_loss, pgd_schedule, first_samples, softmax_metric,
      gradient_measure, hmc_training, vi_training, architecture: the
        switches of :data:`SWITCHES` (see the module docstring).
      corrected_gradient: the gradient FGSM/PGD follow when ``attack_loss``
        is off: ``"predictive"`` (the posterior predictive's loss, Feng et
        al. 2024; the default) or ``"expected"`` (Theorem 1's quantity).
      num_samples: the authors' sample count for ``first_samples`` (10).
      pgd_steps: the authors' PGD iterations for ``pgd_schedule`` (40).
      hmc_batch_size: points per restarted HMC run for ``hmc_training``
        (the authors: 5000 of MNIST's 60,000; scale it with the data).
      hmc_warmup: warm-up steps of each restarted run (50).
      hmc_draws: draws with replacement from the last run (100).
      leaky_slope: the Leaky-ReLU slope of ``architecture`` (0.01).
    """
    attack_loss: bool = False
    pgd_schedule: bool = False
    first_samples: bool = False
    softmax_metric: bool = False
    gradient_measure: bool = False
    hmc_training: bool = False
    vi_training: bool = False
    architecture: bool = False
    corrected_gradient: str = "predictive"
    num_samples: int = 10
    pgd_steps: int = 40
    hmc_batch_size: int = 5000
    hmc_warmup: int = 50
    hmc_draws: int = 100
    leaky_slope: float = 0.01

    def __post_init__(self):
        for name in SWITCHES:
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {value!r} "
                                f"({validate.type_name(value)}).")
            object.__setattr__(self, name, bool(value))
        validate.choice(self.corrected_gradient, CORRECTED_GRADIENTS,
                        "corrected_gradient")
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        put("num_samples", validate.positive_int(self.num_samples,
                                                 "num_samples"))
        put("pgd_steps", validate.positive_int(self.pgd_steps, "pgd_steps"))
        put("hmc_batch_size", validate.positive_int(self.hmc_batch_size,
                                                    "hmc_batch_size"))
        put("hmc_warmup", validate.integer(self.hmc_warmup, "hmc_warmup",
                                           minimum=0))
        put("hmc_draws", validate.positive_int(self.hmc_draws, "hmc_draws"))
        put("leaky_slope", validate.positive_real(self.leaky_slope,
                                                  "leaky_slope"))

    @classmethod
    def original(cls, **overrides) -> "PaperSemantics":
        """Every switch as the authors' code had it."""
        return cls(**{name: True for name in SWITCHES}, **overrides)

    @classmethod
    def corrected(cls, **overrides) -> "PaperSemantics":
        """Every switch off: the package's own, corrected behaviour."""
        return cls(**overrides)

    def replace(self, **changes) -> "PaperSemantics":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def switches_on(self) -> tuple[str, ...]:
        """The names of the switches that are on, in :data:`SWITCHES` order."""
        return tuple(name for name in SWITCHES if getattr(self, name))

    # ------------------------------------------------------------- attacks
    @property
    def gradient(self) -> str:
        """The gradient kind FGSM and PGD follow."""
        return "paper" if self.attack_loss else self.corrected_gradient

    def num_samples_used(self, num_samples: int) -> int:
        """How many of an ensemble's ``num_samples`` build and score attacks."""
        s = validate.positive_int(num_samples, "num_samples")
        return min(s, self.num_samples) if self.first_samples else s

    def attack_ensemble(self, ensemble):
        """The ensemble that is attacked and scored: the first 10, or all."""
        check_ensemble(ensemble)
        n = self.num_samples_used(ensemble.num_samples)
        return ensemble if n == ensemble.num_samples else ensemble[:n]

    def pgd_options(self, x, steps: int) -> dict:
        """:func:`~tfp_bnn_adv.attacks.pgd` keywords of this semantics.

        Args:
          x: the clean inputs (the authors' step is ``2 / max(x)``).
          steps: the corrected schedule's number of steps.

        Returns:
          ``{"steps", "step_size", "random_start"}``; ``step_size`` is
          ``None`` (PGD's default ``2.5 eps / steps``) when corrected.
        """
        if not self.pgd_schedule:
            return {"steps": validate.positive_int(steps, "steps"),
                    "step_size": None, "random_start": True}
        top = float(np.max(x))
        if not top > 0:
            raise ValueError(f"the authors' PGD step 2 / max(x) needs max(x) "
                             f"> 0, got max(x) = {top:g}.")
        return {"steps": self.pgd_steps, "step_size": 2.0 / top,
                "random_start": False}

    def softmax_robustness(self, p_clean, p_adv, *, bayesian: bool) -> float:
        """:func:`~tfp_bnn_adv.metrics.softmax_robustness` of this semantics."""
        if self.softmax_metric:
            return metrics.softmax_robustness(p_clean, p_adv, semantics="paper",
                                              bayesian=bayesian)
        return metrics.softmax_robustness(p_clean, p_adv)

    # ------------------------------------------------------------ training
    def hmc_overrides(self, num_train: int) -> dict:
        """:class:`~tfp_bnn_adv.inference.hmc.HMCConfig` fields of training.

        ``hmc_training`` on: the authors' Pyro run, emulated by our sampler:
        one chain per run, restarted on every ``hmc_batch_size`` points in
        data order with ``hmc_warmup`` warm-up steps that adapt the step
        size (from 0.005) and a diagonal mass matrix, as Pyro's ``HMC``
        does by default, at Pyro's fixed trajectory length 0.005 x 10 =
        0.05 (our trajectory jitter of 20% stays); each run keeps
        ``int(hmc_draws / (N // batch)) + 1`` draws (9 on MNIST's 60,000
        points, as their code computed it), and the ensemble is
        ``hmc_draws`` draws with replacement from the last run's.  Off: no
        overrides (full-data HMC).

        Args:
          num_train: the training points ``N``.
        """
        n = validate.positive_int(num_train, "num_train")
        if not self.hmc_training:
            return {}
        per_run = int(self.hmc_draws / max(1, n // self.hmc_batch_size)) + 1
        return {"restart_batch_size": self.hmc_batch_size,
                "resample_draws": self.hmc_draws,
                "num_burnin_steps": self.hmc_warmup,
                "num_results": per_run, "num_chains": 1,
                "num_leapfrog_steps": None, "trajectory_length": 0.05,
                "step_size": 0.005, "mass_matrix": "diagonal"}

    def vi_overrides(self, num_train: int, batch_size: int) -> dict:
        """:func:`~tfp_bnn_adv.inference.vi.fit` keywords of training.

        ``vi_training`` on: ``kl_weight = N / B`` (Pyro's data plate sized
        to the batch) and ``init="paper"`` (loc ~ N(0, 1), scale
        softplus(N(0, 1))).  Off: none.
        """
        n = validate.positive_int(num_train, "num_train")
        b = validate.positive_int(batch_size, "batch_size")
        if not self.vi_training:
            return {}
        return {"kl_weight": n / min(b, n), "init": "paper"}

    def model_options(self) -> dict:
        """:func:`~tfp_bnn_adv.models.mlp` keywords of the architecture."""
        return ({"activation": "leaky_relu", "negative_slope": self.leaky_slope}
                if self.architecture else {})


# --------------------------------------------------------------------------
# Figure 1 of the paper: the size of one image's expected gradient.
# --------------------------------------------------------------------------
def figure1_gradient_norms(ensemble, x, y, *,
                           sample_counts: Sequence[int] = (1, 10, 100),
                           jit_compile=None) -> np.ndarray:
    """Per image, the L-inf norm of its expected gradient, as Figure 1's titles.

    The authors' measure (``../shared/PAPER.md``, item 7): for the first
    ``k`` posterior samples, ``max |(1/k) sum_{s<k} grad_x CE(y, logits =
    softmax f(x, w_s))|`` (the per-sample loss again takes probabilities as
    logits; :func:`~tfp_bnn_adv.gradients.paper_expected_loss_gradient`).
    Not the package's measure (the mean ``|component|`` of the
    expected gradient over all points, :func:`~tfp_bnn_adv.metrics.gradient_norm_stats`).

    Args:
      ensemble: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` with at
        least ``max(sample_counts)`` samples.
      x: images ``[N, *input_shape]``.
      y: int labels ``[N]``.
      sample_counts: increasing sample counts ``k`` (the paper: 1, 10, 100).
      jit_compile: see :func:`tfp_bnn_adv.xla.compile_fn`.

    Returns:
      float64 ``[N, len(sample_counts)]``: row ``i`` is image ``i``'s norm
      for each ``k``.

    Raises:
      ValueError: for counts that are not increasing or exceed the ensemble.
    """
    check_ensemble(ensemble)
    counts = [validate.positive_int(k, "sample_counts") for k in sample_counts]
    if not counts or any(b <= a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"sample_counts must be increasing, got "
                         f"{tuple(sample_counts)!r}.")
    if counts[-1] > ensemble.num_samples:
        raise ValueError(f"sample_counts asks for {counts[-1]} samples but the "
                         f"ensemble has {ensemble.num_samples}.")
    out = np.zeros((len(x), len(counts)))
    for j, k in enumerate(counts):
        grad = gradients.paper_expected_loss_gradient(ensemble[:k], x, y,
                                                      jit_compile=jit_compile)
        out[:, j] = np.abs(grad.reshape(len(grad), -1)).max(axis=1)
    return out


def select_figure1_images(norms) -> np.ndarray:
    """The authors' image selection: images whose norm falls at every step.

    Args:
      norms: ``[N, K]`` from :func:`figure1_gradient_norms`.

    Returns:
      int indices of the rows that strictly decrease along ``K``.
    """
    n = np.asarray(norms, dtype=np.float64)
    if n.ndim != 2 or n.shape[1] < 2:
        raise ValueError(f"norms must be [N, K] with K >= 2, got shape "
                         f"{n.shape}.")
    return np.nonzero(np.all(np.diff(n, axis=1) < 0, axis=1))[0]
