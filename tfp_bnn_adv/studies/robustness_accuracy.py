"""Experiment 3 of Carbone et al. (2020): robustness against accuracy.

A sweep over many networks (widths, depths, training lengths, seeds) and
inference methods (SGD, HMC, VI).  Each model gets its test accuracy and its
*softmax robustness* ``1 - (1/N) sum_j ||p(x_j) - p(x~_j)||_inf`` under an
attack (FGSM with the expected gradient by default) at one or more ``eps``
(the paper: 0.25 for BNNs; 0.25, 0.025 and 0.0025 for SGD networks).  The
paper finds HMC BNNs grow more robust as they grow larger and more accurate,
while SGD networks show the reverse trend.

The sweep resumes: each finished model's result is written atomically to
``runs/<run id>.json`` and skipped when the sweep runs again, so an
interrupted sweep of hundreds of models loses at most the one in flight.
What a run's result depends on besides its own axes (data, attack, radii,
the methods' base settings: :func:`fingerprint`) is stored in
``results.json`` and in every run file; a rerun with other such settings is
refused, naming what differs, unless ``overwrite`` deletes the earlier
sweep.  The axes themselves (methods, widths, depths, training lengths,
seeds) may change between runs: each run's id names its axes, so finished
runs are reused, and the summary and ``results.json`` hold exactly the runs
of the current sweep.

Each run keeps its posterior's diagnostics (HMC: function-space R-hat/ESS on
the held-out test points; VI: the loss trace and its plateau).  The summary
table and figures are refused while any HMC run is unconverged, unless
``allow_unconverged`` is set, and then those runs are marked
``(UNCONVERGED)``; the runs stay saved, so the same command with
``--allow_unconverged`` only summarises.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import Any

from absl import logging
import numpy as np

from tfp_bnn_adv import data as data_lib
from tfp_bnn_adv import files
from tfp_bnn_adv import metrics
from tfp_bnn_adv import validate
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies.training import InferenceSettings
from tfp_bnn_adv.studies.training import fit_posterior

__all__ = ["RobustnessAccuracyConfig", "run_robustness_accuracy", "run_ids",
           "fingerprint"]

_ATTACKS = ("fgsm", "pgd")
# Everything the sweep writes besides results.json, figures/, tensorboard/.
_OWNED = ("runs", "sweep.csv", "sweep.md")
# The first component of every per-run key of results.json.
_RUN_KEY = re.compile(r"^(?:sgd|hmc|vi|ensemble)-d\d+-w\d+-L\d+-s\d+/")


@dataclasses.dataclass(frozen=True)
class RobustnessAccuracyConfig:
    """What the sweep trains and attacks.

    Attributes:
      dataset: ``"mnist"``, ``"fashion_mnist"`` or ``"half_moons"``.
      methods: subset of ``("sgd", "hmc", "vi", "ensemble")``.
      widths: hidden widths (every hidden layer of a model has the same).
      depths: numbers of hidden layers.
      training_lengths: epochs of SGD/VI training.
      hmc_lengths: burn-in iterations of HMC (its "training length").
      seeds: one model per seed and setting; every seed's model is fitted
        and attacked with that seed, on the same data
        (:func:`~tfp_bnn_adv.studies.common.study_seeds` with ``sweep``).
      eps: ``method -> tuple of eps``; methods not listed use ``eps_default``.
      eps_default: radii for methods without their own entry.
      attack: ``"fgsm"`` or ``"pgd"``; gradient: ``"expected"`` or
        ``"predictive"``.
      num_train, num_test: data subset sizes (``None``: all).
      hmc, vi, sgd: base settings of each method.
      keras_model: optional ``.keras`` model file used instead of the MLPs
        (then ``widths``/``depths`` are ignored).
      data_dir, data_source, half_moons_n: data location.
      max_rhat: an HMC posterior is converged when its median function-space
        R-hat is at most this (``>= 1``).
      allow_unconverged: write the summary even with unconverged HMC runs
        (marked ``(UNCONVERGED)``).
    """
    dataset: str = "mnist"
    methods: tuple = ("sgd", "hmc", "vi")
    widths: tuple = (16, 32, 64, 128, 256, 512, 1024, 2048)
    depths: tuple = (1, 2)
    training_lengths: tuple = (1, 2, 3, 4, 5, 7, 10)
    hmc_lengths: tuple = (50, 100, 150, 200, 250, 350, 500)
    seeds: tuple = (0, 1, 2)
    eps: tuple = (("sgd", (0.25, 0.025, 0.0025)),)
    eps_default: tuple = (0.25,)
    attack: str = "fgsm"
    gradient: str = "expected"
    num_train: int | None = None
    num_test: int | None = 1000
    hmc: InferenceSettings = InferenceSettings(
        method="hmc", num_chains=4, num_results=200)
    vi: InferenceSettings = InferenceSettings(method="vi", learning_rate=1e-3,
                                              vi_samples=100)
    sgd: InferenceSettings = InferenceSettings(method="sgd", learning_rate=1e-3)
    keras_model: str | None = None
    data_dir: str | None = None
    data_source: str = "auto"
    half_moons_n: int = 2000
    max_rhat: float = 1.1
    allow_unconverged: bool = False

    @classmethod
    def paper(cls, **overrides) -> "RobustnessAccuracyConfig":
        """About a thousand models (8 widths x 2 depths x 7 lengths x 3 seeds
        x 3 methods) on MNIST: days on a CPU, hours on accelerators."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def quick(cls, **overrides) -> "RobustnessAccuracyConfig":
        """Small SGD and VI models on a Fashion-MNIST subset.

        HMC is left out: each model of the sweep needs its own converged
        chains, which a 2-core budget of minutes cannot give (one converged
        500-point posterior takes about 4 minutes); run it with
        ``methods=("sgd", "hmc", "vi")`` and the HMC settings you checked.
        """
        base = cls(
            dataset="fashion_mnist", methods=("sgd", "vi"), widths=(32, 128),
            depths=(1,),
            training_lengths=(1, 3), hmc_lengths=(700,), seeds=(0,),
            num_train=5000, num_test=300,
            hmc=InferenceSettings(method="hmc", num_chains=4, num_results=300),
            vi=InferenceSettings(method="vi", learning_rate=1e-2,
                                 vi_samples=50))
        return dataclasses.replace(base, **overrides)

    def eps_for(self, method: str) -> tuple:
        return dict(self.eps).get(method, self.eps_default)

    def validate(self) -> None:
        common.check_max_rhat(self.max_rhat, "max_rhat")
        bad = [m for m in self.methods if m not in ("sgd", "hmc", "vi", "ensemble")]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of sgd, hmc, "
                             f"vi, ensemble; got {self.methods!r}.")
        validate.choice(self.attack, _ATTACKS, "attack")
        validate.choice(self.gradient, ("expected", "predictive"), "gradient")
        for name in ("widths", "depths", "training_lengths", "hmc_lengths"):
            common.check_field(validate.int_sequence, getattr(self, name), name)
        for name in ("num_train", "num_test"):
            common.check_field(validate.optional_positive_int,
                               getattr(self, name), name)
        validate.choice(self.dataset, data_lib.DATASET_NAMES, "dataset")
        if self.keras_model is not None and not os.path.exists(self.keras_model):
            raise ValueError(f"keras_model file {self.keras_model!r} not found.")


