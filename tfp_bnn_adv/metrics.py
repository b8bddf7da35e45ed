"""Accuracy, robustness and gradient-size metrics of attacked ensembles.

The core functions are pure numpy over probabilities or predicted classes, so
they are easy to check by hand; :func:`evaluate_attack` and
:func:`gradient_metrics` are thin wrappers that run the ensemble and return
one flat dict of floats with keys shaped like ``test/adv_robustness/pgd/expected``:

=========================================  ====================================
key                                        meaning
=========================================  ====================================
``{prefix}/accuracy``                      clean accuracy
``{prefix}/adv_accuracy/{attack}``         accuracy on the attacked inputs, over
                                           *all* points (the authors' code's
                                           "adversarial robustness")
``{prefix}/adv_robustness/{attack}``       fraction of points whose predicted
                                           class does not change
``{prefix}/softmax_robustness/{attack}``   ``1 - mean_j max_c |p(x_j)_c -
                                           p(x~_j)_c|`` (the paper's
                                           robustness-accuracy axis)
``{prefix}/success_rate/{attack}``         among points correct before the
                                           attack, the fraction wrong after
``{prefix}/grad_norm/{kind}/{stat}``       mean over points of the per-point
                                           ``mean_abs``, ``l1`` or ``l2`` of the
                                           ``expected``/``predictive`` gradient
=========================================  ====================================

``{attack}`` is the attack's name followed by the gradient definition for
gradient attacks (``pgd/expected``, ``fgsm/predictive``) and the bare name
for gradient-free ones (``random``, ``square``).  All probabilities are the
posterior predictive ``(1/S) sum_s softmax(f(x, w_s))``.
"""

from __future__ import annotations

import numpy as np

from tfp_bnn_adv import gradients
from tfp_bnn_adv import validate
from tfp_bnn_adv.attacks import GRADIENTS
from tfp_bnn_adv.ensemble import check_ensemble

__all__ = ["clean_accuracy", "adversarial_accuracy", "adversarial_robustness",
           "softmax_robustness", "attack_success_rate", "gradient_norm_stats",
           "evaluate_attack", "gradient_metrics", "GRADIENT_STATS", "SEMANTICS"]

GRADIENT_STATS = ("mean_abs", "l1", "l2")
# Rows of a probability matrix may be off 1 by float32 round-off.
_SUM_TOLERANCE = 1e-3


def _probabilities(p, name: str) -> np.ndarray:
    p = np.asarray(p)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"{name} must be probabilities of shape [N, C] with "
                         f"N >= 1 and C >= 2, got shape {p.shape}.")
    if not np.issubdtype(p.dtype, np.floating):
        raise TypeError(f"{name} must hold floats, got dtype {p.dtype}.")
    p = p.astype(np.float64)
    if (not np.all(np.isfinite(p)) or p.min() < 0 or
            np.abs(p.sum(axis=1) - 1).max() > _SUM_TOLERANCE):
        raise ValueError(f"{name} must hold non-negative rows that sum to 1.")
    return p


def _classes(p, name: str) -> np.ndarray:
    """Predicted classes from probabilities ``[N, C]`` or labels ``[N]``."""
    arr = np.asarray(p)
    if arr.ndim == 1:
        if arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name} given as classes must be a non-empty "
                            f"integer array [N], got dtype {arr.dtype}, shape "
                            f"{arr.shape}.")
        return arr.astype(np.int64)
    return np.argmax(_probabilities(arr, name), axis=1)


def _labels(y, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"y must be integer labels of shape [N], got dtype "
                        f"{y.dtype}, shape {y.shape}.")
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} labels for {n} predictions.")
    return y.astype(np.int64)


def _accuracy(p, y, name: str) -> float:
    pred = _classes(p, name)
    return float(np.mean(pred == _labels(y, pred.shape[0])))


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str):
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} has {a.shape[0]} points but {name_b} has "
                         f"{b.shape[0]}.")


def clean_accuracy(p_clean, y) -> float:
    """Fraction of points classified correctly.

    Args:
      p_clean: probabilities ``[N, C]`` or predicted classes ``[N]``.
      y: int labels ``[N]``.

    Returns:
      A float in ``[0, 1]``.

    Example:
      >>> clean_accuracy(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0]))
      0.5
    """
    return _accuracy(p_clean, y, "p_clean")


def adversarial_accuracy(p_adv, y) -> float:
    """Accuracy on the attacked inputs, over all points.

    This is what the authors' code reports as "adversarial robustness" (the
    paper's attack table): points misclassified before the attack count as
    failures too.

    Args:
      p_adv: probabilities ``[N, C]`` or predicted classes ``[N]`` on the
        attacked inputs.
      y: int labels ``[N]``.

    Returns:
      A float in ``[0, 1]``.
    """
    return _accuracy(p_adv, y, "p_adv")


