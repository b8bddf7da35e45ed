"""The reproduction: every study of the paper, at one scale, with its evidence.

:func:`run_reproduction` runs, resumably, the whole set of studies on each
data set (a *part*), and writes what a reader needs to check the answer:

* an image part per data set (``"fashion_mnist"``, offline; ``"mnist"``,
  through ``data_dir`` or TFDS): HMC, VI and SGD fitted on the same subset
  and MLP, then the attack table (random, FGSM, PGD, APGD-CE with both
  gradient definitions, Square, the per-example worst case) with a
  robustness report per posterior (APGD-T too, the gradient-masking
  checks, a verdict), the gradient against the number of posterior samples
  with both measures (ours and the authors' Figure 1 measure), the
  robustness-accuracy sweep and the paper ablation (the authors' semantics
  switch by switch).  It is :func:`~tfp_bnn_adv.studies.quickstart.
  run_quickstart`'s pipeline at the preset's scale, in ``<output_dir>/<data
  set>/``;
* the half-moons part: the gradient study over widths and training-set
  sizes (HMC and SGD), in ``<output_dir>/half_moons/gradient_study/``.

Presets (:func:`preset_config`): ``"quick"`` (a minute or two: a smoke run,
numbers meaningless), ``"cpu"`` (the largest scale we measured to finish in
a few hours on 2 CPU cores, at HMC settings that converge) and ``"paper"``
(the paper's sizes, for a GPU or TPU).

Nothing posterior-based is presented without its diagnostics: every HMC
posterior carries its function-space R-hat and ESS, and ``findings.md`` --
the headline tables -- leaves out every row of an unconverged HMC posterior,
naming it below the table (the per-study files keep all rows, marked
``(UNCONVERGED)``).

Resuming: every part records its completion in ``results.json``; a rerun
with the same settings skips the finished parts (even when only their small
files are left, e.g. in a fresh clone of the committed results) and resumes
the others from their checkpoints.  Other settings are refused, naming what
differs, unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping

from absl import logging

from tfp_bnn_adv import files
from tfp_bnn_adv import validate
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies import quickstart as quickstart_lib
from tfp_bnn_adv.studies.attack_table import AttackTableConfig
from tfp_bnn_adv.studies.gradient_study import GradientStudyConfig
from tfp_bnn_adv.studies.gradient_study import fingerprint as grad_fingerprint
from tfp_bnn_adv.studies.gradient_study import run_gradient_study
from tfp_bnn_adv.studies.paper_ablation import PaperAblationConfig
from tfp_bnn_adv.studies.quickstart import QuickstartConfig
from tfp_bnn_adv.studies.robustness_accuracy import RobustnessAccuracyConfig
from tfp_bnn_adv.studies.training import InferenceSettings

__all__ = ["ReproductionConfig", "preset_config", "run_reproduction",
           "fingerprint", "headline", "PRESETS", "PARTS", "DEFAULT_PARTS",
           "IMAGE_PARTS"]

PRESETS = ("quick", "cpu", "paper")
IMAGE_PARTS = ("fashion_mnist", "mnist")
PARTS = IMAGE_PARTS + ("half_moons",)
# MNIST has no offline source here: it runs only when asked for.
DEFAULT_PARTS = ("fashion_mnist", "half_moons")
# The study files whose Markdown tables findings.md repeats, per part.
_IMAGE_TABLES = (("Attack table", "attack_table/table.md"),
                 ("Paper ablation", "paper_ablation/table.md"),
                 ("Paper ablation: its posteriors",
                  "paper_ablation/posteriors.md"),
                 ("Gradient vs. posterior samples",
                  "gradient_study/gradients.md"),
                 ("Robustness vs. accuracy", "robustness_accuracy/sweep.md"))
_MOONS_TABLES = (("Gradient vs. width, training size and samples",
                  "gradients.md"),)
_UNCONVERGED = f"({common.UNCONVERGED})"


@dataclasses.dataclass(frozen=True)
class ReproductionConfig:
    """What the reproduction runs.

    Attributes:
      preset: the name of the scale (one of :data:`PRESETS`), recorded.
      images: ``data set -> QuickstartConfig``, one image part each (in
        this order); each config's ``dataset`` is its key.
      half_moons: the half-moons gradient study (``None``: skipped); its
        image part must be off (``image_dataset=None``).
      seed: the seed every part was built with (recorded).
      max_rhat: an HMC posterior is converged when its median function-space
        R-hat is at most this; every part must use the same.
    """
    preset: str
    images: Mapping[str, QuickstartConfig]
    half_moons: GradientStudyConfig | None
    seed: int = 0
    max_rhat: float = 1.1

    @property
    def parts(self) -> tuple:
        return tuple(self.images) + (
            ("half_moons",) if self.half_moons is not None else ())

    def validate(self) -> None:
        validate.choice(self.preset, PRESETS, "preset")
        common.check_max_rhat(self.max_rhat, "max_rhat")
        if not self.parts:
            raise ValueError("The reproduction has no part to run: images is "
                             "empty and half_moons is None.")
        for name, config in self.images.items():
            validate.choice(name, IMAGE_PARTS, "images key")
            if not isinstance(config, QuickstartConfig):
                raise TypeError(f"images[{name!r}] must be a QuickstartConfig"
                                f", got {type(config).__name__}.")
            if config.dataset != name:
                raise ValueError(f"images[{name!r}] has dataset="
                                 f"{config.dataset!r}.")
            config.validate()
        if self.half_moons is not None:
            if self.half_moons.image_dataset is not None:
                raise ValueError(
                    "half_moons must be a half-moons-only gradient study "
                    "(image_dataset=None), got image_dataset="
                    f"{self.half_moons.image_dataset!r}.")
            if not self.half_moons.moons_widths:
                raise ValueError("half_moons has an empty grid.")
            self.half_moons.validate()
        rhats = {c.max_rhat for c in self.images.values()}
        if self.half_moons is not None:
            rhats.add(self.half_moons.max_rhat)
        if rhats - {self.max_rhat}:
            raise ValueError(f"Every part must use max_rhat={self.max_rhat}, "
                             f"got {sorted(rhats)}.")


def _image_part(preset: str, dataset: str, *, seed: int, data_dir, data_source,
                max_rhat: float) -> QuickstartConfig:
    """One image part at ``preset``'s scale (see :func:`preset_config`)."""
    data = dict(data_dir=data_dir, data_source=data_source, max_rhat=max_rhat,
                allow_unconverged=True)
    attacks = quickstart_lib.TABLE_ATTACKS
    if preset == "quick":
        num_train, hidden = 300, (8,)
        hmc = InferenceSettings(method="hmc", num_chains=4,
                                num_burnin_steps=10, num_results=4, seed=seed)
        vi = InferenceSettings(method="vi", epochs=1, learning_rate=1e-2,
                               vi_samples=4, seed=seed)
        sgd = InferenceSettings(method="sgd", epochs=1, learning_rate=1e-3,
                                seed=seed)
        table = AttackTableConfig.quick(num_test=20, pgd_steps=2,
                                        apgd_steps=2, square_queries=5)
        grads = GradientStudyConfig.quick(sample_counts=(1, 2), num_test=20,
                                          figure1_images=10)
        sweep = RobustnessAccuracyConfig.quick(
            widths=(4,), training_lengths=(1,), hmc_lengths=(5,),
            num_train=num_train, num_test=20)
        ablation = PaperAblationConfig.quick(
            num_test=20, pgd_steps=2, max_samples=table.max_samples,
            switches=("attack_loss", "softmax_metric", "vi_training"))
    elif preset == "cpu":
        # 1000 points, 784-16-10: 4 chains x (1000 warm-up + 500 draws)
        # mixed in function space on the Xeon (results.json of the part has
        # the figures); twice the quickstart's data, 2.5x its draws.
        num_train, hidden = 1000, (16,)
        hmc = InferenceSettings(method="hmc", num_chains=4,
                                num_burnin_steps=1000, num_results=500,
                                seed=seed)
        # VI's loss plateaus (< 1% change over the last 40% of epochs) only
        # after a few hundred epochs of these 8 batches; 30 did not.
        vi = InferenceSettings(method="vi", epochs=300, learning_rate=1e-2,
                               vi_samples=200, seed=seed)
        sgd = InferenceSettings(method="sgd", epochs=30, learning_rate=1e-3,
                                seed=seed)
        table = AttackTableConfig(num_test=500, pgd_steps=40, apgd_steps=50,
                                  square_queries=500, max_samples=100,
                                  report_num_test=200)
        grads = GradientStudyConfig.quick(
            sample_counts=(1, 10, 100, 1000), num_test=500,
            figure1_images=100)
        # HMC in the sweep at the part's converged scale (500 points per
        # model would not give each of them mixing chains in hours).
        sweep = RobustnessAccuracyConfig.quick(
            methods=("sgd", "vi", "hmc"), widths=(16, 32), depths=(1,),
            training_lengths=(1, 3, 10), hmc_lengths=(300, 1000), seeds=(0,),
            num_train=num_train, num_test=500,
            hmc=InferenceSettings(method="hmc", num_chains=4,
                                  num_results=300))
        ablation = PaperAblationConfig.quick(
            num_test=500, pgd_steps=40, max_samples=table.max_samples,
            hmc_batch_size=200)
    else:
        num_train, hidden = None, (512, 512)
        hmc = InferenceSettings(method="hmc", num_chains=4,
                                num_burnin_steps=1000, num_results=250,
                                seed=seed)
        vi = InferenceSettings(method="vi", epochs=10, learning_rate=1e-3,
                               vi_samples=500, seed=seed)
        sgd = InferenceSettings(method="sgd", epochs=10, learning_rate=1e-3,
                                seed=seed)
        table = AttackTableConfig.paper(max_samples=500)
        grads = GradientStudyConfig.paper()
        sweep = RobustnessAccuracyConfig.paper()
        ablation = PaperAblationConfig.paper()
    table = dataclasses.replace(table, dataset=dataset, attacks=attacks,
                                report_labels=quickstart_lib.REPORT_LABELS,
                                seed=seed, **data)
    grads = dataclasses.replace(grads, moons_widths=(), moons_train_sizes=(),
                                image_dataset=dataset, seed=seed, **data)
    sweep = dataclasses.replace(sweep, dataset=dataset, **data)
    ablation = dataclasses.replace(
        ablation, dataset=dataset, num_train=num_train, hidden=hidden,
        hmc=hmc, vi=vi, seed=seed, **data)
    return QuickstartConfig(
        num_train=num_train, hidden=hidden,
        settings={"hmc": hmc, "vi": vi, "sgd": sgd}, table=table,
        grads=grads, sweep=sweep, ablation=ablation, dataset=dataset,
        seed=seed, **data)


