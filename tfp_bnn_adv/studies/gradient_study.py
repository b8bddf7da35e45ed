"""Experiment 1 of Carbone et al. (2020): the vanishing expected gradient.

Theorem 1 says the expected loss gradient ``<grad_x L(x, w)>`` of a BNN
vanishes on the data manifold in the limit of infinite data and
over-parametrisation.  The study measures its size on test points

* as the number of posterior samples in the average grows (1, 10, 100, ...),
* as the network width grows, and
* as the number of training points grows,

on half-moons with HMC and on an image dataset with HMC and VI, with the
deterministic network (SGD) and the *predictive* gradient (Feng et al., 2024)
as comparison curves.  Reported size: the mean absolute gradient component
over test points, ``mean |<grad L>|`` (the paper's figure: MNIST HMC
0.574 -> 0.045 -> 0.011 for 1 -> 10 -> 100 samples).

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
from tfp_bnn_adv import validate
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies.training import InferenceSettings
from tfp_bnn_adv.studies.training import fit_posterior

__all__ = ["GradientStudyConfig", "run_gradient_study", "fingerprint",
           "gradient_sizes", "sample_subsets"]

# Everything the study writes besides results.json, figures/, tensorboard/.
_OWNED = ("gradients.csv", "gradients.md")

# Published mean |<grad L>| on MNIST for 1, 10, 100 samples (PAPER.md),
# quoted in the table's note.
PAPER_MNIST = {"hmc": {1: 0.574, 10: 0.045, 100: 0.011},
               "vi": {1: 4.730, 10: 0.961, 100: 0.147}}


@dataclasses.dataclass(frozen=True)
class GradientStudyConfig:
    """What the gradient study runs.

    Attributes:
      moons_widths: hidden widths of the half-moons MLPs (one hidden layer
        per entry of ``moons_depth``).
      moons_train_sizes: training-set sizes of the half-moons runs.
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
            sample_counts=(1, 5, 20, 100), num_test=200,
            sgd=InferenceSettings(method="sgd", epochs=5, learning_rate=1e-3))
        return dataclasses.replace(base, **overrides)

    def validate(self) -> None:
        common.check_max_rhat(self.max_rhat, "max_rhat")
        for name in ("moons_widths", "moons_train_sizes", "sample_counts",
                     "image_hidden"):
            common.check_field(validate.int_sequence, getattr(self, name), name)
        validate.choice(self.image_dataset, (None, "mnist", "fashion_mnist"),
                        "image_dataset")
        bad = [m for m in self.image_methods if m not in ("hmc", "vi")]
        if bad:
            raise ValueError(f"image_methods may hold 'hmc' and 'vi', got {bad}.")
        common.check_field(validate.optional_positive_int, self.num_test,
                           "num_test")
        if self.keras_model is not None and not os.path.exists(self.keras_model):
            raise ValueError(f"keras_model file {self.keras_model!r} not found.")