def fingerprint(config: RobustnessAccuracyConfig) -> dict[str, Any]:
    """The sweep's :func:`~tfp_bnn_adv.studies.common.fingerprint`.

    Fields: what every run's result depends on besides the run's own axes:
    the data set (name, directory and source, or half-moons size),
    ``num_train``, ``num_test``, ``eps``, ``eps_default``, ``attack``,
    ``gradient``, the SHA-256 of ``keras_model`` and the base settings
    ``hmc``, ``vi`` and ``sgd`` (without the fields each run sets: ``seed``,
    HMC's ``num_burnin_steps``, VI's and SGD's ``epochs``).  Not in it: the
    axes (``methods``, ``widths``, ``depths``, ``training_lengths``,
    ``hmc_lengths``, ``seeds``), which the run ids name, and ``max_rhat``
    and ``allow_unconverged``: the summary re-judges every run from its
    saved diagnostics.

    Raises:
      FileNotFoundError: for a ``keras_model`` that does not exist.
    """
    fields = dict(
        common.data_fields(config.dataset, config.data_dir, config.data_source,
                           config.half_moons_n),
        num_train=config.num_train, num_test=config.num_test,
        eps=[[m, list(radii)] for m, radii in config.eps],
        eps_default=list(config.eps_default), attack=config.attack,
        gradient=config.gradient,
        hmc=common.settings_fields(config.hmc.replace(method="hmc"), (
            "method", "seed", "num_burnin_steps")),
        vi=common.settings_fields(config.vi.replace(method="vi"), (
            "method", "seed", "epochs")),
        # The deep ensemble's base is SGD's, with its member count.
        sgd=common.settings_fields(config.sgd.replace(method="ensemble"), (
            "method", "seed", "epochs")))
    inputs = {}
    if config.keras_model:
        fields["keras_model"] = common.file_sha256(config.keras_model)
        inputs["keras_model"] = os.path.abspath(config.keras_model)
    return common.fingerprint("robustness_accuracy", fields, inputs)


