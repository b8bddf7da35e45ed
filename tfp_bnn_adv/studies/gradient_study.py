"""Experiment 1 of Carbone et al. (2020): the vanishing expected gradient.

Theorem 1 says the expected loss gradient ``<grad_x L(x, w)>`` of a BNN
vanishes on the data manifold in the limit of infinite data and
over-parametrisation.  The study measures its size on test points

* as the number of posterior samples in the average grows (1, 10, 100, ...),
* as the network width grows, and
* as the number of training points grows,

on half-moons with HMC and on an image dataset with HMC and VI, with the
deterministic network (SGD) and the gradient of the posterior predictive's
loss (Feng et al., 2024) as comparison curves.  Our measure of its size: the
mean absolute gradient component over test points, ``mean |<grad L>|``, of
the per-sample cross-entropy of the logits (one softmax).

The numbers Carbone et al. publish for MNIST (HMC 0.574 -> 0.045 -> 0.011,
VI 4.730 -> 0.961 -> 0.147 for 1 -> 10 -> 100 samples) are another measure
(``../shared/PAPER.md``, item 7): the titles of Figure 1's heat-maps, the
L-inf norm of ONE image's expected gradient of the double-softmax loss
``CE(y, logits = softmax f(x, w_s))`` over the *first* ``k`` samples, on
images hand-picked as those whose norm falls at every step.  For every
image posterior the study also computes that measure on the first
``figure1_images`` test images
(:func:`~tfp_bnn_adv.paper.figure1_gradient_norms`,
:func:`~tfp_bnn_adv.paper.select_figure1_images`) and compares the published
numbers with it only.

Every HMC posterior's function-space diagnostics (on the held-out test
points) are saved as soon as it is fitted; the study stops there, before
measuring it, if it did not converge, unless ``allow_unconverged`` is set,
and then its rows, curves and panels are marked ``(UNCONVERGED)``.

The study's :func:`fingerprint` is stored in ``results.json``; a rerun in the
same directory with another configuration is refused, naming what differs,
unless ``overwrite`` deletes the earlier results.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging
import numpy as np

from tfp_bnn_adv import data as data_lib
from tfp_bnn_adv import gradients
from tfp_bnn_adv import paper
from tfp_bnn_adv import validate
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies.training import InferenceSettings
from tfp_bnn_adv.studies.training import fit_posterior

__all__ = ["GradientStudyConfig", "run_gradient_study", "fingerprint",
           "gradient_sizes", "sample_subsets"]

# Everything the study writes besides results.json, figures/, tensorboard/.
_OWNED = ("gradients.csv", "gradients.md", "ckpt")

# Published on MNIST for the first 1, 10, 100 samples (PAPER.md, item 7):
# the L-inf norm of one hand-picked image's expected gradient of the
# double-softmax loss (Figure 1's titles), not a mean over test points.
PAPER_MNIST = {"hmc": {1: 0.574, 10: 0.045, 100: 0.011},
               "vi": {1: 4.730, 10: 0.961, 100: 0.147}}
# The sample counts of Figure 1's measure.
FIGURE1_SAMPLE_COUNTS = tuple(PAPER_MNIST["hmc"])
OURS_LABEL = ("ours: mean |<grad L>| over {n} points (expected gradient, "
              "one softmax)")
AUTHORS_LABEL = ("authors' measure: L-inf of one selected image "
                 "(double-softmax loss, first k samples)")
PUBLISHED_LABEL = "published (Carbone et al. Fig. 1)"


def _md(text: str) -> str:
    """``text`` for a Markdown table cell: ``|`` and ``<...>`` escaped."""
    return text.replace("|", "\\|").replace("<", "\\<").replace(">", "\\>")


@dataclasses.dataclass(frozen=True)
class GradientStudyConfig:
    """What the gradient study runs.

    Attributes:
      moons_widths: hidden widths of the half-moons MLPs (one hidden layer
        per entry of ``moons_depth``).
      moons_train_sizes: training-set sizes of the half-moons runs (both
        grids empty: no half-moons part, e.g. an image-only study).
      moons_depth: hidden layers of the half-moons MLPs.
      moons_noise: half-moons noise (paper: 0.1).
      moons_hmc: HMC settings for half-moons.
      moons_sgd: training of the deterministic half-moons networks.
      image_dataset: ``"fashion_mnist"``, ``"mnist"`` or ``None`` to skip.
      image_methods: inference methods on images (``"hmc"``, ``"vi"``).
      image_hidden: hidden widths of the image MLP.
      image_num_train: training subset size (``None``: all).
      image_hmc, image_vi: settings of those runs.
      keras_model: optional path of a ``.keras`` model to use on images
        instead of the MLP.
      sample_counts: posterior sample counts for the average.
      num_test: test points the gradient is measured on (``None``: all).
      figure1_images: how many of the first test images each image
        posterior's Figure 1 measure (the authors',
        :func:`~tfp_bnn_adv.paper.figure1_gradient_norms`) is computed on,
        for the first 1, 10 and 100 samples; counts above the posterior's
        ``S`` samples are left out, and with fewer than two counts left
        (``S < 10``, e.g. a deterministic net) no image can be selected.
      include_deterministic: add an SGD network of each architecture.
      sgd: its training settings on images.
      data_dir, data_source: where image data comes from.
      seed: the study's seed: data, fits
        (:func:`~tfp_bnn_adv.studies.common.study_seeds`).
      max_rhat: an HMC posterior is converged when its median function-space
        R-hat is at most this (``>= 1``).
      allow_unconverged: go on past an unconverged HMC posterior (marking it
        ``(UNCONVERGED)``) instead of stopping with an error.
    """
    moons_widths: tuple = (32, 128, 256, 512)
    moons_train_sizes: tuple = (5000, 10000, 15000)
    moons_depth: int = 1
    moons_noise: float = 0.1
    moons_hmc: InferenceSettings = InferenceSettings(
        method="hmc", num_chains=4, num_burnin_steps=500, num_results=250)
    moons_sgd: InferenceSettings = InferenceSettings(
        method="sgd", epochs=100, batch_size=32, learning_rate=1e-2)
    image_dataset: str | None = "mnist"
    image_methods: tuple = ("hmc", "vi")
    image_hidden: tuple = (512,)
    image_num_train: int | None = None
    image_hmc: InferenceSettings = InferenceSettings(
        method="hmc", num_chains=4, num_burnin_steps=1000, num_results=250)
    image_vi: InferenceSettings = InferenceSettings(
        method="vi", epochs=10, learning_rate=1e-3, vi_samples=500)
    keras_model: str | None = None
    sample_counts: tuple = (1, 10, 100, 500)
    num_test: int | None = 1000
    figure1_images: int = 100
    include_deterministic: bool = True
    sgd: InferenceSettings = InferenceSettings(method="sgd", epochs=10,
                                               learning_rate=1e-3)
    data_dir: str | None = None
    data_source: str = "auto"
    seed: int = 0
    max_rhat: float = 1.1
    allow_unconverged: bool = False

    @classmethod
    def paper(cls, **overrides) -> "GradientStudyConfig":
        """The paper's scale (hours on a CPU; GPUs/TPUs advised)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def quick(cls, **overrides) -> "GradientStudyConfig":
        """Minutes on a laptop: small nets, few samples, Fashion-MNIST."""
        base = cls(
            # Widths and budget at which the default kernel converges on
            # half-moons (tests/test_hmc.py checks 2-16-2 and 2-64-2).
            moons_widths=(16, 64), moons_train_sizes=(250, 1000),
            moons_hmc=InferenceSettings(
                method="hmc", num_chains=4, num_burnin_steps=300,
                num_results=100),
            image_dataset="fashion_mnist", image_hidden=(64,),
            image_num_train=5000,
            image_hmc=InferenceSettings(
                method="hmc", num_chains=4, num_burnin_steps=700,
                num_results=300),
            image_vi=InferenceSettings(method="vi", epochs=5,
                                       learning_rate=1e-2, vi_samples=100),
            sample_counts=(1, 5, 20, 100), num_test=200, figure1_images=50,
            sgd=InferenceSettings(method="sgd", epochs=5, learning_rate=1e-3))
        return dataclasses.replace(base, **overrides)

    def validate(self) -> None:
        common.check_max_rhat(self.max_rhat, "max_rhat")
        for name in ("sample_counts", "image_hidden"):
            common.check_field(validate.int_sequence, getattr(self, name), name)
        for name in ("moons_widths", "moons_train_sizes"):
            validate.int_sequence(getattr(self, name), name, allow_empty=True)
        if bool(self.moons_widths) != bool(self.moons_train_sizes):
            raise ValueError(
                "moons_widths and moons_train_sizes must both be empty (no "
                "half-moons part) or both hold values, got "
                f"moons_widths={self.moons_widths!r}, "
                f"moons_train_sizes={self.moons_train_sizes!r}.")
        if not self.moons_widths and not self.image_dataset:
            raise ValueError("The study has nothing to run: no half-moons "
                             "grid (moons_widths, moons_train_sizes) and "
                             "image_dataset=None.")
        validate.choice(self.image_dataset, (None, "mnist", "fashion_mnist"),
                        "image_dataset")
        bad = [m for m in self.image_methods if m not in ("hmc", "vi")]
        if bad:
            raise ValueError(f"image_methods may hold 'hmc' and 'vi', got {bad}.")
        common.check_field(validate.optional_positive_int, self.num_test,
                           "num_test")
        common.check_field(validate.positive_int, self.figure1_images,
                           "figure1_images")
        if self.keras_model is not None and not os.path.exists(self.keras_model):
            raise ValueError(f"keras_model file {self.keras_model!r} not found.")