def _moons_part(preset: str, *, seed: int, max_rhat: float
                ) -> GradientStudyConfig:
    """The half-moons gradient study at ``preset``'s scale."""
    common_fields = dict(image_dataset=None, seed=seed, max_rhat=max_rhat,
                         allow_unconverged=True)
    if preset == "quick":
        return GradientStudyConfig.quick(
            moons_widths=(4,), moons_train_sizes=(60,), sample_counts=(1, 2),
            num_test=20, moons_hmc=InferenceSettings(
                method="hmc", num_chains=4, num_burnin_steps=10,
                num_results=4),
            moons_sgd=InferenceSettings(method="sgd", epochs=1,
                                        batch_size=32, learning_rate=1e-2),
            **common_fields)
    if preset == "cpu":
        # 4 chains x (500 + 250) mix at every cell (function R-hat <= 1.01).
        # A cell's cost grows with width x points: width 512 on 500 points
        # took 11.5 minutes on one core of the EPYC, so 10000 points would
        # take hours per cell; the paper's sizes are --preset=paper's.
        return GradientStudyConfig(
            moons_widths=(16, 64, 256, 512),
            moons_train_sizes=(500, 2000),
            moons_hmc=InferenceSettings(method="hmc", num_chains=4,
                                        num_burnin_steps=500,
                                        num_results=250),
            sample_counts=(1, 10, 100, 1000), num_test=1000,
            **common_fields)
    return GradientStudyConfig.paper(
        moons_widths=(16, 32, 128, 256, 512),
        moons_train_sizes=(1000, 5000, 10000, 15000), **common_fields)