def adversarial_robustness(p_clean, p_adv) -> float:
    """Fraction of points whose predicted class the attack does not change.

    Args:
      p_clean: probabilities ``[N, C]`` or classes ``[N]`` on clean inputs.
      p_adv: the same on the attacked inputs.

    Returns:
      A float in ``[0, 1]``; needs no labels.
    """
    clean, adv = _classes(p_clean, "p_clean"), _classes(p_adv, "p_adv")
    _same_length(clean, adv, "p_clean", "p_adv")
    return float(np.mean(clean == adv))


SEMANTICS = ("corrected", "paper")


def _softmax_rows(p: np.ndarray) -> np.ndarray:
    z = np.exp(p - p.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def softmax_robustness(p_clean, p_adv, *, semantics: str = "corrected",
                       bayesian: bool | None = None) -> float:
    """``1 - (1/N) sum_j max_c |p(x_j)_c - p(x~_j)_c|`` (Carbone et al., 2020).

    The y-axis of the paper's robustness-accuracy analysis: 1 when the attack
    leaves every predictive distribution unchanged, 0 when it moves all
    probability mass of every point.

    ``semantics="paper"`` computes it as the authors' code did
    (``../shared/PAPER.md``, "The original code, exactly", item 6): it
    applied ``softmax`` to the network's *output*, which for an NN are
    logits (so this is the same number) but for a BNN already are the
    predictive probabilities, which get a second softmax.  With ``C``
    classes a second softmax moves each row by at most ``(e - 1) / (e + C -
    1)``, so a BNN scores at least ``1 - (e - 1)/(e + 9) ~= 0.853`` for 10
    classes, whatever the attack does.

    Args:
      p_clean: probabilities ``[N, C]`` on clean inputs.
      p_adv: probabilities ``[N, C]`` on the attacked inputs.
      semantics: ``"corrected"`` (one softmax, the default) or ``"paper"``.
      bayesian: with ``semantics="paper"``, whether the probabilities are a
        BNN's posterior predictive (``True``: second softmax) or an NN's
        softmax (``False``); required there, ignored otherwise.

    Returns:
      A float in ``[0, 1]``.

    Example:
      >>> p = np.array([[1.0, 0.0]]); q = np.array([[0.0, 1.0]])
      >>> softmax_robustness(p, q)
      0.0
      >>> round(softmax_robustness(p, q, semantics="paper", bayesian=True), 3)
      0.538
    """
    semantics = validate.choice(semantics, SEMANTICS, "semantics")
    clean = _probabilities(p_clean, "p_clean")
    adv = _probabilities(p_adv, "p_adv")
    if clean.shape != adv.shape:
        raise ValueError(f"p_clean has shape {clean.shape} but p_adv has "
                         f"{adv.shape}.")
    if semantics == "paper":
        if not isinstance(bayesian, (bool, np.bool_)):
            raise TypeError("bayesian must be True (a BNN's predictive "
                            "probabilities) or False (an NN's softmax) with "
                            f"semantics='paper', got {bayesian!r}.")
        if bayesian:
            clean, adv = _softmax_rows(clean), _softmax_rows(adv)
    return float(1.0 - np.mean(np.max(np.abs(clean - adv), axis=1)))


def attack_success_rate(p_clean, p_adv, y) -> float:
    """Among points classified correctly before the attack, the fraction
    misclassified after it.

    Args:
      p_clean: probabilities ``[N, C]`` or classes ``[N]`` on clean inputs.
      p_adv: the same on the attacked inputs.
      y: int labels ``[N]``.

    Returns:
      A float in ``[0, 1]``, or NaN when no point was correct to begin with.
    """
    clean, adv = _classes(p_clean, "p_clean"), _classes(p_adv, "p_adv")
    _same_length(clean, adv, "p_clean", "p_adv")
    y = _labels(y, clean.shape[0])
    correct = clean == y
    if not correct.any():
        return float("nan")
    return float(np.mean(adv[correct] != y[correct]))


def gradient_norm_stats(grad) -> dict:
    """Size of input gradients, per point and averaged over points.

    Args:
      grad: float array ``[N, *input_shape]``, e.g. the expected loss
        gradient of every test point.

    Returns:
      A dict with float arrays ``[N]`` ``"mean_abs_per_point"`` (mean of
      ``|g_i|`` over components), ``"l1_per_point"``, ``"l2_per_point"``, and
      their means over points as floats ``"mean_abs"``, ``"l1"``, ``"l2"``.
      ``"mean_abs"`` is the paper's "mean |<grad L>|" of Figure 1 and Table 1.

    Example:
      >>> gradient_norm_stats(np.array([[3.0, -4.0]]))["l2"]
      5.0
    """
    g = np.asarray(grad)
    if g.ndim < 2 or g.shape[0] == 0 or not np.issubdtype(g.dtype, np.floating):
        raise ValueError(f"grad must be a float array [N, ...] with N >= 1, got "
                         f"dtype {g.dtype}, shape {g.shape}.")
    flat = np.abs(g.reshape(g.shape[0], -1).astype(np.float64))
    per_point = {"mean_abs_per_point": flat.mean(axis=1),
                 "l1_per_point": flat.sum(axis=1),
                 "l2_per_point": np.sqrt(np.sum(flat ** 2, axis=1))}
    out = dict(per_point)
    for stat in GRADIENT_STATS:
        out[stat] = float(per_point[f"{stat}_per_point"].mean())
    return out


def _check_key_part(value, name: str) -> str:
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"{name} must be a non-empty string without '/', got "
                         f"{value!r}.")
    return value