def fingerprint(config: GradientStudyConfig,
                image_ensembles: dict | None = None) -> dict[str, Any]:
    """The study's :func:`~tfp_bnn_adv.studies.common.fingerprint`.

    Fields: the half-moons grid (``moons_widths``, ``moons_train_sizes``,
    ``moons_depth``, ``moons_noise``) and its HMC settings (SGD's with
    ``include_deterministic``), ``sample_counts``, ``num_test``, ``seed``,
    ``max_rhat`` (the UNCONVERGED marks depend on it) and, when the image
    part runs, its data set (name, directory, source), ``image_num_train``,
    ``figure1_images`` and either ``image_ensembles`` as
    ``method -> ensemble_sha256`` or what fits them: ``image_methods``,
    ``image_hidden``, the SHA-256 of ``keras_model`` and the settings of each
    method fitted.  Every
    settings' ``seed`` is left out (the study's ``seed`` replaces it), as is
    ``allow_unconverged``.

    Raises:
      FileNotFoundError: for a ``keras_model`` that does not exist.
    """
    drop = ("seed",)
    fields: dict[str, Any] = dict(
        moons_widths=list(config.moons_widths),
        moons_train_sizes=list(config.moons_train_sizes),
        moons_depth=config.moons_depth, moons_noise=config.moons_noise,
        moons_hmc=common.settings_fields(config.moons_hmc, drop),
        sample_counts=sorted(set(config.sample_counts)),
        num_test=config.num_test,
        include_deterministic=config.include_deterministic,
        seed=config.seed, max_rhat=config.max_rhat)
    if config.include_deterministic:
        fields["moons_sgd"] = common.settings_fields(config.moons_sgd, drop)
    inputs = {}
    methods = tuple(image_ensembles or ()) or (
        config.image_methods if config.image_dataset else ())
    if not methods:
        fields["image_dataset"] = None
        return common.fingerprint("gradient_study", fields)
    fields["image_data"] = common.data_fields(
        config.image_dataset, config.data_dir, config.data_source)
    fields["image_num_train"] = config.image_num_train
    fields["figure1_images"] = config.figure1_images
    if image_ensembles:
        fields["image_ensembles"] = {m: common.ensemble_sha256(e)
                                     for m, e in image_ensembles.items()}
    else:
        fields.update(image_methods=list(methods),
                      image_hidden=list(config.image_hidden))
        if config.keras_model:
            fields["keras_model"] = common.file_sha256(config.keras_model)
            inputs["keras_model"] = os.path.abspath(config.keras_model)
        if "hmc" in methods:
            fields["image_hmc"] = common.settings_fields(config.image_hmc, drop)
        if "vi" in methods:
            fields["image_vi"] = common.settings_fields(config.image_vi, drop)
        if config.include_deterministic:
            fields["sgd"] = common.settings_fields(config.sgd, drop)
    return common.fingerprint("gradient_study", fields, inputs)