def preset_config(preset: str, *, parts=DEFAULT_PARTS, data_dir=None,
                  data_source: str = "auto", seed: int = 0,
                  max_rhat: float = 1.1) -> ReproductionConfig:
    """The reproduction at one of :data:`PRESETS`.

    Args:
      preset: ``"quick"`` (a smoke run of every study, in minutes),
        ``"cpu"`` (hours on 2 CPU cores) or ``"paper"`` (the paper's sizes:
        all of the training data, 784-512-512-10, the full sweep).
      parts: a subset of :data:`PARTS`, run in :data:`PARTS` order.
      data_dir: a directory of the four IDX ``.gz`` files.  It is MNIST's
        when ``"mnist"`` is a part (Fashion-MNIST then comes from its
        offline default, Debian's package or TFDS), else Fashion-MNIST's.
      data_source: ``"auto"``, ``"idx"`` or ``"tfds"``.
      seed: the seed of every part.
      max_rhat: the convergence threshold of every HMC posterior.

    Raises:
      ValueError: for an unknown preset or part.
    """
    validate.choice(preset, PRESETS, "preset")
    if isinstance(parts, str):
        raise TypeError(f"parts must be a sequence of names, got {parts!r}.")
    parts = tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got "
                         f"{parts!r}.")
    images = {}
    for name in IMAGE_PARTS:
        if name in parts:
            own_dir = data_dir if (name == "mnist" or "mnist" not in parts
                                   ) else None
            images[name] = _image_part(preset, name, seed=seed,
                                       data_dir=own_dir,
                                       data_source=data_source,
                                       max_rhat=max_rhat)
    moons = (_moons_part(preset, seed=seed, max_rhat=max_rhat)
             if "half_moons" in parts else None)
    config = ReproductionConfig(preset=preset, images=images,
                                half_moons=moons, seed=seed,
                                max_rhat=max_rhat)
    config.validate()
    return config


