"""The quickstart: the paper's three studies, small, offline, in minutes.

:func:`run_quickstart` fits a small HMC posterior, a VI posterior and an SGD
network on a Fashion-MNIST subset (the real data, from Debian's
dataset-fashion-mnist or ``data_dir``), saves them, and chains the attack
table on them, the gradient study (half-moons HMC over widths and training
sizes, and the gradient size against the number of posterior samples on the
three Fashion-MNIST models), a small robustness-accuracy sweep and a small
paper ablation (the authors' semantics switch by switch, on the same HMC and
VI posteriors plus the authors' training of each), each in its own
sub-directory; ``summary.md`` gathers the table, the ablation's answer, the
convergence evidence and the figures.

Every HMC posterior is diagnosed (function-space R-hat on held-out test
points).  If the Fashion-MNIST HMC posterior has not converged (R-hat median
above ``max_rhat``), the quickstart stops right after fitting it, with its
posterior and diagnostics saved, unless ``allow_unconverged``; then every
table, legend and the summary mark it "HMC (UNCONVERGED)".

The quickstart's :func:`fingerprint` is stored in ``results.json``: a rerun
in the same directory resumes (HMC from its checkpoints, the sweep from its
finished runs) only with the same settings; any other is refused before
anything is fitted, naming what differs, unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

from absl import logging

from tfp_bnn_adv import files
from tfp_bnn_adv import validate as validate_lib
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies.attack_table import AttackTableConfig
from tfp_bnn_adv.studies.attack_table import fingerprint as table_fingerprint
from tfp_bnn_adv.studies.attack_table import run_attack_table
from tfp_bnn_adv.studies.gradient_study import GradientStudyConfig
from tfp_bnn_adv.studies.gradient_study import fingerprint as grad_fingerprint
from tfp_bnn_adv.studies.gradient_study import run_gradient_study
from tfp_bnn_adv.studies.paper_ablation import PaperAblationConfig
from tfp_bnn_adv.studies.paper_ablation import fingerprint as ablation_fingerprint
from tfp_bnn_adv.studies.paper_ablation import run_paper_ablation
from tfp_bnn_adv.studies.robustness_accuracy import RobustnessAccuracyConfig
from tfp_bnn_adv.studies.robustness_accuracy import fingerprint as sweep_fingerprint
from tfp_bnn_adv.studies.robustness_accuracy import run_robustness_accuracy
from tfp_bnn_adv.studies.training import InferenceSettings
from tfp_bnn_adv.studies.training import fit_posterior

__all__ = ["QuickstartConfig", "run_quickstart", "fingerprint",
           "owned_directories",
           "FashionMnistMissingError", "NUM_TRAIN", "HIDDEN", "SETTINGS",
           "TABLE_ATTACKS", "MOONS_TRAIN_SIZES", "REPORT_LABELS",
           "LABELS", "SUBSTUDIES"]

# The largest Fashion-MNIST HMC posterior we measured to converge within the
# quickstart's budget on 2 cores: 500 points, 784-16-10, 4 chains of 700
# warm-up and 300 kept iterations at the default trajectory length (100
# leapfrog steps per iteration) gave a function-space R-hat median of 1.023
# (100% of 300 test points < 1.1) in 219 s on a 2-core Zen 3.  1000 points
# at width 32 with 300 + 100 iterations did not (median 1.25).  VI and SGD
# use the same data and architecture so the table compares like with like.
NUM_TRAIN = 500
HIDDEN = (16,)
SETTINGS = {
    "hmc": InferenceSettings(method="hmc", num_chains=4, num_burnin_steps=700,
                             num_results=300),
    "vi": InferenceSettings(method="vi", epochs=8, learning_rate=1e-2,
                            vi_samples=100),
    "sgd": InferenceSettings(method="sgd", epochs=8, learning_rate=1e-3),
}
# What else the quickstart runs, trimmed to its 15-minute budget on 2 cores
# (measured on a 2-core Zen 3): the attack table leaves APGD-T to each
# posterior's robustness report, which runs it (about 80 s less), and the
# half-moons grid of the gradient study stops at 500 training points (the
# 1000-point HMC runs took about 3.5 minutes of its 5); the robustness
# report, with its gradient-masking checks, questions the two posteriors
# (the SGD network, which every attack takes to 0, is their transfer
# reference).
TABLE_ATTACKS = ("random", "fgsm", "pgd", "apgd-ce", "square")
REPORT_LABELS = ("HMC", "VI")
MOONS_TRAIN_SIZES = (250, 500)
LABELS = {"hmc": "HMC", "vi": "VI", "sgd": "NN (SGD)"}
SUBSTUDIES = ("attack_table", "gradient_study", "robustness_accuracy",
              "paper_ablation")


class FashionMnistMissingError(FileNotFoundError):
    """Fashion-MNIST, which the quickstart needs offline, is not there."""


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    """Everything the quickstart runs.

    Attributes:
      num_train: the Fashion-MNIST training subset (``None``: all; the
        quickstart's: :data:`NUM_TRAIN`).
      hidden: hidden widths of the three Fashion-MNIST models
        (:data:`HIDDEN`).
      settings: ``method -> InferenceSettings`` of the ``"hmc"``, ``"vi"``
        and ``"sgd"`` fits (keys of :data:`LABELS`; :data:`SETTINGS`).
      table, grads, sweep: the three studies' configs.
      ablation: the paper ablation's config (``None``: skipped); it scores
        the quickstart's own HMC and VI posteriors, so its training subset,
        architecture and seed must be the quickstart's.
      dataset: the image data set the posteriors are fitted on
        (``"fashion_mnist"``, the quickstart's, or ``"mnist"``, e.g. for
        :mod:`~tfp_bnn_adv.studies.reproduction`); every study config must
        name the same.
      data_dir, data_source: where it is read from.
      seed: the training subset's seed
        (:func:`~tfp_bnn_adv.studies.common.study_seeds`; the settings and
        the studies carry their own).
      max_rhat: an HMC posterior is converged when its median function-space
        R-hat is at most this (``>= 1``).
      allow_unconverged: go on past an unconverged HMC posterior, marking
        it ``(UNCONVERGED)``.
    """
    num_train: int | None
    hidden: tuple
    settings: Mapping[str, InferenceSettings]
    table: AttackTableConfig
    grads: GradientStudyConfig
    sweep: RobustnessAccuracyConfig
    ablation: PaperAblationConfig | None = None
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    data_source: str = "auto"
    seed: int = 0
    max_rhat: float = 1.1
    allow_unconverged: bool = False

    def validate(self) -> None:
        common.check_max_rhat(self.max_rhat, "max_rhat")
        validate_lib.choice(self.dataset, ("fashion_mnist", "mnist"),
                            "dataset")
        named = {"table.dataset": self.table.dataset,
                 "grads.image_dataset": self.grads.image_dataset,
                 "sweep.dataset": self.sweep.dataset}
        if self.ablation is not None:
            named["ablation.dataset"] = self.ablation.dataset
        other = {k: v for k, v in named.items() if v != self.dataset}
        if other:
            raise ValueError(f"Every study must use dataset={self.dataset!r}"
                             f", got {other}.")
        bad = sorted(set(self.settings) - set(LABELS))
        if bad or not self.settings:
            raise ValueError(f"settings must map some of {tuple(LABELS)} to "
                             f"InferenceSettings, got {sorted(self.settings)}.")
        for config in (self.table, self.grads, self.sweep):
            config.validate()
        if self.ablation is not None:
            self.ablation.validate()
            mine = (self.num_train, tuple(self.hidden), self.seed,
                    self.data_dir, self.data_source)
            theirs = (self.ablation.num_train, tuple(self.ablation.hidden),
                      self.ablation.seed, self.ablation.data_dir,
                      self.ablation.data_source)
            if mine != theirs:
                raise ValueError(
                    "ablation must use the quickstart's training data, "
                    "architecture and seed (num_train, hidden, seed, "
                    f"data_dir, data_source): {theirs} != {mine}.")


def fingerprint(config: QuickstartConfig) -> dict[str, Any]:
    """The quickstart's :func:`~tfp_bnn_adv.studies.common.fingerprint`.

    Fields: the Fashion-MNIST location, the subset size, the hidden widths,
    each method's settings, ``max_rhat``, and the fingerprint fields of the
    three studies' configs (their posteriors are the ones fitted here, so
    they are covered by the fields before).
    """
    return common.fingerprint("quickstart", {
        "data": common.data_fields(config.dataset, config.data_dir,
                                   config.data_source),
        "num_train": config.num_train, "hidden": list(config.hidden),
        "settings": {m: common.settings_fields(s)
                     for m, s in config.settings.items()},
        "max_rhat": config.max_rhat,
        "attack_table": table_fingerprint(config.table)["fields"],
        "gradient_study": grad_fingerprint(config.grads)["fields"],
        "robustness_accuracy": sweep_fingerprint(config.sweep)["fields"],
        "paper_ablation": (None if config.ablation is None else
                           ablation_fingerprint(config.ablation)["fields"])})


def owned_directories(methods=tuple(SETTINGS)) -> tuple:
    """The sub-directories of ``output_dir`` the quickstart writes."""
    return (tuple(f"ckpt/{m}" for m in methods) + SUBSTUDIES
            + ("robustness_accuracy/runs",))


def _fashion(config: QuickstartConfig):
    try:
        ds = common.load_data(config.dataset, data_dir=config.data_dir,
                              data_source=config.data_source)
    except FileNotFoundError as e:
        if config.dataset != "fashion_mnist":
            raise
        raise FashionMnistMissingError(
            "The quickstart needs Fashion-MNIST offline. Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
            "put the four IDX .gz files in a directory and pass "
            f"--data_dir=DIR.\n{e}") from e
    return ds.subset(num_train=config.num_train,
                     seed=common.study_seeds(config.seed).data)


def run_quickstart(config: QuickstartConfig, output_dir: str, *,
                   overwrite: bool = False,
                   title: str = "tfp_bnn_adv quickstart") -> dict[str, Any]:
    """Fits the three posteriors, then runs the three studies on them.

    Args:
      config: a :class:`QuickstartConfig`.
      output_dir: receives ``results.json`` (each posterior's diagnostics),
        ``posterior_<method>.npz``, ``ckpt/<method>/``, ``figures/``,
        ``summary.md`` and one sub-directory per study
        (:data:`SUBSTUDIES`).
      overwrite: delete an earlier quickstart in ``output_dir`` (of any
        configuration) and start afresh.
      title: the heading of ``summary.md``.

    Returns:
      ``unconverged`` (``"<study>: <label>"`` of every unconverged HMC
      posterior used), ``summary`` (the path of ``summary.md``),
      ``summary_markdown`` (its text), ``convergence`` (``label ->``
      :func:`~tfp_bnn_adv.studies.common.convergence_report`), ``figures``
      and the three studies' results under ``attack_table``,
      ``gradient_study`` and ``robustness_accuracy``.

    Raises:
      ValueError: for a bad configuration.
      FashionMnistMissingError: when Fashion-MNIST is not there.
      ConfigMismatchError: when ``output_dir`` holds a quickstart of other
        settings, unless ``overwrite``; before anything is fitted.
      UnconvergedPosteriorError: for an unconverged HMC posterior without
        ``config.allow_unconverged``, right after it is saved.
    """
    config.validate()
    start = time.perf_counter()
    ds = _fashion(config)
    out = common.StudyOutput(
        output_dir, "quickstart", fingerprint=fingerprint(config),
        overwrite=overwrite,
        owned=("ckpt", "summary.md") + SUBSTUDIES + tuple(
            f"posterior_{m}.npz" for m in config.settings))
    ensembles, reports = {}, {}
    for method, settings in config.settings.items():
        logging.info("[quickstart] stage 1/5: %s on %s (%d points)",
                     method, config.dataset, len(ds.train_x))
        model = common.load_model(ds.input_shape, ds.num_classes,
                                  hidden=config.hidden)
        ens, _ = fit_posterior(
            model, ds.train_x, ds.train_y, settings,
            checkpoint_dir=out.path("ckpt", method),
            probe_x=ds.test_x, probe_y=ds.test_y, max_rhat=config.max_rhat)
        ens.metadata["dataset"] = config.dataset
        ens.save(out.path(f"posterior_{method}.npz"))
        ensembles[method] = ens
        reports[LABELS[method]] = common.record_posterior(
            out, LABELS[method], ens, config.max_rhat)
        # Stop before anything else is fitted: nothing may be presented as
        # "HMC" from chains that have not mixed.
        common.require_converged(
            reports, allow_unconverged=config.allow_unconverged,
            what="the quickstart's comparison",
            saved_to=out.path("results.json"))

    # The attack table and the gradient study recompute everything from the
    # posteriors above, whose configuration the quickstart's fingerprint has
    # just checked; their own fingerprints hold the posteriors' SHA-256,
    # which a refit may change in the last bits, so they start afresh.
    logging.info("[quickstart] stage 2/5: attack table")
    table = run_attack_table(
        config.table, out.path("attack_table"),
        ensembles={LABELS[m]: e for m, e in ensembles.items()},
        overwrite=True)

    logging.info("[quickstart] stage 3/5: gradient study")
    grads = run_gradient_study(
        config.grads, out.path("gradient_study"),
        image_ensembles=ensembles, overwrite=True)

    logging.info("[quickstart] stage 4/5: robustness-accuracy sweep")
    sweep = run_robustness_accuracy(config.sweep,
                                    out.path("robustness_accuracy"))

    ablation = None
    if config.ablation is not None:
        logging.info("[quickstart] stage 5/5: paper ablation")
        ablation = run_paper_ablation(
            config.ablation, out.path("paper_ablation"),
            ensembles={m: ensembles[m] for m in config.ablation.methods},
            overwrite=True)

    minutes = (time.perf_counter() - start) / 60
    figures = table["figures"] + grads["figures"] + sweep["figures"] + (
        ablation["figures"] if ablation else [])
    unconverged = [f"{study}: {label}" for study, res in (
        ("attack table", table), ("gradient study", grads),
        ("robustness-accuracy sweep", sweep)) + ((
            ("paper ablation", ablation),) if ablation else ())
        for label in res["unconverged"]]
    warning = ("**Warning:** unconverged HMC posteriors were used because "
               "--allow_unconverged was given; they are marked (UNCONVERGED) "
               "and their numbers are not those of the posterior: "
               + "; ".join(unconverged) + ".\n\n" if unconverged else "")
    convergence = "\n".join(f"- {common.describe(label, r)}"
                            for label, r in reports.items()
                            if r["method"] in ("hmc", "vi"))
    summary = (f"# {title} ({minutes:.1f} min)\n\n" + warning
               + table["table_markdown"]
               + ("\n## Why the paper found BNNs robust (paper ablation)\n\n"
                  + ablation["paragraph"] + "\n" + ablation["table_markdown"]
                  if ablation else "")
               + "\n## Convergence\n\n"
               + convergence + "\n\n## Figures\n\n"
               + "\n".join(f"- {f}" for f in figures) + "\n")
    summary_path = out.path("summary.md")
    out.update({"unconverged": unconverged, "summary": summary_path})
    files.write_text(summary_path, summary)
    return {"unconverged": unconverged, "summary": summary_path,
            "summary_markdown": summary, "convergence": reports,
            "figures": figures, "attack_table": table,
            "gradient_study": grads, "robustness_accuracy": sweep,
            "paper_ablation": ablation}