def sample_subsets(num_samples: int, k: int, max_subsets: int) -> np.ndarray:
    """Disjoint ``k``-sample subsets spread over the whole stack.

    Subset ``j`` holds samples ``j, j + m, j + 2m, ...`` with ``m = S // k``,
    so each subset spans all chains and the whole run (the least correlated
    ``k``-sample average), and the subsets are disjoint.

    Returns:
      int array ``[min(m, max_subsets), k]``.
    """
    m = num_samples // k
    if m < 1:
        raise ValueError(f"cannot draw {k} of {num_samples} samples.")
    idx = np.arange(m * k).reshape(k, m).T  # row j: j, j + m, ...
    keep = np.round(np.linspace(0, m - 1, min(m, max_subsets))).astype(int)
    return idx[np.unique(keep)]


def gradient_sizes(ens, x, y, counts, *, max_subsets: int = 200,
                   batch_size: int = 50) -> dict[int, dict[str, Any]]:
    """Size of the k-sample gradient estimates, averaged over disjoint subsets.

    For every ``k`` in ``counts`` (``k <= S``), the ``k``-sample expected
    gradient ``(1/k) sum_{s in J} grad_x CE(f(x, w_s), y)`` and predictive
    gradient (the ``p_s(y)``-weighted mean of the same per-sample gradients)
    are formed for up to ``max_subsets`` disjoint subsets ``J``; their mean
    absolute component and L2 norm are averaged over subsets and test points.
    Averaging over subsets estimates the *expected* size of a ``k``-sample
    estimate instead of the size of one arbitrary draw.

    Returns:
      ``{k: {"expected": (mean_abs, l2), "predictive": (mean_abs, l2),
      "components": [B, d] expected gradient of the first subset}}``.
    """
    counts = sorted(k for k in set(int(c) for c in counts) if k <= ens.num_samples)
    subsets = {k: sample_subsets(ens.num_samples, k, max_subsets) for k in counts}
    sums = {k: {"expected": np.zeros(2), "predictive": np.zeros(2)} for k in counts}
    comps = {k: [] for k in counts}
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        g = gradients.per_sample_loss_gradients(ens, xb, yb)
        g = g.reshape(g.shape[0], g.shape[1], -1)  # [S, b, d]
        logits = ens.logits(xb).astype(np.float64)
        log_p = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        log_py = log_p[:, np.arange(len(yb)), yb]  # [S, b]
        for k in counts:
            for j, subset in enumerate(subsets[k]):
                gs = g[subset]
                w = np.exp(log_py[subset] - log_py[subset].max(axis=0))
                w /= w.sum(axis=0)
                for kind, est in (("expected", gs.mean(axis=0)),
                                  ("predictive", np.einsum("sb,sbd->bd", w, gs))):
                    sums[k][kind] += [np.abs(est).mean(axis=1).sum(),
                                      np.linalg.norm(est, axis=1).sum()]
                if j == 0:
                    comps[k].append(gs.mean(axis=0))
    out = {}
    for k in counts:
        n = len(subsets[k]) * len(x)
        out[k] = {kind: tuple(sums[k][kind] / n) for kind in sums[k]}
        out[k]["components"] = np.concatenate(comps[k])
    return out