def _part_fingerprints(config: ReproductionConfig) -> dict[str, dict]:
    out = {name: quickstart_lib.fingerprint(c)
           for name, c in config.images.items()}
    if config.half_moons is not None:
        out["half_moons"] = grad_fingerprint(config.half_moons)
    return out


def fingerprint(config: ReproductionConfig) -> dict[str, Any]:
    """The reproduction's :func:`~tfp_bnn_adv.studies.common.fingerprint`.

    Fields: the preset's name, ``seed`` and ``max_rhat``.  Each part is
    fingerprinted on its own (the quickstart pipeline's fingerprint for an
    image part, the gradient study's for half-moons) and checked against
    its directory by :func:`run_reproduction`, so adding a part, or
    changing one part's settings, keeps the others' finished work.
    """
    return common.fingerprint("reproduction", {
        "preset": config.preset, "seed": config.seed,
        "max_rhat": config.max_rhat})


def _check_parts(config: ReproductionConfig, output_dir: str,
                 part_fps: Mapping[str, dict], overwrite: bool) -> None:
    """Refuses, before any work, a part directory of other settings."""
    if overwrite:
        return
    for part in config.parts:
        part_dir = _part_dir(output_dir, part)
        try:
            common.check_fingerprint(part_dir, part_fps[part])
        except common.ConfigMismatchError as e:
            raise common.ConfigMismatchError(
                f"Part {part!r}: {e} To rerun this part alone, delete "
                f"{part_dir!r}; the other parts are kept.") from e


def _part_dir(output_dir: str, part: str) -> str:
    if part == "half_moons":
        return os.path.join(output_dir, "half_moons", "gradient_study")
    return os.path.join(output_dir, part)


