"""The robustness report: the attack battery, the worst case, the masking checks.

:func:`robustness_report` answers "is this posterior really robust at
``eps``, or does it only hide its gradients?" the way the field does
(``../shared/EVALUATION.md``): it runs a battery of attacks, takes the
per-example worst case over all of them (a point is robust only if every
attack failed on it), draws accuracy-vs-eps curves and runs the
gradient-masking checks of Athalye, Carlini & Wagner (2018) and Carlini et
al. (2019), then states a verdict a reader can trust.

The battery, for each reported gradient definition ``g`` (``gradient`` and
``gradients``; see :mod:`tfp_bnn_adv.attacks`):

* ``fgsm/g``, ``pgd/g`` (``steps`` steps of ``2.5 eps / steps``, a random
  start), ``apgd-ce/g`` and ``apgd-ce+apgd-t/g``: APGD-CE, then APGD-T
  (targeted DLR on the log posterior-predictive probabilities) on the points
  APGD-CE left, as :func:`tfp_bnn_adv.attacks.auto_attack` runs them.  The
  ``apgd-ce+apgd-t`` number is the robust accuracy after both (AutoAttack
  never runs APGD-T on the points APGD-CE already broke, so APGD-T alone has
  no number of its own);
* ``square`` (``square_queries`` queries; gradient-free, scored by log
  posterior-predictive margins) and ``random`` (``random_trials`` uniform
  draws from the ``eps``-ball per point, the worst kept).

Together APGD-CE, APGD-T and Square are AutoAttack's "standard" version
(without FAB-T, which the package does not implement); Square is run on every
point rather than on APGD's survivors, because check 2 needs its own number.
The checks add runs that are valid attacks too (``apgd-ce-2x/g``,
``fixed-sample/apgd-ce/g``, ``transfer/pgd/g``, ``transfer/apgd-ce/g``); the
worst case covers them as well.

Robust accuracy is the fraction of points classified correctly both clean
and after the attack (by the posterior predictive's arg-max), so a point
misclassified before any attack is never robust.

The checks, each ``{"passed", "value", "threshold", "explanation"}`` and each
a small pure function of per-attack results, named and numbered as in
:data:`CHECKS`:

1. ``iterative_vs_single_step`` -- :func:`iterative_check`;
2. ``gradient_free_vs_gradient`` -- :func:`gradient_free_check`;
3. ``random_vs_gradient`` -- :func:`random_check`;
4. ``accuracy_vs_eps`` -- :func:`eps_curve_check`;
5. ``more_steps_and_restarts`` -- :func:`steps_check`;
6. ``zero_gradients`` -- :func:`zero_gradient_check`;
7. ``fixed_sample`` -- :func:`fixed_sample_check`;
8. ``transfer`` -- :func:`transfer_check` (only with a ``reference``).

The verdict (:func:`verdict`): any failed check makes it ``"inconclusive"``
("masking suspected", naming the checks; the worst-case accuracy is then
only an upper bound); with every check passed it is ``"robust"`` when the
worst-case accuracy is at least ``robust_fraction`` times the clean
accuracy, else ``"not_robust"``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from tfp_bnn_adv import attacks
from tfp_bnn_adv import chunking
from tfp_bnn_adv import distribute
from tfp_bnn_adv import files
from tfp_bnn_adv import gradients as gradients_lib
from tfp_bnn_adv import validate
from tfp_bnn_adv import xla
from tfp_bnn_adv.ensemble import check_ensemble
from tfp_bnn_adv.studies import common

__all__ = ["robustness_report", "worst_case", "iterative_check",
           "gradient_free_check", "random_check", "eps_curve_check",
           "steps_check", "zero_gradient_flags", "zero_gradient_check",
           "fixed_sample_check", "transfer_check", "verdict",
           "default_eps_grid", "CHECKS", "VERDICTS", "CURVE_ATTACKS"]

# Check number -> name; verdict reasons cite both.
CHECKS = ("iterative_vs_single_step", "gradient_free_vs_gradient",
          "random_vs_gradient", "accuracy_vs_eps", "more_steps_and_restarts",
          "zero_gradients", "fixed_sample", "transfer")
VERDICTS = ("not_robust", "robust", "inconclusive")
CURVE_ATTACKS = ("fgsm", "apgd-ce", "square")

# Tolerances (fractions of the points), justified in each check's docstring.
ITERATIVE_TOLERANCE = 0.01
GRADIENT_FREE_TOLERANCE = 0.02
RANDOM_TOLERANCE = 0.01
CURVE_TOLERANCE = 0.01
CHANCE_MARGIN = 0.05
STEPS_TOLERANCE = 0.01
ZERO_GRADIENT_THRESHOLD = 0.01
TRANSFER_TOLERANCE = 0.02
# Accuracies are counts over N in float64: compare with this much slack so
# that 0.55 - 0.5 counts as the 0.05 it is.
_ROUNDING = 1e-9
# The default curve: box width times 2^-6, ..., 2^-1, 1.
_GRID_POINTS = 7
# Floats of per-sample gradients held at once for gradient="sample".
_PER_SAMPLE_FLOATS = 2**24


def _check(passed: bool, value, threshold, explanation: str) -> dict:
    return {"passed": bool(passed), "value": value, "threshold": threshold,
            "explanation": explanation.strip()}


def _bools(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1 or a.dtype != bool:
        raise TypeError(f"{name} must be a 1-D bool array, got dtype {a.dtype}"
                        f", shape {a.shape}.")
    return a


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


# --------------------------------------------------------------------------
# The worst case and the checks: pure functions of per-attack results.
# --------------------------------------------------------------------------
def worst_case(clean_correct, robust: Mapping[str, Any]
               ) -> tuple[np.ndarray, np.ndarray]:
    """The per-example worst case over attacks.

    Args:
      clean_correct: bool ``[N]``, classified correctly before any attack.
      robust: attack name -> bool ``[N]``, still correct after that attack
        (in the order the attacks are named in ``broken_by``).

    Returns:
      ``(robust_all, broken_by)``: bool ``[N]``, clean-correct and robust to
      *every* attack (the AND over attacks); and str ``[N]``: ``""`` for a
      robust point, ``"clean"`` for one misclassified before any attack,
      else the first attack (in ``robust``'s order) that broke it.

    Raises:
      TypeError/ValueError: for arrays that are not 1-D bool of one length.

    Example:
      >>> worst_case(np.array([True, True, False]),
      ...            {"a": np.array([False, True, True]),
      ...             "b": np.array([True, True, False])})
      (array([False,  True, False]), array(['a', '', 'clean'], dtype='<U5'))
    """
    clean = _bools(clean_correct, "clean_correct")
    names = list(robust)
    width = max([5] + [len(n) for n in names])
    broken_by = np.where(clean, "", "clean").astype(f"<U{width}")
    robust_all = clean.copy()
    for name in names:
        r = _bools(robust[name], f"robust[{name!r}]")
        if r.shape != clean.shape:
            raise ValueError(f"robust[{name!r}] has {r.shape[0]} points, "
                             f"clean_correct {clean.shape[0]}.")
        newly = robust_all & ~r
        broken_by[newly] = name
        robust_all &= r
    return robust_all, broken_by


def iterative_check(pairs: Mapping[str, tuple], *,
                    tolerance: float = ITERATIVE_TOLERANCE) -> dict:
    """Check 1: an iterative attack is at least as strong as a single step,
    per example.

    For each ``(single-step, iterative)`` pair of one gradient definition,
    the fraction of points the single step broke and the iterative attack
    did not.  An iterative attack takes many steps along the same gradient
    and keeps any misclassified point it passes, so with an honest gradient
    it finds what one step finds; a single step beating it is Athalye et
    al.'s first sign of masking (a gradient that is informative only far
    from the point, or a loss surface that traps small steps).  The
    tolerance, 1 point, allows for the few points right at the decision
    boundary that a random start moves away from.

    Args:
      pairs: label (e.g. ``"fgsm/predictive vs pgd/predictive"``) ->
        ``(single_broken, iterative_broken)``, bool ``[N]`` each: the attack
        broke the point (clean-correct and misclassified after it).
      tolerance: the largest fraction allowed.

    Returns:
      The check dict; ``value`` is the largest fraction over the pairs.

    Example:
      >>> iterative_check({"f vs p": (np.array([True, False]),
      ...                             np.array([True, True]))})["passed"]
      True
    """
    worst, worst_label = 0.0, None
    for label, (single, iterative) in pairs.items():
        single = _bools(single, f"{label}: single_broken")
        iterative = _bools(iterative, f"{label}: iterative_broken")
        frac = float(np.mean(single & ~iterative))
        if worst_label is None or frac > worst:
            worst, worst_label = frac, label
    passed = worst <= tolerance + _ROUNDING
    return _check(passed, worst, tolerance,
                  f"Points a single step broke but the iterative attack did "
                  f"not: {_pct(worst)} at worst ({worst_label}); allowed "
                  f"{_pct(tolerance)}. "
                  + ("The iterative attacks dominate FGSM." if passed else
                     "A single step beats an iterative attack: its gradient "
                     "is misleading near the points (masking)."))


def gradient_free_check(square_accuracy: float,
                        gradient_accuracies: Mapping[str, float], *,
                        tolerance: float = GRADIENT_FREE_TOLERANCE) -> dict:
    """Check 2: the gradient-free attack is not stronger than the gradient
    attacks by more than ``tolerance``.

    Compares Square's robust accuracy with the best (lowest) of the
    *cross-entropy* gradient attacks (FGSM, PGD, APGD-CE, over the reported
    gradient definitions).  APGD-T is left out on purpose: its DLR loss on
    log-probabilities is scale-invariant and keeps working where the
    cross-entropy gradient underflows to zero, so including it would hide
    exactly the masking this check is for.  A score-based attack that needs
    no gradient beating every gradient attack means the gradients, not the
    model, resist (Athalye et al.'s second sign).  Tolerance: 2 points, for
    the randomness of the attacks.

    Args:
      square_accuracy: Square's robust accuracy.
      gradient_accuracies: attack name -> robust accuracy of the
        cross-entropy gradient attacks.
      tolerance: the largest margin allowed.

    Returns:
      The check dict; ``value`` is ``best gradient accuracy - square``.

    Example:
      >>> gradient_free_check(0.1, {"pgd/predictive": 0.5})["passed"]
      False
    """
    if not gradient_accuracies:
        raise ValueError("gradient_accuracies is empty.")
    best = min(gradient_accuracies, key=gradient_accuracies.get)
    value = float(gradient_accuracies[best]) - float(square_accuracy)
    passed = value <= tolerance + _ROUNDING
    return _check(passed, value, tolerance,
                  f"Square (gradient-free) leaves {_pct(square_accuracy)}; the "
                  f"best cross-entropy gradient attack ({best}) leaves "
                  f"{_pct(gradient_accuracies[best])}: Square is "
                  f"{'stronger' if value > 0 else 'weaker'} by "
                  f"{100 * abs(value):.1f} points (it may be stronger by "
                  f"{100 * tolerance:.0f}). "
                  + ("" if passed else "The cross-entropy gradient is masked "
                     "(e.g. it underflows on confident points)."))


def random_check(random_broken, gradient_broken, *,
                 tolerance: float = RANDOM_TOLERANCE) -> dict:
    """Check 3: random noise is not stronger than the gradient attacks.

    The fraction of points that random draws from the ball broke and no
    gradient attack did (Athalye et al.'s fourth sign).  Tolerance: 1 point,
    for points at the boundary where one of many draws gets lucky.

    Args:
      random_broken: bool ``[N]``, broken by the random attack.
      gradient_broken: bool ``[N]``, broken by at least one gradient attack.
      tolerance: the largest fraction allowed.

    Returns:
      The check dict; ``value`` is that fraction.

    Example:
      >>> random_check(np.array([True, True]), np.array([True, False]))["value"]
      0.5
    """
    r = _bools(random_broken, "random_broken")
    g = _bools(gradient_broken, "gradient_broken")
    value = float(np.mean(r & ~g))
    passed = value <= tolerance + _ROUNDING
    return _check(passed, value, tolerance,
                  f"Points random noise broke that no gradient attack broke: "
                  f"{_pct(value)} (allowed {_pct(tolerance)}). "
                  + ("" if passed else "Random sampling finds adversarial "
                     "examples the gradient attacks miss (masking)."))


def default_eps_grid(clip=(0.0, 1.0), points: int = _GRID_POINTS) -> list:
    """The default curve radii: geometric, ending at the box width.

    At the box width ``high - low`` the L-inf ball around any input covers
    the whole box, so an attack there can reach any input.

    Example:
      >>> default_eps_grid()
      [0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0]
    """
    width = float(clip[1]) - float(clip[0])
    return [width * 2.0 ** (k - points + 1) for k in range(points)]


def eps_curve_check(eps_grid: Sequence[float],
                    curves: Mapping[str, Sequence[float]], *, chance: float,
                    num_points: int, reach_chance: Sequence[str] | None = None,
                    margin: float = CHANCE_MARGIN) -> dict:
    """Check 4: accuracy falls with eps and reaches chance at the largest.

    The ball at a larger eps contains the smaller one, so a sound attack's
    curve never rises (Athalye et al.'s fifth sign); at the box width it can
    reach any input, so it must drive accuracy to chance (their third).
    Tolerance for a rise: 1 point or one example, whichever is more, because
    a randomised attack (random start, random squares) can miss at the
    larger radius a boundary point it found at the smaller.  ``chance`` + 5
    points allows for a few points that stay correct when every pixel is
    free.

    Args:
      eps_grid: the radii, increasing.
      curves: attack -> robust accuracy at each radius.
      chance: the accuracy of always predicting the most frequent label.
      num_points: ``N``, for the one-example tolerance.
      reach_chance: the curves that must end at chance + ``margin``
        (default: all).
      margin: the allowance above chance.

    Returns:
      The check dict; ``value`` is ``{"max_increase", "at_largest_eps":
      {attack: accuracy}}`` and ``threshold`` ``{"max_increase",
      "at_largest_eps"}``.

    Example:
      >>> eps_curve_check([0.1, 1.0], {"apgd-ce": [0.5, 0.1]}, chance=0.1,
      ...                 num_points=100)["passed"]
      True
    """
    tol = max(CURVE_TOLERANCE, 1.0 / num_points)
    reach = list(curves) if reach_chance is None else list(reach_chance)
    rises, ends = {}, {}
    for name, acc in curves.items():
        acc = np.asarray(acc, np.float64)
        if acc.shape != (len(eps_grid),):
            raise ValueError(f"curves[{name!r}] has {acc.size} values for "
                             f"{len(eps_grid)} radii.")
        rises[name] = float(np.max(np.diff(acc), initial=0.0))
        ends[name] = float(acc[-1])
    max_rise = max(rises.values(), default=0.0)
    limit = chance + margin
    monotone = max_rise <= tol + _ROUNDING
    too_high = [n for n in reach if ends[n] > limit + _ROUNDING]
    passed = monotone and not too_high
    rising = [n for n, r in rises.items() if r > tol + _ROUNDING]
    text = (f"Largest rise of robust accuracy with eps: {100 * max_rise:.1f} "
            f"points (allowed {100 * tol:.1f}"
            + (f"; rising: {', '.join(rising)}" if rising else "") + "). At "
            f"the largest eps ({eps_grid[-1]:g}): "
            + ", ".join(f"{n} {_pct(v)}" for n, v in ends.items())
            + f"; chance + {100 * margin:.0f} points is {_pct(limit)}"
            + (f" ({', '.join(too_high)} stay above it: an attack that can "
               "reach any input does not succeed, masking)" if too_high
               else "") + ".")
    return _check(passed, {"max_increase": max_rise, "at_largest_eps": ends},
                  {"max_increase": tol, "at_largest_eps": limit}, text)


def steps_check(accuracy: float, doubled_accuracy: float, *,
                tolerance: float = STEPS_TOLERANCE) -> dict:
    """Check 5: doubling APGD's steps and restarts changes nothing.

    Carlini et al.: an attack run to convergence does not improve with more
    iterations and restarts; if it does by 1 point or more, the reported
    numbers are not the attack's limit.

    Args:
      accuracy: APGD-CE's robust accuracy.
      doubled_accuracy: the same with twice the steps and restarts.
      tolerance: the change must be strictly smaller.

    Returns:
      The check dict; ``value`` is ``accuracy - doubled_accuracy``.

    Example:
      >>> steps_check(0.5, 0.45)["passed"]
      False
    """
    value = float(accuracy) - float(doubled_accuracy)
    passed = abs(value) < tolerance - _ROUNDING
    return _check(passed, value, tolerance,
                  f"APGD-CE leaves {_pct(accuracy)}; with twice the steps and "
                  f"restarts {_pct(doubled_accuracy)}: a change of "
                  f"{100 * value:.1f} points (must be under "
                  f"{100 * tolerance:.0f}). "
                  + ("" if passed else "The attack has not converged: more "
                     "effort changes the answer."))


def zero_gradient_flags(grad) -> np.ndarray:
    """Per point, whether its input gradient is exactly zero or non-finite.

    Args:
      grad: float ``[N, *input_shape]``.

    Returns:
      bool ``[N]``: every component exactly 0, or any component NaN/inf.

    Example:
      >>> zero_gradient_flags(np.array([[0.0, 0.0], [0.0, 1e-30], [np.nan, 1]]))
      array([ True, False,  True])
    """
    g = np.asarray(grad)
    if g.ndim < 2 or not np.issubdtype(g.dtype, np.floating):
        raise ValueError(f"grad must be a float array [N, ...], got dtype "
                         f"{g.dtype}, shape {g.shape}.")
    flat = g.reshape(g.shape[0], -1)
    return np.all(flat == 0, axis=1) | ~np.all(np.isfinite(flat), axis=1)


def zero_gradient_check(flags, *, gradient: str,
                        threshold: float = ZERO_GRADIENT_THRESHOLD) -> dict:
    """Check 6: the attacked loss has a usable gradient at the clean points.

    An exactly-zero gradient (float32 underflow of a saturated softmax) or a
    non-finite one gives a gradient attack nothing to follow: its failure
    there says nothing about robustness.  At most 1% of the points may have
    one.

    Args:
      flags: bool ``[M]`` from :func:`zero_gradient_flags` (points, or
        (sample, point) pairs for ``gradient="sample"``).
      gradient: the gradient definition, for the explanation.
      threshold: the largest fraction allowed.

    Returns:
      The check dict; ``value`` is the flagged fraction.

    Example:
      >>> zero_gradient_check(np.array([True, False]), gradient="expected")["value"]
      0.5
    """
    f = _bools(flags, "flags")
    value = float(np.mean(f))
    passed = value <= threshold + _ROUNDING
    return _check(passed, value, threshold,
                  f"The {gradient} loss gradient is exactly zero or "
                  f"non-finite at {_pct(value)} of the clean points (allowed "
                  f"{_pct(threshold)}). "
                  + ("" if passed else "Gradient attacks cannot move these "
                     "points: their failure there is masking, not "
                     "robustness."))


def fixed_sample_check(transfer_accuracy: float, best_white_box: float, *,
                       sample_accuracy: float, sample_index: int,
                       num_samples: int, ensemble_looks_robust: bool,
                       sample_falls: bool,
                       tolerance: float = TRANSFER_TOLERANCE) -> dict:
    """Check 7: the attack still succeeds against one fixed posterior sample.

    Carlini et al.: attack the model with its randomness fixed.  Here one
    posterior sample ``w_i`` is attacked white-box (APGD-CE on
    ``ensemble[i:i+1]``), and its adversarial examples are evaluated on the
    full posterior.  **Passed** when that transfer leaves at least the best
    white-box attack's robust accuracy minus 2 points: examples crafted on
    one sample breaking the posterior more than any attack on the posterior
    itself mean that the posterior's gradients (an average over samples that
    can cancel, Theorem 1) hide what a single sample's gradient shows.  The
    sample's own robust accuracy is reported beside: a posterior that looks
    robust while its single samples fall owes its robustness to averaging,
    which the explanation says.

    Args:
      transfer_accuracy: the posterior's robust accuracy on the sample's
        adversarial examples.
      best_white_box: the lowest robust accuracy of the white-box gradient
        attacks on the posterior.
      sample_accuracy: the sample's own robust accuracy under its attack.
      sample_index: ``i``.
      num_samples: ``S``.
      ensemble_looks_robust: the worst case reaches ``robust_fraction``
        of the clean accuracy.
      sample_falls: the sample's robust accuracy is below
        ``robust_fraction`` of its clean accuracy.
      tolerance: the margin allowed.

    Returns:
      The check dict; ``value`` is ``best_white_box - transfer_accuracy``.

    Example:
      >>> fixed_sample_check(0.2, 0.6, sample_accuracy=0.0, sample_index=0,
      ...                    num_samples=10, ensemble_looks_robust=True,
      ...                    sample_falls=True)["passed"]
      False
    """
    value = float(best_white_box) - float(transfer_accuracy)
    passed = value <= tolerance + _ROUNDING
    text = (f"APGD-CE against posterior sample {sample_index} (of "
            f"{num_samples}) leaves that sample {_pct(sample_accuracy)}; its "
            f"adversarial examples leave the posterior {_pct(transfer_accuracy)}"
            f", the best white-box attack on the posterior "
            f"{_pct(best_white_box)} (transfer may be stronger by at most "
            f"{100 * tolerance:.0f} points). ")
    if num_samples == 1:
        text += "With S = 1 the sample is the whole posterior. "
    elif ensemble_looks_robust and sample_falls:
        text += ("The posterior looks robust but a single sample falls: its "
                 "robustness comes from averaging over samples. ")
    if not passed:
        text += ("A single sample's gradient finds what the posterior's "
                 "gradient hides (masking by averaging).")
    return _check(passed, value, tolerance, text)


def transfer_check(transfer_accuracy: float, best_white_box: float, *,
                   tolerance: float = TRANSFER_TOLERANCE) -> dict:
    """Check 8: transfer from an undefended reference is not stronger than
    the white-box attacks.

    Athalye et al.'s second sign: a black-box (transfer) attack beating
    white-box attacks means the white-box gradients are masked.  Tolerance:
    2 points.

    Args:
      transfer_accuracy: the posterior's robust accuracy on adversarial
        examples crafted on the reference (the stronger of PGD and APGD-CE).
      best_white_box: the lowest robust accuracy of the white-box gradient
        attacks on the posterior.
      tolerance: the margin allowed.

    Returns:
      The check dict; ``value`` is ``best_white_box - transfer_accuracy``.

    Example:
      >>> transfer_check(0.5, 0.4)["passed"]
      True
    """
    value = float(best_white_box) - float(transfer_accuracy)
    passed = value <= tolerance + _ROUNDING
    return _check(passed, value, tolerance,
                  f"Transfer from the reference leaves "
                  f"{_pct(transfer_accuracy)}; the best white-box attack "
                  f"{_pct(best_white_box)} (transfer may be stronger by at "
                  f"most {100 * tolerance:.0f} points). "
                  + ("" if passed else "A transfer attack beats the "
                     "white-box attacks: their gradients are masked."))


def verdict(checks: Mapping[str, Mapping[str, Any]],
            worst_case_accuracy: float, clean_accuracy: float, *,
            robust_fraction: float = 0.5, eps: float | None = None
            ) -> tuple[str, str]:
    """The one-line verdict and its reason.

    Any failed check of a sign of masking: ``"inconclusive"``, "masking
    suspected (checks k name, ...)", the worst-case accuracy stated as an
    upper bound.  Check 5 (more steps and restarts changed the answer)
    failing alone says the attacks have not converged: more effort can only
    lower the worst case, so it leaves a ``"not_robust"`` standing and makes
    a would-be ``"robust"`` ``"inconclusive"``.  All
    passed: ``"robust"`` if ``worst_case_accuracy >= robust_fraction *
    clean_accuracy``, else ``"not_robust"``.

    Args:
      checks: name (one of :data:`CHECKS`) -> check dict.
      worst_case_accuracy: the per-example worst case over all attacks.
      clean_accuracy: accuracy before any attack.
      robust_fraction: in ``(0, 1]``.
      eps: the radius, for the wording.

    Returns:
      ``(verdict, reason)``.

    Example:
      >>> verdict({"zero_gradients": {"passed": False}}, 0.3, 0.9)[0]
      'inconclusive'
    """
    at = f" at eps={eps:g}" if eps is not None else ""
    failed = [name for name in CHECKS
              if name in checks and not checks[name]["passed"]]
    failed += [name for name in checks
               if name not in CHECKS and not checks[name]["passed"]]
    bar = robust_fraction * clean_accuracy
    low = (f"the worst-case accuracy {worst_case_accuracy:.3f}{at} is below "
           f"{robust_fraction:g} of the clean accuracy {clean_accuracy:.3f} "
           f"({bar:.3f})")
    budget = "more_steps_and_restarts"
    unconverged = (f"the attacks have not converged (check "
                   f"{CHECKS.index(budget) + 1} {budget}: more steps and "
                   "restarts changed the answer; raise steps)")
    masking = [n for n in failed if n != budget]
    if masking:
        cited = ", ".join(f"{CHECKS.index(n) + 1} {n}" if n in CHECKS else n
                          for n in masking)
        return "inconclusive", (
            f"masking suspected (checks {cited})"
            + (f"; {unconverged}" if budget in failed else "")
            + f"; the worst-case accuracy {worst_case_accuracy:.3f}{at} is "
            "only an upper bound on the robust accuracy.")
    if budget in failed:
        # More effort can only lower the worst case: it cannot turn a
        # "not robust" into "robust", only the other way round.
        if worst_case_accuracy < bar:
            return "not_robust", (
                f"{low}, and {unconverged.replace('; raise steps', '')}, so "
                "more effort could only lower it further.")
        return "inconclusive", (
            f"{unconverged}; the worst-case accuracy "
            f"{worst_case_accuracy:.3f}{at} is only an upper bound on the "
            "robust accuracy.")
    if worst_case_accuracy >= bar:
        return "robust", (
            f"every check passed and the worst-case accuracy "
            f"{worst_case_accuracy:.3f}{at} keeps at least {robust_fraction:g}"
            f" of the clean accuracy {clean_accuracy:.3f} (>= {bar:.3f}).")
    return "not_robust", f"every check passed and {low}."


# --------------------------------------------------------------------------
# Argument checks (all before any attack runs).
# --------------------------------------------------------------------------
def _check_eps_grid(eps_grid, width: float) -> list:
    if eps_grid is None:
        return None
    if isinstance(eps_grid, (str, bytes)) or not isinstance(
            eps_grid, (Sequence, np.ndarray)):
        raise TypeError(f"eps_grid must be a sequence of radii, got "
                        f"{eps_grid!r}.")
    grid = [validate.real(e, f"eps_grid[{i}]", minimum=0.0, min_open=True)
            for i, e in enumerate(eps_grid)]
    if len(grid) < 2:
        raise ValueError(f"eps_grid needs at least 2 radii, got {eps_grid!r}.")
    if any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"eps_grid must be strictly increasing, got "
                         f"{eps_grid!r}.")
    if grid[-1] > width * (1 + 1e-6):
        raise ValueError(f"eps_grid's largest radius {grid[-1]:g} is outside "
                         f"the input box (width {width:g}).")
    if grid[-1] < width * (1 - 1e-6):
        raise ValueError(
            f"eps_grid must end at the box width {width:g} (got "
            f"{grid[-1]:g}): check 4 needs a radius that reaches any input, "
            "where accuracy must fall to chance.")
    return grid


def _check_gradients(gradient, extra) -> list:
    first = validate.choice(gradient, attacks.GRADIENTS, "gradient")
    if extra is None:
        extra = ()
    if isinstance(extra, str) or not isinstance(extra, (Sequence, np.ndarray)):
        raise TypeError(f"gradients must be a sequence of gradient "
                        f"definitions, got {extra!r}.")
    out = [first]
    for i, g in enumerate(extra):
        validate.choice(g, attacks.GRADIENTS, f"gradients[{i}]")
        if g not in out:
            out.append(g)
    return out


def _check_reference(reference, ensemble):
    if reference is None:
        return None
    check_ensemble(reference, "reference")
    a, b = ensemble.network, reference.network
    if tuple(a.input_shape) != tuple(b.input_shape):
        raise ValueError(f"reference takes inputs of shape {b.input_shape}; "
                         f"the ensemble takes {a.input_shape}.")
    if a.num_classes != b.num_classes:
        raise ValueError(f"reference has {b.num_classes} classes; the "
                         f"ensemble has {a.num_classes}.")
    return reference


def _derived_seed(seed: int, k: int) -> int:
    """Attack ``k``'s int seed, a pure function of ``(seed, k)``."""
    state = np.random.SeedSequence([seed, k]).generate_state(1)[0]
    return int(state & 0x7FFFFFFF)


# --------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------
class _Runner:
    """Runs attacks, scores them and remembers every setting."""

    def __init__(self, ensemble, x, y, eps, common_kwargs, seed, progress):
        self.ensemble, self.x, self.y, self.eps = ensemble, x, y, eps
        self.kwargs = common_kwargs
        self.seed = seed
        self.progress = progress
        self.settings: dict[str, dict] = {}
        self.robust: dict[str, np.ndarray] = {}
        self.accuracy: dict[str, float] = {}
        self._k = 0
        self.clean = self.correct(ensemble, x)

    def correct(self, ensemble, x_adv) -> np.ndarray:
        pred = ensemble.predict(x_adv, batch_size=self.kwargs["batch_size"],
                                chunk_size=self.kwargs["chunk_size"],
                                jit_compile=self.kwargs["jit_compile"])
        return pred == self.y

    def next_seed(self) -> int:
        self._k += 1
        return _derived_seed(self.seed, self._k)

    def record(self, name, robust, settings) -> float:
        self.robust[name] = robust
        self.accuracy[name] = float(np.mean(robust))
        self.settings[name] = settings
        self.progress.step(f"{name}: robust accuracy "
                           f"{self.accuracy[name]:.3f}")
        return self.accuracy[name]

    def attack(self, name, fn, eps=None, *, target=None, record=True,
               **options):
        """``fn(target, x, y, eps, seed=..., **options)``, scored on the
        ensemble; returns ``(robust [N], x_adv)``."""
        target = self.ensemble if target is None else target
        eps = self.eps if eps is None else eps
        seed = self.next_seed()
        x_adv = fn(target, self.x, self.y, eps, seed=seed, **options,
                   **self.kwargs)
        robust = self.clean & self.correct(self.ensemble, x_adv)
        settings = dict(attack=fn.__name__, eps=eps, seed=seed,
                        **{k: _jsonable(v) for k, v in options.items()})
        if record:
            self.record(name, robust, settings)
        return robust, x_adv


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, tuple):
        return [_jsonable(e) for e in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(e) for k, e in v.items()}
    if isinstance(v, list):
        return [_jsonable(e) for e in v]
    return v


def _zero_gradient_flags(ensemble, x, y, gradient, kwargs) -> np.ndarray:
    """:func:`zero_gradient_flags` of the ``gradient`` loss at ``x``.

    ``"sample"`` follows one sample's cross-entropy gradient per step, so
    every (sample, point) pair counts: bool ``[S * N]``, sample-major; those
    gradients are computed a few points at a time to bound memory.
    """
    opts = {k: kwargs[k] for k in ("batch_size", "chunk_size", "jit_compile",
                                   "strategy")}
    if gradient == "expected":
        return zero_gradient_flags(
            gradients_lib.expected_loss_gradient(ensemble, x, y, **opts))
    if gradient == "predictive":
        return zero_gradient_flags(
            gradients_lib.predictive_loss_gradient(ensemble, x, y, **opts))
    if gradient == "paper":
        return zero_gradient_flags(
            gradients_lib.paper_loss_gradient(ensemble, x, y, **opts))
    size = int(np.prod(x.shape[1:]))
    step = max(1, _PER_SAMPLE_FLOATS // (ensemble.num_samples * size))
    flags = []  # [S, b] per slice of points
    for i in range(0, x.shape[0], step):
        g = gradients_lib.per_sample_loss_gradients(
            ensemble, x[i:i + step], y[i:i + step], **opts)
        flags.append(zero_gradient_flags(
            g.reshape((-1,) + tuple(g.shape[2:]))).reshape(g.shape[:2]))
    return np.concatenate(flags, axis=1).ravel()


def robustness_report(ensemble, x, y, *, eps, eps_grid=None, reference=None,
                      gradient="predictive", seed=0, output_dir=None,
                      steps=100, square_queries=5000, random_trials=100,
                      batch_size=None, chunk_size=None, robust_fraction=0.5,
                      strategy=None, gradients=None, clip=(0.0, 1.0),
                      sample_index=None, max_rhat=1.1,
                      jit_compile=None) -> dict:
    """Attacks ``ensemble`` with the battery, runs the checks, gives a verdict.

    See the module docstring for the battery, the checks and the verdict.
    Progress is logged (absl) after every attack.

    Args:
      ensemble: the :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`
        (``S`` samples) under test.
      x: inputs ``[N, *input_shape]`` inside ``clip``.
      y: int labels ``[N]`` (required: robustness is measured against the
        truth).
      eps: the L-inf radius, in ``(0, high - low]``.
      eps_grid: the radii of the accuracy-vs-eps curves, strictly
        increasing in ``(0, high - low]`` and ending at ``high - low`` (where
        any input is reachable); default :func:`default_eps_grid` (7 radii,
        ``width / 64`` to ``width``).
      reference: an undefended model (e.g. the SGD network) as a
        :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` with the same
        input shape and classes; PGD and APGD-CE on it are transferred to
        ``ensemble`` (check 8).  ``None`` skips check 8.
      gradient: the gradient definition of the gradient attacks
        (``"predictive"``, ``"expected"``, ``"paper"``, ``"sample"``); the
        curves, check 5, check 6 and the transfers use it.
      seed: int; every attack's seed is derived from it.
      output_dir: with a path, ``report.md``, ``report.json`` and
        ``figures/accuracy_vs_eps.png`` are written there (atomically).
      steps: PGD's and APGD's steps (APGD-T: per target); check 5 uses
        twice as many.
      square_queries: Square's query budget per point.
      random_trials: random draws per point.
      batch_size, chunk_size, jit_compile, strategy: as in
        :func:`tfp_bnn_adv.attacks.fgsm`, for every attack, gradient and
        prediction.
      robust_fraction: in ``(0, 1]``; "robust" needs a worst-case accuracy
        of at least this fraction of the clean accuracy.
      gradients: further gradient definitions whose FGSM, PGD, APGD-CE and
        APGD-T are added to the battery (and the worst case), e.g.
        ``("expected",)``.
      clip: the input box ``(low, high)``.
      sample_index: the posterior sample of check 7 (default: one drawn
        from ``seed``).
      max_rhat: an HMC posterior counts as converged when its
        function-space R-hat median is at most this (``>= 1``).

    Returns:
      A JSON-able dict: ``"clean_accuracy"``; ``"robust_accuracy"``, flat
      ``{"fgsm/<g>", "pgd/<g>", "apgd-ce/<g>", "apgd-ce+apgd-t/<g>",
      "square", "random", "apgd-ce-2x/<g>", "fixed-sample/apgd-ce/<g>",
      ["transfer/pgd/<g>", "transfer/apgd-ce/<g>"]: float}``;
      ``"worst_case_accuracy"`` (over all of them, per example);
      ``"broken_by"`` (counts: ``"clean"``, each attack as the first that
      broke a point, ``"robust"``); ``"per_example"`` (``"robust"`` bools and
      ``"broken_by"`` names, ``[N]``); ``"accuracy_vs_eps"`` (``{"eps": [...],
      "fgsm": [...], "apgd-ce": [...], "square": [...]}``); ``"chance"``;
      ``"checks"`` (name -> check dict, see :data:`CHECKS`);
      ``"skipped_checks"`` (name -> why); ``"verdict"``; ``"verdict_reason"``;
      ``"verdict_line"``; ``"diagnostics"`` (the
      :func:`~tfp_bnn_adv.studies.common.convergence_report`, or ``None``
      when the metadata holds none); ``"diagnostics_statement"`` (in words,
      saying when diagnostics are absent or the posterior is UNCONVERGED);
      ``"fixed_sample"``, ``"transfer"`` (their numbers); ``"posterior"``
      (method, ``S``, input shape, classes); ``"settings"`` (every attack's
      settings and the report's own); ``"files"`` (with ``output_dir``).

    Raises:
      TypeError/ValueError: naming the argument, before any attack runs,
        for a bad ``ensemble``, ``x``/``y`` (shapes, labels, values outside
        ``clip``), ``eps`` outside ``(0, high - low]``, a bad ``eps_grid``,
        ``gradient(s)``, ``steps``, ``square_queries``, ``random_trials``,
        ``batch_size``, ``chunk_size``, ``jit_compile``, ``strategy``,
        ``robust_fraction`` outside
        ``(0, 1]``, ``seed``, ``sample_index``, ``max_rhat``, an
        ``output_dir`` that cannot be a directory, or a ``reference`` of
        another input shape or number of classes.

    Example:
      >>> report = robustness_report(ens, x_test[:500], y_test[:500],
      ...                            eps=0.1, reference=sgd_net,
      ...                            output_dir="runs/report")
      >>> report["verdict"], report["worst_case_accuracy"]
      ('not_robust', 0.02)
    """
    check_ensemble(ensemble)
    # The report needs an input box: the curves end where any input is
    # reachable.
    lo, hi = validate.value_range(clip, "clip", optional=False)
    width = hi - lo
    eps = validate.real(eps, "eps", minimum=0.0, min_open=True)
    if eps > width:
        raise ValueError(f"eps={eps:g} is outside the input box: the L-inf "
                         f"ball of radius {width:g} (clip={clip}) already "
                         "reaches every input.")
    grid = _check_eps_grid(eps_grid, width)
    if grid is None:
        grid = default_eps_grid((lo, hi))
    grads = _check_gradients(gradient, gradients)
    seed = validate.seed_int(seed, "seed")
    steps = validate.positive_int(steps, "steps")
    square_queries = validate.positive_int(square_queries, "square_queries")
    random_trials = validate.positive_int(random_trials, "random_trials")
    validate.optional_positive_int(batch_size, "batch_size")
    chunking.check_chunk_size(chunk_size)
    xla.resolve_jit(jit_compile)
    distribute.current_strategy(strategy)
    robust_fraction = validate.real(robust_fraction, "robust_fraction",
                                    minimum=0.0, maximum=1.0, min_open=True)
    max_rhat = common.check_max_rhat(max_rhat)
    reference = _check_reference(reference, ensemble)
    if output_dir is not None:
        output_dir = common.check_directory(output_dir, "output_dir")
    if y is None:
        raise TypeError("y is required: robust accuracy is measured against "
                        "the true labels.")
    x_t, y_t = ensemble.network.check_inputs(x, y)
    x, y = x_t.numpy(), y_t.numpy()
    if x.min() < lo or x.max() > hi:
        raise ValueError(f"x has values in [{x.min():g}, {x.max():g}], "
                         f"outside clip={clip}.")
    num_samples = ensemble.num_samples
    if sample_index is None:
        sample_index = int(np.random.default_rng(
            _derived_seed(seed, 0)).integers(num_samples))
    sample_index = validate.integer(sample_index, "sample_index", minimum=0,
                                    maximum=num_samples - 1)
    num_classes = ensemble.network.num_classes
    # Targeted DLR needs 4 classes: with fewer, APGD-T uses targeted
    # cross-entropy (auto_attack logs it; the settings record it).
    dlr_fallback = num_classes < 4
    n = x.shape[0]
    g0 = grads[0]
    diagnostics = common.convergence_report(ensemble.metadata, max_rhat)
    statement = _diagnostics_statement(ensemble, diagnostics)

    # ----------------------------------------------------------- the battery
    total = (4 * len(grads) + 4 + (2 if reference is not None else 0)
             + 3 * len(grid) + 1)
    progress = common.Progress("evaluation", total)
    kwargs = dict(clip=(lo, hi), batch_size=batch_size, chunk_size=chunk_size,
                  jit_compile=jit_compile, strategy=strategy)
    run = _Runner(ensemble, x, y, eps, kwargs, seed, progress)
    clean = run.clean
    clean_accuracy = float(np.mean(clean))
    logging.info("[evaluation] %s; clean accuracy %.3f on %d points, eps=%g",
                 statement, clean_accuracy, n, eps)
    # Every setting spelled out, so that the report records it.
    pgd_options = dict(steps=steps, step_size=2.5 * eps / steps,
                       random_start=True, restarts=1, norm=np.inf)
    apgd_options = dict(loss="ce", steps=steps, restarts=1, rho=0.75,
                        alpha=0.75, norm=np.inf)
    square_options = dict(max_queries=square_queries, p_init=0.3)
    broken = {}
    for g in grads:
        r, _ = run.attack(f"fgsm/{g}", attacks.fgsm, gradient=g, norm=np.inf)
        broken[f"fgsm/{g}"] = clean & ~r
        r, _ = run.attack(f"pgd/{g}", attacks.pgd, gradient=g, **pgd_options)
        broken[f"pgd/{g}"] = clean & ~r
        auto_seed = run.next_seed()
        result = attacks.auto_attack(
            ensemble, x, y, eps, version="custom",
            attacks=("apgd-ce", "apgd-t"), gradient=g, steps=steps, norm=np.inf,
            seed=auto_seed, dlr_fallback=dlr_fallback, **kwargs)
        by = np.asarray(result.broken_by).astype(str)
        # APGD-CE runs first, on every clean-correct point: the points it
        # broke are its own; APGD-T only runs on the rest.
        r_ce = clean & (by != "apgd-ce") & (by != "clean")
        auto_settings = dict(attack="auto_attack", eps=eps, seed=auto_seed,
                             **_jsonable(dict(result.settings)))
        run.record(f"apgd-ce/{g}", r_ce, auto_settings)
        broken[f"apgd-ce/{g}"] = clean & ~r_ce
        r_t = clean & np.asarray(result.robust, bool)
        run.record(f"apgd-ce+apgd-t/{g}", r_t, auto_settings)
        broken[f"apgd-ce+apgd-t/{g}"] = clean & ~r_t
    run.attack("square", attacks.square_attack, **square_options)
    r_rand, _ = run.attack("random", attacks.random_attack, kind="uniform",
                           trials=random_trials)

    # ------------------------------------------------ runs the checks need
    name_2x = f"apgd-ce-2x/{g0}"
    run.attack(name_2x, attacks.apgd, gradient=g0,
               **dict(apgd_options, steps=2 * steps, restarts=2))
    single = ensemble[sample_index:sample_index + 1]
    sample_gradient = "expected" if g0 == "sample" else g0
    name_fixed = f"fixed-sample/apgd-ce/{sample_gradient}"
    r_fixed, x_fixed = run.attack(name_fixed, attacks.apgd, target=single,
                                  gradient=sample_gradient, **apgd_options)
    run.settings[name_fixed]["sample_index"] = sample_index
    single_clean = run.correct(single, x)
    single_robust = single_clean & run.correct(single, x_fixed)
    transfer_names = []
    if reference is not None:
        for name, fn, opts in (
                (f"transfer/pgd/{g0}", attacks.pgd, pgd_options),
                (f"transfer/apgd-ce/{g0}", attacks.apgd, apgd_options)):
            run.attack(name, fn, target=reference, gradient=g0, **opts)
            run.settings[name]["source"] = "reference"
            transfer_names.append(name)

    # ------------------------------------------------------------ the curves
    curve_runs = (("fgsm", attacks.fgsm, dict(gradient=g0, norm=np.inf)),
                  ("apgd-ce", attacks.apgd, dict(apgd_options, gradient=g0)),
                  ("square", attacks.square_attack, square_options))
    curves = {a: [] for a in CURVE_ATTACKS}
    for e in grid:
        for attack, fn, opts in curve_runs:
            r, _ = run.attack(f"curve/{attack}", fn, eps=e, record=False,
                              **opts)
            curves[attack].append(float(np.mean(r)))
            progress.step(f"curve/{attack} at eps={e:g}: robust accuracy "
                          f"{curves[attack][-1]:.3f}")
    for attack, fn, opts in curve_runs:
        run.settings[f"curve/{attack}"] = dict(
            attack=fn.__name__, eps=list(grid),
            seed="derived from seed, one per radius",
            **{k: _jsonable(v) for k, v in opts.items()})

    flags = _zero_gradient_flags(ensemble, x, y, g0, kwargs)
    progress.step(f"zero gradients ({g0}): {np.mean(flags):.3f}")

    # -------------------------------------------------- worst case and checks
    attack_names = list(run.robust)
    robust_all, broken_by = worst_case(clean, {a: run.robust[a]
                                               for a in attack_names})
    worst = float(np.mean(robust_all))
    counts = {"clean": int(np.sum(broken_by == "clean"))}
    counts.update({a: int(np.sum(broken_by == a)) for a in attack_names})
    counts["robust"] = int(np.sum(robust_all))
    acc = run.accuracy
    ce_gradient = {k: acc[k] for a in ("fgsm", "pgd", "apgd-ce")
                   for k in (f"{a}/{g}" for g in grads)}
    white_box = [k for k in attack_names if k.split("/")[0] in (
        "fgsm", "pgd", "apgd-ce", "apgd-ce+apgd-t", "apgd-ce-2x")]
    best_white_box = min(acc[k] for k in white_box)
    gradient_broken = np.zeros(n, bool)
    for k in white_box:
        gradient_broken |= clean & ~run.robust[k]
    chance = float(np.max(np.bincount(y, minlength=num_classes)) / n)
    looks_robust = worst >= robust_fraction * clean_accuracy
    single_clean_acc = float(np.mean(single_clean))
    single_acc = float(np.mean(single_robust))
    checks = {
        "iterative_vs_single_step": iterative_check(
            {f"fgsm/{g} vs {it}/{g}": (broken[f"fgsm/{g}"], broken[f"{it}/{g}"])
             for g in grads for it in ("pgd", "apgd-ce")}),
        "gradient_free_vs_gradient": gradient_free_check(acc["square"],
                                                         ce_gradient),
        "random_vs_gradient": random_check(clean & ~r_rand, gradient_broken),
        "accuracy_vs_eps": eps_curve_check(grid, curves, chance=chance,
                                           num_points=n),
        "more_steps_and_restarts": steps_check(acc[f"apgd-ce/{g0}"],
                                               acc[name_2x]),
        "zero_gradients": zero_gradient_check(flags, gradient=g0),
        "fixed_sample": fixed_sample_check(
            acc[name_fixed], best_white_box, sample_accuracy=single_acc,
            sample_index=sample_index, num_samples=num_samples,
            ensemble_looks_robust=looks_robust,
            sample_falls=single_acc < robust_fraction * single_clean_acc),
    }
    skipped = {}
    transfer = None
    if reference is not None:
        best_transfer = min(transfer_names, key=acc.get)
        checks["transfer"] = transfer_check(acc[best_transfer], best_white_box)
        transfer = {"accuracy": {k: acc[k] for k in transfer_names},
                    "reference_accuracy": float(reference.accuracy(
                        x, y, batch_size=batch_size, chunk_size=chunk_size,
                        jit_compile=jit_compile)),
                    "reference_samples": reference.num_samples}
    else:
        skipped["transfer"] = "no reference model given"
    verdict_name, reason = verdict(checks, worst, clean_accuracy,
                                   robust_fraction=robust_fraction, eps=eps)
    if common.is_unconverged(diagnostics):
        reason += (" Note: the posterior is flagged UNCONVERGED, so these "
                   "numbers describe its samples, not the posterior.")
    line = f"verdict: {verdict_name}: {reason}"
    settings = dict(run.settings)
    settings["report"] = _jsonable(dict(
        eps=eps, eps_grid=grid, gradient=g0, gradients=grads, seed=seed,
        steps=steps, square_queries=square_queries,
        random_trials=random_trials, batch_size=batch_size,
        chunk_size=chunk_size, jit_compile=jit_compile,
        robust_fraction=robust_fraction, clip=[lo, hi],
        norm="inf", sample_index=sample_index, max_rhat=max_rhat,
        dlr_fallback=dlr_fallback, num_points=n))
    report = {
        "clean_accuracy": clean_accuracy,
        "robust_accuracy": {a: acc[a] for a in attack_names},
        "worst_case_accuracy": worst,
        "broken_by": counts,
        "per_example": {"robust": robust_all.tolist(),
                        "broken_by": broken_by.tolist()},
        "accuracy_vs_eps": {"eps": list(grid), **curves},
        "chance": chance,
        "checks": checks,
        "skipped_checks": skipped,
        "verdict": verdict_name,
        "verdict_reason": reason,
        "verdict_line": line,
        "diagnostics": diagnostics if diagnostics["diagnostics"] else None,
        "diagnostics_statement": statement,
        "fixed_sample": {"index": sample_index, "clean_accuracy":
                         single_clean_acc, "robust_accuracy": single_acc,
                         "transfer_accuracy": acc[name_fixed]},
        "transfer": transfer,
        "posterior": {"method": ensemble.metadata.get("method"),
                      "num_samples": num_samples,
                      "input_shape": list(ensemble.network.input_shape),
                      "num_classes": num_classes},
        "settings": settings,
    }
    report = _jsonable(report)
    if output_dir is not None:
        report["files"] = _write(output_dir, report)
    logging.info("[evaluation] %s", line)
    return report


def _diagnostics_statement(ensemble, report: Mapping[str, Any]) -> str:
    method = report.get("method")
    if report.get("diagnostics") is None:
        return (f"no convergence diagnostics in the ensemble's metadata "
                f"(method: {method or 'unknown'}, S = {ensemble.num_samples})")
    return common.describe("posterior", report)


# --------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------
def _write(output_dir: str, report: dict) -> dict:
    out = common.StudyOutput(output_dir, "evaluation")
    paths = {"report_md": out.path("report.md"),
             "report_json": out.path("report.json"),
             "figure": _plot(out, report)}
    report = dict(report, files=paths)
    files.write_text(paths["report_md"], _markdown(report))
    files.write_json(paths["report_json"], report)
    logging.info("[evaluation] report written to %s", output_dir)
    return paths


def _plot(out, report) -> str:
    plt = common.pyplot()
    curves = report["accuracy_vs_eps"]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name in CURVE_ATTACKS:
        ax.plot(curves["eps"], curves[name], marker="o", label=name)
    ax.axhline(report["chance"], color="grey", ls=":", label="chance")
    ax.axhline(report["clean_accuracy"], color="black", ls="--", lw=0.8,
               label="clean")
    ax.axvline(report["settings"]["report"]["eps"], color="red", lw=0.8,
               alpha=0.6, label="eps")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("eps (L-inf)")
    ax.set_ylabel("robust accuracy")
    ax.set_title(f"Accuracy vs eps: {report['verdict']}", fontsize=9)
    ax.legend(fontsize=7)
    return out.save_figure(fig, "accuracy_vs_eps")


def _value_text(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, Mapping):
        return "; ".join(f"{k}: {_value_text(e)}" for k, e in v.items())
    return str(v)


def _markdown(report: Mapping[str, Any]) -> str:
    s = report["settings"]["report"]
    post = report["posterior"]
    lines = [
        "# Robustness report", "",
        f"**{report['verdict_line']}**", "",
        "## Posterior", "",
        f"- method: {post['method']}, S = {post['num_samples']}, "
        f"inputs {tuple(post['input_shape'])}, {post['num_classes']} classes",
        f"- convergence: {report['diagnostics_statement']}",
        "",
        "## Data and threat model", "",
        f"- {s['num_points']} points, clean accuracy "
        f"{report['clean_accuracy']:.3f}, chance {report['chance']:.3f}",
        f"- L-inf, eps = {s['eps']:g}, input box {s['clip']}, gradient "
        f"definition(s): {', '.join(s['gradients'])}, seed {s['seed']}",
        "",
        "## Attacks and their settings", "",
    ]
    rows = [[name, ", ".join(f"{k}={_value_text(v)}" for k, v in sorted(
        cfg.items()))] for name, cfg in report["settings"].items()
        if name != "report"]
    lines.append(common.markdown_table(["attack", "settings"], rows))
    lines += ["## Robust accuracy", "",
              "Fraction of points correct both clean and after the attack. "
              "apgd-ce+apgd-t is the accuracy after APGD-CE and then APGD-T "
              "on APGD-CE's survivors (AutoAttack's order).", ""]
    rows = [[name, acc] for name, acc in report["robust_accuracy"].items()]
    rows.append(["**worst case (per example, over all)**",
                 report["worst_case_accuracy"]])
    lines.append(common.markdown_table(["attack", "robust accuracy"], rows))
    lines += ["Points by the first attack that broke them: "
              + ", ".join(f"{k} {v}" for k, v in report["broken_by"].items()
                          if v), ""]
    curves = report["accuracy_vs_eps"]
    lines += ["## Accuracy vs eps", "",
              "![accuracy vs eps](figures/accuracy_vs_eps.png)", ""]
    lines.append(common.markdown_table(
        ["eps"] + list(CURVE_ATTACKS),
        [[f"{e:g}"] + [curves[a][i] for a in CURVE_ATTACKS]
         for i, e in enumerate(curves["eps"])]))
    lines += ["## Gradient-masking checks", ""]
    rows = []
    for i, name in enumerate(CHECKS, 1):
        if name in report["checks"]:
            c = report["checks"][name]
            rows.append([i, name, "pass" if c["passed"] else "**FAIL**",
                         _value_text(c["value"]), _value_text(c["threshold"]),
                         c["explanation"]])
        else:
            rows.append([i, name, "not run", "", "",
                         report["skipped_checks"].get(name, "")])
    lines.append(common.markdown_table(
        ["#", "check", "result", "value", "threshold", "explanation"], rows))
    lines += ["## Verdict", "", report["verdict_line"], ""]
    return "\n".join(lines)