def _measure(ens, x, y, counts, key_prefix: str, rows: list, setting: dict,
             report: dict):
    """Both gradient definitions for every sample count; returns results."""
    results = {}
    components = {}
    for k, sizes in gradient_sizes(ens, x, y, counts).items():
        for kind in ("expected", "predictive"):
            mean_abs, l2 = (float(v) for v in sizes[kind])
            results[f"{key_prefix}/samples={k}/grad_mean_abs/{kind}"] = mean_abs
            results[f"{key_prefix}/samples={k}/grad_l2/{kind}"] = l2
            rows.append([setting["dataset"],
                         common.mark(setting["method"], report),
                         setting["width"], setting["n_train"], k, kind,
                         mean_abs, l2] + common.convergence_columns(report))
        components[k] = sizes["components"]
    return results, components


def _figure1(ens, x, y, prefix: str) -> dict[str, Any]:
    """Figure 1's measure of one posterior, as the authors computed it.

    The L-inf norm of each image's expected gradient of the double-softmax
    loss over the first ``k`` samples
    (:func:`~tfp_bnn_adv.paper.figure1_gradient_norms`) for the ``k`` of
    :data:`FIGURE1_SAMPLE_COUNTS` that the ensemble has, and the images whose
    norm falls at every step
    (:func:`~tfp_bnn_adv.paper.select_figure1_images`).

    Args:
      ens: the posterior (``S`` samples).
      x: images ``[M, *input_shape]``.
      y: int labels ``[M]``.
      prefix: the posterior's key prefix.

    Returns:
      ``<prefix>/paper_measure/...`` results: ``num_images`` (``M``),
      ``sample_counts`` (the ``k <= S``), ``fraction_selected``,
      ``first_selected_index`` (the first selected image's index among the
      ``M``) and, per ``k``, ``linf_one_image/samples=<k>/median_all``,
      ``.../first_selected`` and ``.../median_selected``.  Without a
      selected image the selected values are ``None`` and ``no_selection``
      says why; with fewer than two counts (``S < 10``) no image can be
      selected and ``fraction_selected`` is ``None`` too.
    """
    counts = tuple(k for k in FIGURE1_SAMPLE_COUNTS if k <= ens.num_samples)
    key = f"{prefix}/paper_measure"
    if counts != FIGURE1_SAMPLE_COUNTS:
        logging.warning("%s has %d samples: Figure 1's measure for k = %s "
                        "only.", prefix, ens.num_samples,
                        ", ".join(map(str, counts)))
    norms = paper.figure1_gradient_norms(ens, x, y, sample_counts=counts)
    res: dict[str, Any] = {f"{key}/num_images": len(x),
                           f"{key}/sample_counts": list(counts)}
    if len(counts) > 1:
        selected = paper.select_figure1_images(norms)
        res[f"{key}/fraction_selected"] = len(selected) / len(x)
        if not len(selected):
            res[f"{key}/no_selection"] = (
                f"no image of {len(x)} has a norm that falls at every step")
    else:
        selected = np.zeros(0, dtype=int)
        res[f"{key}/fraction_selected"] = None
        res[f"{key}/no_selection"] = (
            f"{ens.num_samples} sample(s): only k = {counts[0]} fits, and "
            "the selection needs two steps")
    res[f"{key}/first_selected_index"] = (int(selected[0]) if len(selected)
                                          else None)
    for j, k in enumerate(counts):
        base = f"{key}/linf_one_image/samples={k}"
        res[f"{base}/median_all"] = float(np.median(norms[:, j]))
        res[f"{base}/first_selected"] = (
            float(norms[selected[0], j]) if len(selected) else None)
        res[f"{base}/median_selected"] = (
            float(np.median(norms[selected, j])) if len(selected) else None)
    return res