def _finished(out: common.StudyOutput, part: str, part_fp: Mapping,
              part_dir: str) -> dict | None:
    """The saved results of ``part`` if it finished with these settings."""
    status = out.results.get("parts", {}).get(part, {})
    path = os.path.join(part_dir, "results.json")
    if not status.get("complete") or not os.path.exists(path):
        return None
    try:
        saved = files.read_json(path)
    except ValueError:
        return None
    if saved.get(common.FINGERPRINT_KEY) != dict(part_fp):
        return None
    return dict(saved)


def _strip_unconverged(markdown: str) -> tuple[str, list]:
    """``markdown`` without the table rows of unconverged posteriors.

    Returns:
      ``(text, dropped)``: the text, and the first cell of every row left
      out.
    """
    kept, dropped = [], []
    for line in markdown.splitlines():
        if line.startswith("|") and _UNCONVERGED in line:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            marked = [i for i, c in enumerate(cells) if _UNCONVERGED in c]
            dropped.append(" / ".join(cells[:max(marked[0] + 1, 4)
                                            if marked[0] else 1]))
            continue
        kept.append(line)
    return "\n".join(kept), dropped


def headline(output_dir: str, parts) -> str:
    """``findings.md``: the studies' tables without unconverged posteriors.

    Every table is the study's own Markdown file (cited by its path) with
    the rows of unconverged HMC posteriors left out and named beneath it;
    each kept posterior row carries its diagnostics in the study's table.
    Parts not yet finished are listed as such.
    """
    sections = ["# Findings: the headline tables\n",
                "Each table below is a study's own file, cited by its path "
                "relative to this directory, with the rows of **unconverged "
                "HMC posteriors left out** (they are named under the table, "
                "and kept, marked (UNCONVERGED), in the file itself).  The "
                "convergence diagnostics are beside every posterior in the "
                "files; `results.json` of each part has them all.  The "
                "paper ablation's rows with `hmc_training` on score the "
                "authors' HMC, emulated on purpose (one chain restarted per "
                "batch, conditioned on the last batch): it has no R-hat and "
                "is unconverged by construction, as its posteriors table "
                "says.\n"]
    for part in parts:
        rel_dir = os.path.relpath(_part_dir(output_dir, part), output_dir)
        tables = _MOONS_TABLES if part == "half_moons" else _IMAGE_TABLES
        sections.append(f"## {part}\n")
        for title, rel in tables:
            path = os.path.join(_part_dir(output_dir, part), rel)
            cite = os.path.join(rel_dir, rel)
            if not os.path.exists(path):
                sections.append(f"### {title}\n\nNot run yet (`{cite}`).\n")
                continue
            with open(path, encoding="utf-8") as f:
                text, dropped = _strip_unconverged(f.read())
            sections.append(f"### {title} (`{cite}`)\n\n{text.strip()}\n")
            if dropped:
                sections.append(
                    "Left out, unconverged: "
                    + ", ".join(f"`{d}`" for d in dict.fromkeys(dropped))
                    + ".\n")
    return "\n".join(sections)