def evaluate_attack(ensemble, x, y, x_adv, *, attack_name: str,
                    gradient: str | None = None, prefix: str = "test",
                    batch_size: int | None = None,
                    chunk_size: int | None = None, jit_compile=None) -> dict:
    """All attack metrics of one attack, as one flat dict.

    Args:
      ensemble: the attacked :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`.
      x: clean inputs ``[N, *input_shape]``.
      y: int labels ``[N]``.
      x_adv: attacked inputs, same shape as ``x``.
      attack_name: e.g. ``"pgd"``, ``"fgsm"``, ``"random"``, ``"square"``.
      gradient: the gradient definition of a gradient attack
        (``"expected"``, ``"predictive"``, ``"sample"``), or ``None``.
      prefix: the split name leading every key.
      batch_size, chunk_size, jit_compile: passed to
        :meth:`PosteriorEnsemble.predict_proba`.

    Returns:
      ``{f"{prefix}/accuracy": ..., f"{prefix}/adv_accuracy/{attack}": ...,
      f"{prefix}/adv_robustness/{attack}": ...,
      f"{prefix}/softmax_robustness/{attack}": ...,
      f"{prefix}/success_rate/{attack}": ...}`` with ``attack`` =
      ``attack_name`` or ``attack_name/gradient``; floats.

    Raises:
      TypeError/ValueError: for a bad ensemble, name, gradient or prefix, or
        when ``x_adv`` and ``x`` differ in shape.

    Example:
      >>> x_adv = attacks.pgd(ens, x, y, eps=0.25, gradient="expected")
      >>> evaluate_attack(ens, x, y, x_adv, attack_name="pgd",
      ...                 gradient="expected")["test/adv_robustness/pgd/expected"]
    """
    check_ensemble(ensemble)
    attack = _check_key_part(attack_name, "attack_name")
    if gradient is not None:
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be None or one of "
                             f"{GRADIENTS}, got {gradient!r}.")
        attack = f"{attack}/{gradient}"
    prefix = _check_key_part(prefix, "prefix")
    if np.shape(x_adv) != np.shape(x):
        raise ValueError(f"x_adv has shape {np.shape(x_adv)} but x has "
                         f"{np.shape(x)}.")
    if y is None:
        raise TypeError("y is required: the true labels of x.")
    y = ensemble.network.check_inputs(x, y)[1].numpy()
    kwargs = dict(batch_size=batch_size, chunk_size=chunk_size,
                  jit_compile=jit_compile)
    p_clean = ensemble.predict_proba(x, **kwargs)
    p_adv = ensemble.predict_proba(x_adv, **kwargs)
    return {
        f"{prefix}/accuracy": clean_accuracy(p_clean, y),
        f"{prefix}/adv_accuracy/{attack}": adversarial_accuracy(p_adv, y),
        f"{prefix}/adv_robustness/{attack}": adversarial_robustness(p_clean, p_adv),
        f"{prefix}/softmax_robustness/{attack}": softmax_robustness(p_clean, p_adv),
        f"{prefix}/success_rate/{attack}": attack_success_rate(p_clean, p_adv, y),
    }


def gradient_metrics(ensemble, x, y=None, *, prefix: str = "test",
                     batch_size: int | None = None,
                     chunk_size: int | None = None, jit_compile=None) -> dict:
    """Sizes of both gradient definitions, as one flat dict.

    Args:
      ensemble: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`.
      x: inputs ``[N, *input_shape]``.
      y: int labels ``[N]``; ``None`` uses the ensemble's own predictions.
      prefix: the split name leading every key.
      batch_size, chunk_size, jit_compile: passed to
        :mod:`tfp_bnn_adv.gradients`.

    Returns:
      ``{f"{prefix}/grad_norm/{kind}/{stat}": float}`` for ``kind`` in
      ``expected``, ``predictive`` and ``stat`` in :data:`GRADIENT_STATS`
      (means over points, see :func:`gradient_norm_stats`).

    Example:
      >>> gradient_metrics(ens, x_test, y_test)["test/grad_norm/expected/mean_abs"]
    """
    check_ensemble(ensemble)
    prefix = _check_key_part(prefix, "prefix")
    kwargs = dict(batch_size=batch_size, chunk_size=chunk_size,
                  jit_compile=jit_compile)
    out = {}
    for kind, fn in (("expected", gradients.expected_loss_gradient),
                     ("predictive", gradients.predictive_loss_gradient)):
        stats = gradient_norm_stats(fn(ensemble, x, y, **kwargs))
        for stat in GRADIENT_STATS:
            out[f"{prefix}/grad_norm/{kind}/{stat}"] = stats[stat]
    return out