def _figure1_section(results: dict, posteriors: dict, dataset: str | None,
                     counts, n_points: int) -> str:
    """The Markdown that puts the authors' measure beside ours."""
    intro = ("## Figure 1: the authors' measure beside ours\n\n"
             "The published numbers (MNIST, first 1 / 10 / 100 samples: HMC "
             + " / ".join(f"{v:.3f}" for v in PAPER_MNIST["hmc"].values())
             + ", VI "
             + " / ".join(f"{v:.3f}" for v in PAPER_MNIST["vi"].values())
             + ") are the titles of Figure 1's heat-maps: the L-inf norm "
             "max |g| of ONE image's expected gradient of the double-softmax "
             "loss CE(y, logits = softmax f(x, w_s)) over the first k "
             "samples, on images hand-picked as those whose norm falls at "
             "every step (PAPER.md, item 7).  They compare with the authors' "
             "measure only, not with ours.\n\n")
    if not posteriors:
        return intro + ("Not computed: this run has no image data set (the "
                        "authors' measure is of images).\n")
    first_prefix = next(iter(posteriors.values()))
    n_images = results[f"{first_prefix}/paper_measure/num_images"]
    header = ["dataset", "method", "samples k",
              _md(OURS_LABEL.format(n=n_points)), AUTHORS_LABEL,
              PUBLISHED_LABEL,
              "authors' measure: median over selected images",
              f"authors' measure: median over all {n_images} images",
              "images selected"]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else v  # noqa: E731
    rows = []
    for label, prefix in posteriors.items():
        method = prefix.split("/")[1]
        key = f"{prefix}/paper_measure"
        fraction = results[f"{key}/fraction_selected"]
        chosen = ("n/a" if fraction is None
                  else f"{round(fraction * n_images)} of {n_images}")
        ks = sorted(set(counts) | set(FIGURE1_SAMPLE_COUNTS))
        for k in ks:
            ours = results.get(f"{prefix}/samples={k}/grad_mean_abs/expected")
            base = f"{key}/linf_one_image/samples={k}"
            if ours is None and base + "/median_all" not in results:
                continue
            if base + "/median_all" not in results:
                first = median_sel = median_all = "not measured"
            else:
                none = "n/a" if fraction is None else "none selected"
                first = results[f"{base}/first_selected"]
                median_sel = results[f"{base}/median_selected"]
                first = none if first is None else first
                median_sel = none if median_sel is None else median_sel
                median_all = results[f"{base}/median_all"]
            published = (f"{PAPER_MNIST[method][k]:.3f}"
                         if dataset == "mnist" and k in PAPER_MNIST.get(
                             method, {}) else "")
            rows.append([dataset, label, k,
                         "not measured" if ours is None else ours, first,
                         published, median_sel, median_all, chosen])
    note = (f"Ours: the expected gradient of Theorem 1 (per-sample "
            "cross-entropy of the logits), its mean |component| over "
            f"{n_points} test points, averaged over disjoint k-sample "
            "subsets.  The authors' measure: on the first "
            f"{n_images} test images, the first selected image's norm (one "
            "image, as in the paper's figure), the median over the selected "
            "images and the median over all of them; k runs over 1, 10, 100 "
            "up to the posterior's sample count.  not measured: k is not "
            "among this measure's sample counts (or exceeds the posterior's); "
            "n/a: fewer than two of 1, 10, 100 fit the posterior, so no image "
            "can be selected; none selected: no image's norm falls at every "
            "step.")
    if dataset != "mnist":
        note += (f"  The published numbers are MNIST's; this run's data set "
                 f"is {dataset}, so its column is left empty.")
    for label, prefix in posteriors.items():
        reason = results.get(f"{prefix}/paper_measure/no_selection")
        if reason:
            note += f"\n\n{label}: no image selected ({reason})."
        else:
            index = results[f"{prefix}/paper_measure/first_selected_index"]
            note += (f"\n\n{label}: the first selected image is test image "
                     f"{index}.")
    rows = [[fmt(v) for v in row] for row in rows]
    return intro + common.markdown_table(header, rows) + "\n" + note + "\n"


def _plot_components_moons(out, comps: dict, widths, n_train, counts,
                           unconverged: set):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(widths), figsize=(3.2 * len(widths), 3.2),
                             squeeze=False)
    k_lo, k_hi = min(counts), max(counts)
    for ax, w in zip(axes[0], widths):
        c = comps.get((w, n_train))
        if c is None:
            continue
        lo = c.get(k_lo)
        hi = c.get(max(k for k in c))
        ax.scatter(lo[:, 0], lo[:, 1], s=6, alpha=0.5, label=f"{k_lo} sample")
        ax.scatter(hi[:, 0], hi[:, 1], s=6, alpha=0.7,
                   label=f"{max(k for k in c)} samples")
        ax.set_title(common.mark(f"width {w}, n={n_train}",
                                 (w, n_train) in unconverged))
        ax.set_xlabel("d L / d x1")
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
    axes[0][0].set_ylabel("d L / d x2")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Half-moons: expected-gradient components on test points "
                 f"(HMC; {k_lo} vs. most samples, up to {k_hi})")
    return out.save_figure(fig, "components_half_moons")


def _plot_components_images(out, comps: dict, dataset: str):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, c in comps.items():
        k = max(c)
        ax.hist(c[k].ravel(), bins=120, histtype="step", log=True,
                label=f"{label}, {k} sample{'s' if k > 1 else ''}")
    ax.set_xlabel("expected-gradient component")
    ax.set_ylabel("count (log)")
    ax.set_title(f"{dataset}: components of <grad L> on test points")
    ax.legend(fontsize=7)
    return out.save_figure(fig, f"components_{dataset}")