@dataclasses.dataclass(frozen=True)
class _SweepRun:
    """One model of the sweep: its axes, and the id of its run file."""
    method: str
    depth: int
    width: int
    length: int
    seed: int

    @property
    def run_id(self) -> str:
        return (f"{self.method}-d{self.depth}-w{self.width}-L{self.length}-"
                f"s{self.seed}")


def _runs(config: RobustnessAccuracyConfig) -> list[_SweepRun]:
    runs = []
    for method in config.methods:
        lengths = config.hmc_lengths if method == "hmc" else config.training_lengths
        depths = (0,) if config.keras_model else config.depths
        widths = (0,) if config.keras_model else config.widths
        for depth, width, length, seed in itertools.product(
                depths, widths, lengths, config.seeds):
            runs.append(_SweepRun(method, depth, width, length, seed))
    return runs


def run_ids(config: RobustnessAccuracyConfig) -> list[str]:
    """The run ids of the sweep, in the order they run."""
    return [r.run_id for r in _runs(config)]


def _settings(config, run: _SweepRun) -> InferenceSettings:
    base = {"hmc": config.hmc, "vi": config.vi}.get(run.method, config.sgd)
    base = base.replace(method=run.method,
                        seed=common.study_seeds(run.seed, sweep=True).model)
    if run.method == "hmc":
        return base.replace(num_burnin_steps=run.length)
    return base.replace(epochs=run.length)


def _one_run(config, ds, run: _SweepRun, x, y, out) -> dict[str, Any]:
    model = common.load_model(ds.input_shape, ds.num_classes,
                              hidden=(run.width,) * run.depth,
                              keras_model=config.keras_model)
    ens, info = fit_posterior(model, ds.train_x, ds.train_y,
                              _settings(config, run), probe_x=x, probe_y=y,
                              max_rhat=config.max_rhat)
    report = common.record_posterior(out, run.run_id, ens, config.max_rhat)
    p_clean = ens.predict_proba(x)
    result = {"run_id": run.run_id, **dataclasses.asdict(run),
              "num_params": ens.network.num_params,
              "neurons": run.width * run.depth,
              "num_samples": ens.num_samples,
              "test_accuracy": metrics.clean_accuracy(p_clean, y),
              "fit_seconds": info["wall_seconds"],
              "diagnostics": report["diagnostics"],
              "converged": report["converged"], "robustness": {}}
    attack_seed = common.study_seeds(run.seed, sweep=True).attack
    for eps in config.eps_for(run.method):
        # PGD with its own defaults (40 steps, 1 restart).
        x_adv = common.run_attack(ens, x, y, config.attack, eps,
                                  seed=attack_seed, gradient=config.gradient)
        p_adv = ens.predict_proba(x_adv)
        result["robustness"][f"{eps:g}"] = {
            "softmax_robustness": metrics.softmax_robustness(p_clean, p_adv),
            "adv_robustness": metrics.adversarial_robustness(p_clean, p_adv),
            "adv_accuracy": metrics.adversarial_accuracy(p_adv, y)}
    return result


