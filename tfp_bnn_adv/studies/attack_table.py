"""Experiment 2 of Carbone et al. (2020): the attack table.

Every posterior (HMC, VI, SGD network, deep ensemble) is attacked with the
random attack, FGSM, PGD, APGD-CE and APGD-T (AutoAttack's targeted DLR
attack) with *both* gradient definitions (Theorem 1's expected gradient and
the posterior-predictive gradient of Feng et al., 2024) and the gradient-free
Square Attack, at the paper's ``eps = 0.25`` on ``[0, 1]`` pixels (and an
optional sweep of ``eps``).  Each row ends with the per-example worst case
over all its attacks.

Two numbers per cell, side by side:

* **accuracy on attacked inputs** over *all* attacked test points; this is
  what the authors' code computed and what their table reports, so this is
  the column to compare with the paper;
* **unchanged predictions** (adversarial robustness): the fraction of points
  whose predicted class the attack did not change.

Each row also shows its posterior's convergence evidence
(:data:`~tfp_bnn_adv.studies.common.CONVERGENCE_HEADER`).  The table is not
written from an unconverged HMC posterior unless ``allow_unconverged`` is
set, and then its rows are marked ``(UNCONVERGED)``.

The table's :func:`fingerprint` (its config, the SHA-256 of every posterior
file and of every in-memory ensemble) is stored in ``results.json``; a rerun
in the same directory with another configuration or other posteriors is
refused, naming what differs, unless ``overwrite`` deletes the earlier table.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from absl import logging
import numpy as np

from tfp_bnn_adv import data as data_lib
from tfp_bnn_adv import evaluation
from tfp_bnn_adv import files
from tfp_bnn_adv import metrics
from tfp_bnn_adv import validate
from tfp_bnn_adv import xla
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.studies import common

__all__ = ["AttackTableConfig", "run_attack_table", "fingerprint",
           "PAPER_TABLE", "ATTACKS", "GRADIENTS"]

ATTACKS = common.ATTACKS
GRADIENT_ATTACKS = common.GRADIENT_ATTACKS
GRADIENTS = ("expected", "predictive", "paper", "sample")
# Everything the table writes besides results.json, figures/, tensorboard/.
_OWNED = ("table.csv", "table.md", "table_unchanged.csv",
          "table_unchanged.md", "attacks_long.csv", "attacks_long.md",
          "reports")

# Carbone et al. (2020), Table 1, eps = 0.25: (Rand, FGSM, PGD).
PAPER_TABLE = {
    ("mnist", "hmc"): (0.850, 0.960, 0.970),
    ("mnist", "vi"): (0.956, 0.936, 0.938),
    ("fashion_mnist", "hmc"): (0.812, 0.848, 0.826),
    ("fashion_mnist", "vi"): (0.744, 0.834, 0.916),
}
_METHOD_NAMES = {"hmc": "HMC", "vi": "VI", "sgd": "NN (SGD)",
                 "ensemble": "Deep ensemble"}


@dataclasses.dataclass(frozen=True)
class AttackTableConfig:
    """What the attack table runs.

    Attributes:
      posteriors: ``(label, path)`` pairs of saved ensembles (``label``
        ``None`` uses the saved method name); may be empty when ensembles
        are passed to :func:`run_attack_table` directly.
      dataset: ``"fashion_mnist"``, ``"mnist"`` or ``"half_moons"``.
      num_test: test points attacked (the first ``num_test``; ``None``:
        all).
      eps: the table's L-inf radius (paper: 0.25).
      eps_sweep: extra radii, each giving its own table rows.
      attacks: subset of ``ATTACKS``.
      gradients: gradient definitions for FGSM and PGD (``"expected"``,
        ``"predictive"``, ``"sample"``).
      pgd_steps, pgd_restarts: PGD settings (paper: 40 steps); the step size
        is PGD's default ``2.5 eps / steps``.
      apgd_steps: APGD's iterations (AutoAttack: 100), for ``"apgd-ce"`` and
        for each target of ``"apgd-t"``.
      random_trials: best-of-k for the random attack (paper: 1).
      square_queries: Square Attack query budget per example.
      max_samples: thin larger ensembles to at most this many samples.
      data_dir, data_source, half_moons_n: where the test data comes from.
      seed: the table's seed (:func:`~tfp_bnn_adv.studies.common.study_seeds`:
        half-moons' draw, and the attacks: column ``i`` uses ``seed + i``).
      max_rhat: an HMC posterior is converged when its median function-space
        R-hat is at most this (``>= 1``).
      verdict: also run :func:`tfp_bnn_adv.evaluation.robustness_report` on
        every posterior at ``eps`` (its battery, worst case and
        gradient-masking checks; the SGD network, if one is attacked, as the
        transfer reference of the others) and put its verdict in the table;
        each report goes to ``reports/<label>/``.
      report_num_test: the first this many test points go into the reports
        (``None``: all ``num_test``).
      report_labels: the posteriors that get a report (``None``: all); the
        others' verdict cells stay empty.
      allow_unconverged: write the table even from unconverged HMC
        posteriors (their rows marked ``(UNCONVERGED)``); otherwise
        :func:`run_attack_table` refuses before attacking.
    """
    posteriors: tuple = ()
    dataset: str = "fashion_mnist"
    num_test: int | None = 1000
    eps: float = 0.25
    eps_sweep: tuple = ()
    attacks: tuple = ATTACKS
    gradients: tuple = ("expected", "predictive")
    pgd_steps: int = 40
    pgd_restarts: int = 1
    apgd_steps: int = 100
    random_trials: int = 1
    square_queries: int = 1000
    max_samples: int | None = None
    data_dir: str | None = None
    data_source: str = "auto"
    half_moons_n: int = 1000
    seed: int = 0
    max_rhat: float = 1.1
    verdict: bool = True
    report_num_test: int | None = None
    report_labels: tuple | None = None
    allow_unconverged: bool = False

    @classmethod
    def paper(cls, **overrides) -> "AttackTableConfig":
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def quick(cls, **overrides) -> "AttackTableConfig":
        base = cls(num_test=300, pgd_steps=20, apgd_steps=20,
                   square_queries=300, max_samples=50, report_num_test=100)
        return dataclasses.replace(base, **overrides)

    def validate(self) -> None:
        common.check_max_rhat(self.max_rhat, "max_rhat")
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad or not self.attacks:
            raise ValueError(f"attacks must be a non-empty subset of {ATTACKS}, "
                             f"got {self.attacks!r}.")
        bad = [g for g in self.gradients if g not in GRADIENTS]
        if bad:
            raise ValueError(f"gradients must be among {', '.join(GRADIENTS)}"
                             f"; got {bad}.")
        for e in (self.eps,) + tuple(self.eps_sweep):
            common.check_field(validate.nonnegative_real, e, "eps")
        common.check_field(validate.optional_positive_int, self.num_test,
                           "num_test")
        common.check_field(validate.positive_int, self.apgd_steps,
                           "apgd_steps")
        common.check_field(validate.optional_positive_int,
                           self.report_num_test, "report_num_test")
        if not isinstance(self.verdict, bool):
            raise TypeError(f"verdict must be a bool, got {self.verdict!r}.")
        if self.report_labels is not None and (
                isinstance(self.report_labels, str) or
                not all(isinstance(v, str) for v in self.report_labels)):
            raise TypeError(f"report_labels must be None or a tuple of "
                            f"posterior labels, got {self.report_labels!r}.")
        validate.choice(self.dataset, data_lib.DATASET_NAMES, "dataset")
        for label, path in self.posteriors:
            if not os.path.exists(path):
                raise ValueError(f"posterior file {path!r} (label {label!r}) "
                                 "not found.")


def _test_data(config: AttackTableConfig):
    ds = common.load_data(config.dataset, data_dir=config.data_dir,
                          data_source=config.data_source,
                          half_moons_n=config.half_moons_n,
                          seed=common.study_seeds(config.seed).data)
    return ds.test_x[:config.num_test], ds.test_y[:config.num_test]


def fingerprint(config: AttackTableConfig,
                ensembles: Mapping[str, PosteriorEnsemble] | None = None
                ) -> dict[str, Any]:
    """The table's :func:`~tfp_bnn_adv.studies.common.fingerprint`.

    Fields: the data set (name, and directory and source or half-moons
    size), ``num_test``, ``eps``, ``eps_sweep``, ``attacks``, the settings of
    the attacks in the table (``gradients`` for FGSM/PGD, ``pgd_steps`` and
    ``pgd_restarts``, ``random_trials``, ``square_queries``),
    ``max_samples``, ``seed``, ``max_rhat`` (the table's UNCONVERGED marks
    depend on it), ``posteriors`` as ``[label, SHA-256 of the file]`` and
    ``ensembles`` as ``label -> ensemble_sha256``.  Not in it:
    ``allow_unconverged`` (whether the table is written, not what it says);
    the posterior files' paths are recorded under ``inputs``.

    Raises:
      FileNotFoundError: for a posterior file that does not exist.
    """
    fields = dict(common.data_fields(config.dataset, config.data_dir,
                                     config.data_source, config.half_moons_n),
                  num_test=config.num_test, eps=config.eps,
                  eps_sweep=list(config.eps_sweep),
                  attacks=list(config.attacks),
                  max_samples=config.max_samples, seed=config.seed,
                  max_rhat=config.max_rhat)
    if any(a in GRADIENT_ATTACKS for a in config.attacks):
        fields["gradients"] = list(config.gradients)
    if "pgd" in config.attacks:
        fields.update(pgd_steps=config.pgd_steps,
                      pgd_restarts=config.pgd_restarts)
    if any(a.startswith("apgd") for a in config.attacks):
        fields["apgd_steps"] = config.apgd_steps
    if "random" in config.attacks:
        fields["random_trials"] = config.random_trials
    if "square" in config.attacks:
        fields["square_queries"] = config.square_queries
    if config.verdict:
        fields["verdict"] = {"report_num_test": config.report_num_test,
                             "report_labels": (None if config.report_labels
                                               is None else
                                               list(config.report_labels)),
                             "apgd_steps": config.apgd_steps,
                             "square_queries": config.square_queries}
    fields["posteriors"] = [[label, common.file_sha256(path)]
                            for label, path in config.posteriors]
    fields["ensembles"] = {label: common.ensemble_sha256(ens)
                           for label, ens in (ensembles or {}).items()}
    inputs = {"posteriors": [[label, os.path.abspath(path)]
                             for label, path in config.posteriors]}
    return common.fingerprint("attack_table", fields, inputs)


def _columns(config) -> list[tuple[str, str | None]]:
    cols = []
    for attack in config.attacks:
        if attack in GRADIENT_ATTACKS:
            cols += [(attack, g) for g in config.gradients]
        else:
            cols.append((attack, None))
    return cols


def _col_name(attack, gradient):
    name = {"random": "Rand", "fgsm": "FGSM", "pgd": "PGD",
            "apgd-ce": "APGD-CE", "apgd-t": "APGD-T",
            "square": "Square"}[attack]
    return f"{name} ({gradient})" if gradient else name


def run_attack_table(config: AttackTableConfig, output_dir: str,
                     ensembles: Mapping[str, PosteriorEnsemble] | None = None,
                     *, overwrite: bool = False) -> dict[str, Any]:
    """Attacks every posterior; writes ``table.md``, ``table.csv`` and more.

    Args:
      config: an :class:`AttackTableConfig`.
      output_dir: receives ``results.json``, ``table.md`` (both metrics, the
        paper's figures alongside), ``table.csv`` (accuracy on attacked
        inputs, the paper's layout, its published figures beside), ``table_unchanged.csv``,
        ``attacks_long.csv``, ``figures/`` and, with ``config.verdict``,
        ``reports/<label>/`` (each posterior's robustness report).
      ensembles: optional ``label -> PosteriorEnsemble`` attacked in addition
        to ``config.posteriors``.
      overwrite: delete an earlier table in ``output_dir`` (of any
        configuration) and start afresh.

    Returns:
      Results with keys ``<label>/eps=<eps>/test/adv_accuracy/pgd/expected``
      and so on, ``<label>/eps=<eps>/test/worst_case_accuracy`` (the
      per-example worst case over the row's attacks), with ``verdict``
      ``<label>/verdict``, ``<label>/verdict_reason`` and ``<label>/report``
      (the path of its ``report.md``), each posterior's
      ``<label>/diagnostics`` and
      ``<label>/convergence/...`` (see
      :func:`~tfp_bnn_adv.studies.common.convergence_results`),
      ``"unconverged"`` (labels of unconverged HMC posteriors) and
      ``"table_markdown"``.

    Raises:
      ValueError: for a bad configuration or no posterior at all.
      ConfigMismatchError: when ``output_dir`` holds a table of another
        configuration or of other posteriors (see :func:`fingerprint`),
        unless ``overwrite``; before anything is attacked or written.
      UnconvergedPosteriorError: for an unconverged HMC posterior without
        ``config.allow_unconverged``, before any attack (its diagnostics are
        already in ``results.json``).
    """
    config.validate()
    targets: dict[str, PosteriorEnsemble] = dict(ensembles or {})
    for label, path in config.posteriors:
        ens = PosteriorEnsemble.load(path)
        label = label or _METHOD_NAMES.get(ens.metadata.get("method"), path)
        targets[label] = ens
    if not targets:
        raise ValueError("no posterior to attack: give config.posteriors or "
                         "ensembles.")
    out = common.StudyOutput(output_dir, "attack_table",
                             fingerprint=fingerprint(config, ensembles),
                             overwrite=overwrite, owned=_OWNED)
    reports = {label: common.record_posterior(out, label, ens, config.max_rhat)
               for label, ens in targets.items()}
    results: dict[str, Any] = {}
    for label, report in reports.items():
        results.update(common.convergence_results(label, report))
    unconverged = common.require_converged(
        reports, allow_unconverged=config.allow_unconverged,
        what="the attack table", saved_to=out.path("results.json"))
    x, y = _test_data(config)
    attack_seed = common.study_seeds(config.seed).attack
    cols = _columns(config)
    eps_values = [config.eps] + [e for e in config.eps_sweep if e != config.eps]
    verdicts = _verdicts(config, targets, x, y, attack_seed, out, results)
    verdict_col = ["verdict"] if config.verdict else []
    progress = common.Progress("attack_table",
                               len(targets) * len(eps_values) * len(cols))
    long_rows = []
    acc_rows, unchanged_rows = [], []
    for label, ens in targets.items():
        ens = common.limit_samples(ens, config.max_samples)
        method = ens.metadata.get("method", "?")
        report = reports[label]
        for eps in eps_values:
            prefix = f"{label}/eps={eps:g}"
            p_clean = ens.predict_proba(x)
            clean = metrics.clean_accuracy(p_clean, y)
            # A point counts in the worst case only if it is classified
            # correctly before and after every attack of the row.
            robust = np.argmax(p_clean, axis=-1) == y
            row_acc, row_unch = [], []
            for i, (attack, gradient) in enumerate(cols):
                x_adv = common.run_attack(
                    ens, x, y, attack, eps, seed=attack_seed + i,
                    gradient=gradient, pgd_steps=config.pgd_steps,
                    pgd_restarts=config.pgd_restarts,
                    random_trials=config.random_trials,
                    square_queries=config.square_queries,
                    apgd_steps=config.apgd_steps)
                robust &= np.argmax(ens.predict_proba(x_adv), axis=-1) == y
                m = metrics.evaluate_attack(ens, x, y, x_adv, attack_name=attack,
                                            gradient=gradient)
                m = {f"{prefix}/{k}": v for k, v in m.items()}
                key = attack + (f"/{gradient}" if gradient else "")
                acc = m[f"{prefix}/test/adv_accuracy/{key}"]
                unch = m[f"{prefix}/test/adv_robustness/{key}"]
                row_acc.append(acc)
                row_unch.append(unch)
                long_rows.append([config.dataset, label, method, eps, attack,
                                  gradient or "", clean, acc, unch,
                                  m[f"{prefix}/test/softmax_robustness/{key}"],
                                  m[f"{prefix}/test/success_rate/{key}"],
                                  report["converged"],
                                  report.get("function_rhat_median")])
                results.update(m)
                out.update(m)
                progress.step(f"{label} eps={eps:g} {_col_name(attack, gradient)}"
                              f": acc {acc:.3f}, unchanged {unch:.3f}")
            worst = float(np.mean(robust))
            results[f"{prefix}/test/worst_case_accuracy"] = worst
            out.update({f"{prefix}/test/worst_case_accuracy": worst})
            paper = PAPER_TABLE.get((config.dataset, method))
            paper_cols = list(paper) if (paper and eps == 0.25) else [None] * 3
            name = f"{config.dataset} / {label}"
            if len(eps_values) > 1:
                name += f" (eps={eps:g})"
            name = common.mark(name, report)
            verdict = [verdicts[label]["verdict"] if (
                eps == config.eps and label in verdicts) else ""
                       ] if config.verdict else []
            acc_rows.append([name, clean] + row_acc + [worst] + verdict +
                            common.convergence_columns(report) + paper_cols)
            unchanged_rows.append([name] + row_unch)

    col_names = [_col_name(a, g) for a, g in cols]
    acc_header = (["dataset / method", "clean"] + col_names +
                  ["worst case"] + verdict_col +
                  list(common.CONVERGENCE_HEADER) +
                  ["published Rand", "published FGSM", "published PGD"])
    unch_header = ["dataset / method"] + col_names
    out.table("table", acc_header, acc_rows)
    out.table("table_unchanged", unch_header, unchanged_rows)
    out.table("attacks_long", ["dataset", "label", "method", "eps", "attack",
                               "gradient", "clean_accuracy", "adv_accuracy",
                               "unchanged", "softmax_robustness",
                               "success_rate", "converged",
                               "function_rhat_median"], long_rows)
    warning = ("**Warning:** written with unconverged HMC posteriors "
               f"({', '.join(unconverged)}; allow_unconverged): their rows "
               "are marked (UNCONVERGED) and are not samples of the "
               "posterior.\n\n" if unconverged else "")
    md = warning + (
        f"## Accuracy on attacked inputs (L-inf, eps={config.eps:g}, "
        f"{len(x)} test points) — compare with the paper\n\n"
        "The authors' code scores robustness as accuracy on *all* attacked "
        "test points; the paper's published Table 1 (eps = 0.25) is in the "
        "last three columns. Gradients: (expected) is Theorem 1's expected "
        "gradient, (predictive) the posterior-predictive gradient of Feng et "
        "al. (2024), (paper) the original code's double-softmax loss "
        "(without its other choices: see the paper ablation), (sample) one "
        "posterior sample per step. APGD-CE is APGD on the cross-entropy, "
        "APGD-T AutoAttack's targeted DLR attack (Croce & Hein, 2020); "
        "*worst case* counts a point only if it is classified correctly "
        "before and after every attack of its row (the per-example worst "
        "case).\n\n"
        + common.markdown_table(acc_header, acc_rows) +
        f"\n{common.CONVERGENCE_NOTE}\n"
        "\n## Unchanged predictions (adversarial robustness)\n\n"
        "Fraction of test points whose predicted class the attack did not "
        "change.\n\n" + common.markdown_table(unch_header, unchanged_rows)
        + _verdict_markdown(config, verdicts))
    files.write_text(out.path("table.md"), md)
    results["figures"] = [_plot(out, acc_header, acc_rows,
                                col_names + ["worst case"])]
    results["table_markdown"] = md
    results["unconverged"] = unconverged
    # Where each attack ran, by xla.auto_path's rule (nothing is timed):
    # deterministic attacks on dense and on convolutional networks, and
    # stochastic ones; a pinned TFP_BNN_ADV_JIT pins all three.
    results["compile_paths"] = {
        "deterministic_dense": xla.path_name(
            xla.deterministic_jit(None, convolutional=False)),
        "deterministic_convolutional": xla.path_name(
            xla.deterministic_jit(None, convolutional=True)),
        "stochastic": xla.path_name(xla.stochastic_jit(None))}
    out.update({"figures": results["figures"], "unconverged": unconverged,
                "compile_paths": results["compile_paths"]})
    logging.info("Attack table written to %s", output_dir)
    return results


def _verdicts(config, targets, x, y, seed, out, results):
    """Each posterior's robustness report at ``config.eps``: label -> report.

    The SGD network, when the table attacks one, is the transfer reference
    of every other posterior.  Verdicts and reasons go into ``results`` and
    ``results.json`` as ``<label>/verdict`` and ``<label>/verdict_reason``.
    """
    if not config.verdict:
        return {}
    n = config.report_num_test or len(x)
    reference = next((e for e in targets.values()
                      if e.metadata.get("method") == "sgd"), None)
    found = {}
    for label, ens in targets.items():
        if config.report_labels is not None and label not in config.report_labels:
            continue
        logging.info("attack_table: robustness report of %s (%d points)",
                     label, min(n, len(x)))
        report = evaluation.robustness_report(
            common.limit_samples(ens, config.max_samples), x[:n], y[:n],
            eps=config.eps, reference=None if ens is reference else reference,
            gradient="predictive", seed=seed,
            output_dir=out.path("reports", common.slug(label)),
            steps=config.apgd_steps, square_queries=config.square_queries)
        found[label] = report
        values = {f"{label}/verdict": report["verdict"],
                  f"{label}/verdict_reason": report["verdict_reason"],
                  f"{label}/report": out.path("reports", common.slug(label),
                                              "report.md")}
        results.update(values)
        out.update(values)
    return found


def _verdict_markdown(config, verdicts) -> str:
    if not verdicts:
        return ""
    lines = [f"- **{label}**: {r['verdict']} — {r['verdict_reason']} "
             f"([report](reports/{common.slug(label)}/report.md))"
             for label, r in verdicts.items()]
    return (f"\n## Verdict per posterior (robustness report, eps="
            f"{config.eps:g})\n\nThe report's battery (FGSM, PGD, APGD-CE, "
            "APGD-T, Square, random noise; posterior-predictive gradient), "
            "its per-example worst case and its gradient-masking checks "
            "(`tfp_bnn_adv.evaluation`), on the first "
            "test points of the table; the verdict is also the table's "
            "*verdict* column.\n\n" + "\n".join(lines) + "\n")


def _plot(out, header, rows, col_names):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(col_names), 3.8))
    width = 0.8 / max(1, len(rows))
    xs = np.arange(len(col_names) + 1)
    for i, row in enumerate(rows):
        vals = [row[1]] + [v for v in row[2:2 + len(col_names)]]
        ax.bar(xs + i * width, vals, width, label=row[0])
    ax.set_xticks(xs + width * (len(rows) - 1) / 2)
    ax.set_xticklabels(["clean"] + col_names, rotation=30, ha="right",
                       fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy on attacked inputs")
    ax.legend(fontsize=7)
    ax.set_title("Attack table")
    return out.save_figure(fig, "attack_table")