def _plot_vs_samples(out, curves: dict):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (ks, exp, pred) in curves.items():
        line, = ax.plot(ks, exp, marker="o",
                        label=f"{label}, Theorem 1's expected gradient")
        if len(ks) > 1:
            ax.plot(ks, pred, ls="--", color=line.get_color(),
                    label=f"{label}, posterior predictive (Feng et al.)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("posterior samples in the average")
    ax.set_ylabel("ours: mean |<grad L>| over test points (one softmax)")
    ax.set_title("Gradient size vs. number of posterior samples")
    ax.legend(fontsize=7)
    return out.save_figure(fig, "grad_vs_samples")


def _plot_vs_axis(out, values: dict, xlabel: str, stem: str, title: str):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, (xs, ys) in values.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ours: mean |<grad L>| over test points\n(expected "
                  "gradient, one softmax, most samples)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return out.save_figure(fig, stem)


def _plot_figure1(out, results: dict, posteriors: dict, dataset: str, counts,
                  n_points: int):
    """Per image posterior: our measure and the authors', against ``k``."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(posteriors),
                             figsize=(4.6 * len(posteriors), 3.8),
                             squeeze=False)
    value = lambda v: np.nan if v is None else v  # noqa: E731
    for ax, (label, prefix) in zip(axes[0], posteriors.items()):
        key = f"{prefix}/paper_measure"
        ours = [k for k in counts
                if f"{prefix}/samples={k}/grad_mean_abs/expected" in results]
        ax.plot(ours, [results[f"{prefix}/samples={k}/grad_mean_abs/expected"]
                       for k in ours], marker="o",
                label=OURS_LABEL.format(n=n_points))
        ks = results[f"{key}/sample_counts"]
        base = f"{key}/linf_one_image/samples="
        ax.plot(ks, [value(results[f"{base}{k}/first_selected"]) for k in ks],
                marker="s", label=AUTHORS_LABEL)
        ax.plot(ks, [value(results[f"{base}{k}/median_selected"]) for k in ks],
                marker="s", ls="--", label="authors' measure, median over "
                "selected images")
        method = prefix.split("/")[1]
        if dataset == "mnist" and method in PAPER_MNIST:
            published = PAPER_MNIST[method]
            ax.plot(list(published), list(published.values()), "kx", ms=8,
                    label=PUBLISHED_LABEL)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("posterior samples k")
        ax.set_title(label)
    axes[0][0].set_ylabel("gradient size")
    # One legend for all panels, below them: the labels are long.
    legend = {}
    for ax in axes[0]:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(text, handle)
    fig.legend(list(legend.values()), list(legend), loc="upper center",
               bbox_to_anchor=(0.5, 0.0), fontsize=8, ncol=1)
    fig.suptitle(f"{dataset}: our measure and the authors' (Figure 1)")
    return out.save_figure(fig, f"figure1_{dataset}")


def _moons_figures(out, config, counts, results, reports, moons_comps,
                   curves) -> list:
    """The half-moons figures: components, gradient vs width and vs size.

    Also adds each width's curve (at the largest training set) to
    ``curves``, for the samples figure.
    """
    n_big = max(config.moons_train_sizes)
    for width in config.moons_widths:
        prefix = f"half_moons/hmc/width={width}/n_train={n_big}"
        ks = [k for k in counts
              if f"{prefix}/samples={k}/grad_mean_abs/expected" in results]
        curves[common.mark(f"moons HMC w={width}",
                           reports.get(prefix, {}))] = (
            ks, [results[f"{prefix}/samples={k}/grad_mean_abs/expected"] for k in ks],
            [results[f"{prefix}/samples={k}/grad_mean_abs/predictive"] for k in ks])

    def at_most(prefix):
        ks = [k for k in counts
              if f"{prefix}/samples={k}/grad_mean_abs/expected" in results]
        return results[f"{prefix}/samples={max(ks)}/grad_mean_abs/expected"]

    def any_unconverged(method, pairs):
        return any(common.is_unconverged(reports.get(
            f"half_moons/{method}/width={w}/n_train={n}", {}))
            for w, n in pairs)

    by_width = {}
    by_size = {}
    for method in ["hmc"] + (["sgd"] if config.include_deterministic else []):
        for n_train in config.moons_train_sizes:
            label = common.mark(f"{method} n={n_train}", any_unconverged(
                method, [(w, n_train) for w in config.moons_widths]))
            by_width[label] = (
                list(config.moons_widths),
                [at_most(f"half_moons/{method}/width={w}/n_train={n_train}")
                 for w in config.moons_widths])
        for width in config.moons_widths:
            label = common.mark(f"{method} w={width}", any_unconverged(
                method, [(width, n) for n in config.moons_train_sizes]))
            by_size[label] = (
                list(config.moons_train_sizes),
                [at_most(f"half_moons/{method}/width={width}/n_train={n}")
                 for n in config.moons_train_sizes])

    return [
        _plot_components_moons(
            out, moons_comps, config.moons_widths, n_big, counts,
            {(w, n) for w in config.moons_widths
             for n in config.moons_train_sizes
             if common.is_unconverged(reports.get(
                 f"half_moons/hmc/width={w}/n_train={n}", {}))}),
        _plot_vs_axis(out, by_width, "hidden units", "grad_vs_width",
                      "Half-moons: gradient size vs. width"),
        _plot_vs_axis(out, by_size, "training points", "grad_vs_train_size",
                      "Half-moons: gradient size vs. training-set size"),
    ]


def run_gradient_study(config: GradientStudyConfig, output_dir: str,
                       image_ensembles: dict | None = None, *,
                       overwrite: bool = False) -> dict[str, Any]:
    """Runs the vanishing-gradient study; writes results, table and figures.

    Args:
      config: a :class:`GradientStudyConfig` (``.quick()`` or ``.paper()``).
      output_dir: receives ``results.json``, ``gradients.csv`` / ``.md``
        (``.md`` with a section that puts the authors' Figure 1 measure
        beside ours), ``figures/*.png`` and TensorBoard scalars.
      image_ensembles: optional ``method -> PosteriorEnsemble`` already fitted
        on ``config.image_dataset`` (e.g. by the quickstart); measured instead
        of fitting ``config.image_methods`` and the SGD comparison.
      overwrite: delete earlier results in ``output_dir`` (of any
        configuration) and start afresh.

    Returns:
      The results dict: keys like
      ``half_moons/hmc/width=64/n_train=1000/samples=10/grad_mean_abs/expected``,
      for each image posterior the authors' Figure 1 measure (see
      :func:`_figure1`):
      ``<prefix>/paper_measure/linf_one_image/samples=10/first_selected``
      (e.g. ``<prefix>`` = ``mnist/hmc/width=512/n_train=60000``),
      ``.../median_selected``, ``.../median_all``,
      ``<prefix>/paper_measure/fraction_selected`` and
      ``<prefix>/paper_measure/first_selected_index``;
      each posterior's ``<prefix>/diagnostics`` and
      ``<prefix>/convergence/...`` (``<prefix>`` as
      ``half_moons/hmc/width=64/n_train=1000``; see
      :func:`~tfp_bnn_adv.studies.common.convergence_results`),
      ``unconverged`` (those prefixes of unconverged HMC posteriors) and
      ``figures`` (paths).

    Raises:
      ValueError: for a bad configuration.
      ConfigMismatchError: when ``output_dir`` holds results of another
        configuration (see :func:`fingerprint`), unless ``overwrite``;
        before anything is fitted or written.
      UnconvergedPosteriorError: for an unconverged HMC posterior without
        ``config.allow_unconverged``, right after its diagnostics are saved.
    """
    config.validate()
    out = common.StudyOutput(output_dir, "gradient_study",
                             fingerprint=fingerprint(config, image_ensembles),
                             overwrite=overwrite, owned=_OWNED)
    rows: list = []
    results: dict[str, Any] = {}
    curves: dict[str, tuple] = {}
    moons_comps: dict = {}
    counts = tuple(sorted(config.sample_counts))
    k_max = max(counts)
    n_moons = len(config.moons_widths) * len(config.moons_train_sizes)
    image_methods = config.image_methods if config.image_dataset else ()
    if image_ensembles:
        image_methods = tuple(image_ensembles)
    total = n_moons * (1 + config.include_deterministic) + len(image_methods) + (
        bool(image_methods) and config.include_deterministic
        and not image_ensembles)
    progress = common.Progress("gradient_study", total)
    reports: dict[str, dict] = {}

    def record(prefix, ens):
        report = common.record_posterior(out, prefix, ens, config.max_rhat)
        reports[prefix] = report
        results.update(common.convergence_results(prefix, report))
        common.require_converged(
            {prefix: report}, allow_unconverged=config.allow_unconverged,
            what="the gradient study", saved_to=out.path("results.json"))
        return report

    hmc_samples = config.moons_hmc.num_chains * config.moons_hmc.num_results
    if hmc_samples < k_max:
        logging.warning("HMC keeps %d samples; sample counts above that are "
                        "skipped.", hmc_samples)

    # Half-moons: HMC over widths and training-set sizes.
    seeds = common.study_seeds(config.seed)
    n_test = config.num_test
    for n_train in config.moons_train_sizes:
        n_total = int(np.ceil(n_train / 0.8))
        moons = data_lib.load_dataset("half_moons", n=n_total,
                                      noise=config.moons_noise,
                                      seed=seeds.data)
        x_test, y_test = moons.test_x[:n_test], moons.test_y[:n_test]
        for width in config.moons_widths:
            model = common.load_model(
                moons.input_shape, moons.num_classes,
                hidden=(width,) * config.moons_depth)
            methods = [("hmc", config.moons_hmc.replace(seed=seeds.model))]
            if config.include_deterministic:
                methods.append(("sgd",
                                config.moons_sgd.replace(seed=seeds.model)))
            for method, settings in methods:
                prefix = f"half_moons/{method}/width={width}/n_train={n_train}"
                # HMC checkpoints: a rerun resumes a long grid where it
                # stopped (finished cells reload from their last segment).
                ens, info = fit_posterior(
                    model, moons.train_x, moons.train_y, settings,
                    checkpoint_dir=(out.path("ckpt", prefix.replace("/", "_"))
                                    if method == "hmc" else None),
                    probe_x=x_test, probe_y=y_test, max_rhat=config.max_rhat)
                report = record(prefix, ens)
                res, comps = _measure(
                    ens, x_test, y_test, counts, prefix, rows,
                    {"dataset": "half_moons", "method": method, "width": width,
                     "n_train": n_train}, report)
                res[f"{prefix}/test_accuracy"] = ens.accuracy(moons.test_x,
                                                             moons.test_y)
                res[f"{prefix}/fit_seconds"] = info["wall_seconds"]
                results.update(res)
                out.update(res)
                if method == "hmc":
                    moons_comps[(width, n_train)] = comps
                progress.step(common.mark(
                    f"half-moons {method} width={width} n={n_train}", report))

    # Images: HMC and VI over sample counts, SGD as the comparison.
    image_comps = {}
    image_posteriors: dict[str, str] = {}  # label -> prefix
    n_image_points = 0
    if image_methods:
        ds = common.load_data(config.image_dataset, data_dir=config.data_dir,
                              data_source=config.data_source)
        if config.image_num_train is not None:
            ds = ds.subset(num_train=config.image_num_train, seed=seeds.data)
        x_test, y_test = ds.test_x[:n_test], ds.test_y[:n_test]
        n_image_points = len(x_test)
        x_fig = ds.test_x[:config.figure1_images]
        y_fig = ds.test_y[:config.figure1_images]
        width = config.image_hidden[0]
        methods = [(m, config.image_hmc if m == "hmc" else config.image_vi)
                   for m in image_methods]
        if config.include_deterministic and not image_ensembles:
            methods.append(("sgd", config.sgd))
        for method, settings in methods:
            if image_ensembles:
                ens = image_ensembles[method]
                info = {"wall_seconds": ens.metadata.get("wall_seconds", 0.0)}
                n_train = ens.metadata.get("num_train", len(ds.train_x))
                width = ens.network.param_shapes[0][-1]
            else:
                model = common.load_model(ds.input_shape, ds.num_classes,
                                          hidden=config.image_hidden,
                                          keras_model=config.keras_model)
                ens, info = fit_posterior(
                    model, ds.train_x, ds.train_y,
                    settings.replace(seed=seeds.model),
                    checkpoint_dir=(out.path("ckpt", f"{config.image_dataset}"
                                             f"_{method}")
                                    if method in ("hmc", "vi") else None),
                    probe_x=x_test, probe_y=y_test, max_rhat=config.max_rhat)
                n_train = len(ds.train_x)
            prefix = (f"{config.image_dataset}/{method}/width={width}/"
                      f"n_train={n_train}")
            report = record(prefix, ens)
            res, comps = _measure(
                ens, x_test, y_test, counts, prefix, rows,
                {"dataset": config.image_dataset, "method": method,
                 "width": width, "n_train": n_train}, report)
            res[f"{prefix}/test_accuracy"] = ens.accuracy(ds.test_x, ds.test_y)
            res[f"{prefix}/fit_seconds"] = info["wall_seconds"]
            res.update(_figure1(ens, x_fig, y_fig, prefix))
            results.update(res)
            out.update(res)
            label = common.mark(
                method.upper() if method != "sgd" else "NN (SGD)", report)
            image_comps[label] = comps
            image_posteriors[label] = prefix
            ks = sorted(comps)
            curves[common.mark(f"{config.image_dataset} {method}", report)] = (
                ks,
                [res[f"{prefix}/samples={k}/grad_mean_abs/expected"] for k in ks],
                [res[f"{prefix}/samples={k}/grad_mean_abs/predictive"] for k in ks])
            progress.step(common.mark(f"{config.image_dataset} {method}",
                                      report))

    figures = []
    if config.moons_widths:
        figures += _moons_figures(out, config, counts, results, reports,
                                  moons_comps, curves)
    figures.insert(min(1, len(figures)), _plot_vs_samples(out, curves))
    if image_comps:
        figures.append(_plot_components_images(out, image_comps,
                                               config.image_dataset))
        figures.append(_plot_figure1(out, results, image_posteriors,
                                     config.image_dataset, counts,
                                     n_image_points))
    header = ["dataset", "method", "width", "n_train", "samples", "gradient",
              "mean_abs", "l2"] + list(common.CONVERGENCE_HEADER)
    unconverged = [p for p, r in reports.items() if common.is_unconverged(r)]
    note = ("mean_abs, l2: ours: the mean |component| and the L2 norm of "
            "the k-sample gradient over test points, averaged over disjoint "
            "k-sample subsets, of the per-sample cross-entropy of the logits "
            "(one softmax).  gradient: expected is Theorem 1's expected "
            "gradient \\<grad L\\>; predictive is the gradient of the loss of "
            "the posterior predictive (Feng et al.).  Carbone et al.'s "
            "published numbers are another measure: see Figure 1 below.\n\n"
            + common.CONVERGENCE_NOTE)
    if unconverged:
        note += ("\n\n**Warning:** written with unconverged HMC posteriors "
                 f"({', '.join(unconverged)}; allow_unconverged): their rows "
                 "are marked (UNCONVERGED).")
    note += "\n\n" + _figure1_section(results, image_posteriors,
                                      config.image_dataset if image_methods
                                      else None, counts, n_image_points)
    out.table("gradients", header, rows, note=note)
    results["figures"] = figures
    results["unconverged"] = unconverged
    out.update({"figures": figures, "unconverged": unconverged})
    logging.info("Gradient study written to %s", output_dir)
    return results