def run_robustness_accuracy(config: RobustnessAccuracyConfig, output_dir: str,
                            *, overwrite: bool = False) -> dict[str, Any]:
    """Runs (or resumes) the sweep; writes per-run JSON, a CSV and figures.

    Args:
      config: a :class:`RobustnessAccuracyConfig`.
      output_dir: receives ``runs/<id>.json`` (one per model, the resume
        state), ``results.json``, ``sweep.csv`` / ``.md`` and ``figures/``.
      overwrite: delete an earlier sweep in ``output_dir`` (its runs too, of
        any configuration) and start afresh.

    Returns:
      Results: per run ``<run id>/test/accuracy``,
      ``<run id>/test/softmax_robustness/<attack>/<gradient>/eps=<eps>``,
      ``<run id>/diagnostics`` and ``<run id>/convergence/...`` (HMC and VI;
      see :func:`~tfp_bnn_adv.studies.common.convergence_results`), counts
      of models run and skipped, ``unconverged`` (run ids) and figure paths.

    Raises:
      ValueError: for a bad configuration.
      ConfigMismatchError: when ``output_dir`` holds a sweep of other
        settings (see :func:`fingerprint`), or a run file of other settings,
        unless ``overwrite``; before anything is fitted.
      UnconvergedPosteriorError: when an HMC run is unconverged and
        ``config.allow_unconverged`` is not set; every run and
        ``results.json`` are saved first.
    """
    config.validate()
    fp = fingerprint(config)
    out = common.StudyOutput(output_dir, "robustness_accuracy", fingerprint=fp,
                             overwrite=overwrite, owned=_OWNED)
    runs_dir = out.path("runs")
    os.makedirs(runs_dir, exist_ok=True)
    runs = _runs(config)
    done = {}
    for run in runs:
        path = os.path.join(runs_dir, f"{run.run_id}.json")
        if not os.path.exists(path):
            continue
        done[run.run_id] = files.read_json(path)
        if not isinstance(done[run.run_id], dict) or (
                done[run.run_id].get("fingerprint") != fp["sha256"]):
            raise common.ConfigMismatchError(
                f"{path!r} was written by another configuration of the sweep "
                "(or an earlier version of tfp_bnn_adv) than the one "
                f"{out.path('results.json')!r} records; refusing to mix "
                "them. Delete it, or pass --overwrite (overwrite=True) to "
                "start the sweep afresh.")
    # Runs of an earlier sweep's axes stay in runs/ (to be reused if those
    # axes come back) but leave results.json, which shows this sweep only.
    current = {f"{r.run_id}/" for r in runs}
    out.drop([k for k in out.results
              if (m := _RUN_KEY.match(k)) and m.group(0) not in current])
    todo = [r for r in runs if r.run_id not in done]
    logging.info("Robustness-accuracy sweep: %d models, %d already done.",
                 len(runs), len(runs) - len(todo))
    if todo:
        ds = common.load_data(config.dataset, data_dir=config.data_dir,
                              data_source=config.data_source,
                              half_moons_n=config.half_moons_n,
                              seed=common.SWEEP_DATA_SEED)
        if config.num_train is not None and config.num_train < len(ds.train_x):
            ds = ds.subset(num_train=config.num_train,
                           seed=common.SWEEP_DATA_SEED)
        x, y = ds.test_x[:config.num_test], ds.test_y[:config.num_test]
        progress = common.Progress("robustness_accuracy", len(todo))
        for run in todo:
            result = _one_run(config, ds, run, x, y, out)
            result["fingerprint"] = fp["sha256"]
            files.write_json(os.path.join(runs_dir, f"{run.run_id}.json"), result)
            done[run.run_id] = result
            label = common.mark(run.run_id, result["converged"] is False)
            progress.step(f"{label}: accuracy {result['test_accuracy']:.3f}"
                          f", robustness " + ", ".join(
                              f"{e}: {v['softmax_robustness']:.3f}"
                              for e, v in result["robustness"].items()))
    return _summarise(config, out, [done[r.run_id] for r in runs],
                      len(runs) - len(todo))