def run_reproduction(config: ReproductionConfig, output_dir: str, *,
                     overwrite: bool = False) -> dict[str, Any]:
    """Runs every part of ``config``, resumably; writes the headline.

    Args:
      config: a :class:`ReproductionConfig` (see :func:`preset_config`).
      output_dir: receives ``results.json`` (the fingerprint, each part's
        status, minutes and unconverged posteriors), ``findings.md`` (the
        headline tables, converged posteriors only), ``summary.md`` and one
        directory per part: ``<data set>/`` (the quickstart pipeline's
        files: ``summary.md``, ``attack_table/``, ``gradient_study/``,
        ``robustness_accuracy/``, ``paper_ablation/``, posteriors and
        checkpoints) and ``half_moons/gradient_study/``.
      overwrite: delete an earlier reproduction in ``output_dir`` (of any
        configuration) and start afresh.

    Returns:
      ``parts`` (``part -> {"complete", "minutes", "unconverged", "dir"}``),
      ``unconverged`` (``"<part>: <posterior>"``), ``findings`` (the text
      of ``findings.md``) and ``results`` (``part ->`` its results dict).

    Raises:
      ValueError: for a bad configuration.
      ConfigMismatchError: when ``output_dir`` holds a reproduction of
        another preset, seed or ``max_rhat``, or a part's directory holds
        that part run with other settings (the message names the part and
        the fields), unless ``overwrite``; before anything is fitted.
    """
    config.validate()
    part_fps = _part_fingerprints(config)
    _check_parts(config, output_dir, part_fps, overwrite)
    out = common.StudyOutput(
        output_dir, "reproduction", fingerprint=fingerprint(config),
        overwrite=overwrite,
        owned=tuple(config.images) + ("half_moons", "findings.md",
                                      "summary.md"))
    status: dict[str, dict] = dict(out.results.get("parts", {}))
    results: dict[str, dict] = {}
    progress = common.Progress("reproduction", len(config.parts))
    for part in config.parts:
        part_dir = _part_dir(output_dir, part)
        saved = _finished(out, part, part_fps[part], part_dir)
        if saved is not None:
            logging.info("[reproduction] %s: finished earlier, kept (%s)",
                         part, part_dir)
            results[part] = saved
            progress.step(f"{part} (kept)")
            continue
        logging.info("[reproduction] %s: running in %s", part, part_dir)
        start = time.perf_counter()
        if part == "half_moons":
            res = run_gradient_study(config.half_moons, part_dir)
            unconverged = list(res["unconverged"])
        else:
            # The part directory may hold a crashed run of this part: the
            # pipeline resumes it (HMC from its checkpoints, the sweep from
            # its finished runs).
            res = quickstart_lib.run_quickstart(
                config.images[part], part_dir,
                title=f"tfp_bnn_adv reproduction, {part} ({config.preset})")
            unconverged = list(res["unconverged"])
            res = {k: v for k, v in res.items() if k == "unconverged"}
        minutes = (time.perf_counter() - start) / 60
        status[part] = {"complete": True, "minutes": round(minutes, 2),
                        "unconverged": unconverged,
                        "dir": os.path.relpath(part_dir, output_dir)}
        out.update({"parts": status})
        results[part] = res
        progress.step(part)
        # After every part, so an interrupted run's finished parts are
        # already summarised.
        _summarise(out, config, status)
    findings, unconverged = _summarise(out, config, status)
    return {"parts": status, "unconverged": unconverged,
            "findings": findings, "results": results}


def _summarise(out: common.StudyOutput, config: ReproductionConfig,
               status: Mapping[str, dict]) -> tuple[str, list]:
    """Writes ``findings.md``, ``summary.md`` and the status of each part.

    Returns:
      ``(findings, unconverged)``: the text of ``findings.md`` and
      ``"<part>: <posterior>"`` of every unconverged HMC posterior of the
      finished parts.
    """
    done = [p for p in config.parts if p in status]
    unconverged = [f"{p}: {u}" for p in done for u in status[p]["unconverged"]]
    findings = headline(out.dir, config.parts)
    files.write_text(out.path("findings.md"), findings)
    lines = [f"# tfp_bnn_adv reproduction (preset {config.preset})\n",
             "| part | directory | minutes | unconverged HMC posteriors |",
             "|---|---|---|---|"]
    for p in config.parts:
        if p not in status:
            lines.append(f"| {p} | | not finished | |")
            continue
        s = status[p]
        lines.append(f"| {p} | `{s['dir']}/` | {s['minutes']:.1f} | "
                     f"{', '.join(s['unconverged']) or 'none'} |")
    lines.append("\nThe headline tables are in `findings.md`; each part's "
                 "`summary.md` and study files hold every row and figure.")
    files.write_text(out.path("summary.md"), "\n".join(lines) + "\n")
    out.update({"parts": dict(status), "unconverged": unconverged,
                "preset": config.preset})
    return findings, unconverged