def fingerprint(config: GradientStudyConfig,
                image_ensembles: dict | None = None) -> dict[str, Any]:
    """The study's :func:`~tfp_bnn_adv.studies.common.fingerprint`.

    Fields: the half-moons grid (``moons_widths``, ``moons_train_sizes``,
    ``moons_depth``, ``moons_noise``) and its HMC settings (SGD's with
    ``include_deterministic``), ``sample_counts``, ``num_test``, ``seed``,
    ``max_rhat`` (the UNCONVERGED marks depend on it) and, when the image
    part runs, its data set (name, directory, source), ``image_num_train``
    and either ``image_ensembles`` as ``method -> ensemble_sha256`` or what
    fits them: ``image_methods``, ``image_hidden``, the SHA-256 of
    ``keras_model`` and the settings of each method fitted.  Every
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
        line, = ax.plot(ks, exp, marker="o", label=f"{label} expected")
        if len(ks) > 1:
            ax.plot(ks, pred, ls="--", color=line.get_color(),
                    label=f"{label} predictive")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("posterior samples in the average")
    ax.set_ylabel("mean |gradient component|")
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
    ax.set_ylabel("mean |<grad L>| (most samples)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return out.save_figure(fig, stem)


def run_gradient_study(config: GradientStudyConfig, output_dir: str,
                       image_ensembles: dict | None = None, *,
                       overwrite: bool = False) -> dict[str, Any]:
    """Runs the vanishing-gradient study; writes results, table and figures.

    Args:
      config: a :class:`GradientStudyConfig` (``.quick()`` or ``.paper()``).
      output_dir: receives ``results.json``, ``gradients.csv`` / ``.md``,
        ``figures/*.png`` and TensorBoard scalars.
      image_ensembles: optional ``method -> PosteriorEnsemble`` already fitted
        on ``config.image_dataset`` (e.g. by the quickstart); measured instead
        of fitting ``config.image_methods`` and the SGD comparison.
      overwrite: delete earlier results in ``output_dir`` (of any
        configuration) and start afresh.

    Returns:
      The results dict: keys like
      ``half_moons/hmc/width=64/n_train=1000/samples=10/grad_mean_abs/expected``,
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
                ens, info = fit_posterior(model, moons.train_x, moons.train_y,
                                          settings, probe_x=x_test,
                                          probe_y=y_test,
                                          max_rhat=config.max_rhat)
                prefix = f"half_moons/{method}/width={width}/n_train={n_train}"
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
    if image_methods:
        ds = common.load_data(config.image_dataset, data_dir=config.data_dir,
                              data_source=config.data_source)
        if config.image_num_train is not None:
            ds = ds.subset(num_train=config.image_num_train, seed=seeds.data)
        x_test, y_test = ds.test_x[:n_test], ds.test_y[:n_test]
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
                ens, info = fit_posterior(model, ds.train_x, ds.train_y,
                                          settings.replace(seed=seeds.model),
                                          probe_x=x_test, probe_y=y_test,
                                          max_rhat=config.max_rhat)
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
            results.update(res)
            out.update(res)
            image_comps[common.mark(
                method.upper() if method != "sgd" else "NN (SGD)",
                report)] = comps
            ks = sorted(comps)
            curves[common.mark(f"{config.image_dataset} {method}", report)] = (
                ks,
                [res[f"{prefix}/samples={k}/grad_mean_abs/expected"] for k in ks],
                [res[f"{prefix}/samples={k}/grad_mean_abs/predictive"] for k in ks])
            progress.step(common.mark(f"{config.image_dataset} {method}",
                                      report))

    # Half-moons curves vs samples, width and training size.
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

    figures = [
        _plot_components_moons(
            out, moons_comps, config.moons_widths, n_big, counts,
            {(w, n) for w in config.moons_widths
             for n in config.moons_train_sizes
             if common.is_unconverged(reports.get(
                 f"half_moons/hmc/width={w}/n_train={n}", {}))}),
        _plot_vs_samples(out, curves),
        _plot_vs_axis(out, by_width, "hidden units", "grad_vs_width",
                      "Half-moons: gradient size vs. width"),
        _plot_vs_axis(out, by_size, "training points", "grad_vs_train_size",
                      "Half-moons: gradient size vs. training-set size"),
    ]
    if image_comps:
        figures.append(_plot_components_images(out, image_comps,
                                               config.image_dataset))
    header = ["dataset", "method", "width", "n_train", "samples", "gradient",
              "mean_abs", "l2"] + list(common.CONVERGENCE_HEADER)
    unconverged = [p for p, r in reports.items() if common.is_unconverged(r)]
    paper = {m: " / ".join(f"{v:.3f}" for v in PAPER_MNIST[m].values())
             for m in PAPER_MNIST}
    note = ("mean_abs: mean |component| of the gradient over test points; the "
            f"paper reports on MNIST (HMC) {paper['hmc']} and (VI) "
            f"{paper['vi']} for "
            f"{' / '.join(str(k) for k in PAPER_MNIST['hmc'])} samples.\n\n"
            + common.CONVERGENCE_NOTE)
    if unconverged:
        note += ("\n\n**Warning:** written with unconverged HMC posteriors "
                 f"({', '.join(unconverged)}; allow_unconverged): their rows "
                 "are marked (UNCONVERGED).")
    out.table("gradients", header, rows, note=note)
    results["figures"] = figures
    results["unconverged"] = unconverged
    out.update({"figures": figures, "unconverged": unconverged})
    logging.info("Gradient study written to %s", output_dir)
    return results