def _summarise(config, out, done, num_skipped):
    tag = f"{config.attack}/{config.gradient}"
    results: dict[str, Any] = {"num_models": len(done),
                               "num_skipped": num_skipped}
    rows = []
    reports = {}
    for d in done:
        # Re-judged from the saved diagnostics: max_rhat may have changed
        # since the run.
        report = common.convergence_report(
            {"method": d["method"], "diagnostics": d.get("diagnostics")},
            config.max_rhat)
        reports[d["run_id"]] = report
        results.update(common.convergence_results(d["run_id"], report))
        results[f"{d['run_id']}/test/accuracy"] = d["test_accuracy"]
        for eps, v in d["robustness"].items():
            results[f"{d['run_id']}/test/softmax_robustness/{tag}/eps={eps}"] = (
                v["softmax_robustness"])
            rows.append([d["run_id"], common.mark(d["method"], report),
                         d["depth"], d["width"], d["length"], d["seed"],
                         d["num_params"], d["test_accuracy"], eps,
                         v["softmax_robustness"], v["adv_robustness"],
                         v["adv_accuracy"]] + common.convergence_columns(report))
    out.update(results)
    unconverged = common.require_converged(
        reports, allow_unconverged=config.allow_unconverged,
        what="the robustness-accuracy summary and figures",
        saved_to=out.path("results.json"))
    note = common.CONVERGENCE_NOTE
    if unconverged:
        note += ("\n\n**Warning:** written with unconverged HMC runs "
                 f"({', '.join(unconverged)}; allow_unconverged): they are "
                 "marked (UNCONVERGED).")
    out.table("sweep", ["run_id", "method", "depth", "width", "length", "seed",
                        "num_params", "test_accuracy", "eps",
                        "softmax_robustness", "adv_robustness",
                        "adv_accuracy"] + list(common.CONVERGENCE_HEADER), rows,
              note=note)
    results["figures"] = _plots(out, done, config, reports)
    results["unconverged"] = unconverged
    out.update({"figures": results["figures"], "unconverged": unconverged})
    return results


def _plots(out, done, config, reports):
    plt = common.pyplot()
    groups: dict[str, list] = {}
    for d in done:
        method = common.mark(d["method"], reports[d["run_id"]])
        for eps, v in d["robustness"].items():
            groups.setdefault(f"{method} eps={eps}", []).append(
                (d["test_accuracy"], v["softmax_robustness"], d["width"],
                 d["neurons"]))
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, pts in sorted(groups.items()):
        pts = np.array(pts, dtype=float)
        ax.scatter(pts[:, 0], pts[:, 1], s=14, alpha=0.7, label=label)
    ax.set_xlabel("test accuracy")
    ax.set_ylabel("softmax robustness (1 - mean max |p - p_adv|)")
    ax.set_title(f"Robustness vs. accuracy ({config.attack}, "
                 f"{config.gradient} gradient)")
    ax.legend(fontsize=7)
    figures = [out.save_figure(fig, "robustness_vs_accuracy")]
    for axis, col, stem in (("hidden width", 2, "robustness_vs_width"),
                            ("neurons (width x depth)", 3,
                             "robustness_vs_neurons")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in sorted(groups.items()):
            pts = np.array(pts, dtype=float)
            xs = np.unique(pts[:, col])
            means = [pts[pts[:, col] == v, 1].mean() for v in xs]
            ax.plot(xs, means, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis)
        ax.set_ylabel("mean softmax robustness")
        ax.legend(fontsize=7)
        figures.append(out.save_figure(fig, stem))
    return figures
