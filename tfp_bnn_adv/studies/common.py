"""What every study shares: its output directory, progress, figures, gates.

Studies name, build and seed things one way: :func:`run_attack` runs any of
:data:`ATTACKS` by name, :func:`load_model` builds the model a study fits (a
``.keras`` file or a built-in MLP/CNN), :func:`load_data` loads any data set
through :func:`tfp_bnn_adv.data.load_dataset` (half-moons included), and
:func:`study_seeds` is the one rule deriving a study's data, model and attack
seeds from its seed.

One results writer (:class:`StudyOutput`) owns a study's ``output_dir``:
``results.json`` (flat keys like ``test/adv_robustness/pgd/expected``),
tables as CSV and Markdown, ``figures/*.png``, TensorBoard scalars under
``tensorboard/``.  Every file is written atomically, and ``results.json`` is
rewritten after each finished stage, so an interrupted study keeps what it
computed.

Every study reports convergence with the same code:
:func:`convergence_report` reads a posterior's evidence from its ensemble
metadata (HMC: function-space R-hat/ESS, acceptance, divergences; VI: the
loss trace and whether it plateaued); :func:`record_posterior` writes it to
``results.json`` (``<label>/diagnostics``, ``<label>/convergence/...``),
draws the HMC trace and rank plot (``figures/traces_<label>.png``) and logs
it; :func:`mark` labels an unconverged HMC posterior ``(UNCONVERGED)`` in
tables and legends; :data:`CONVERGENCE_HEADER` and
:func:`convergence_columns` are the table columns; and
:func:`require_converged` refuses a study's headline that rests on an
unconverged HMC posterior unless ``allow_unconverged`` is set.

Results never mix configurations: a study passes :class:`StudyOutput` the
:func:`fingerprint` of what determines its results (its config, and the
SHA-256 of its input files and in-memory ensembles).  The first run stores it
in ``results.json``; a later run in the same directory resumes only when its
fingerprint is the same, and otherwise stops with a
:class:`ConfigMismatchError` naming every differing field with its old and
new value, before anything is computed or written.  ``overwrite=True``
(``--overwrite``) deletes the earlier run's files instead and starts afresh.
What goes into a fingerprint: every setting that changes a number, a key or
a file of the results (data set and where it is read from, subset sizes,
architecture, inference settings and seeds, attacks and radii, ``max_rhat``
where the stored verdicts depend on it), and the content of the inputs (the
SHA-256 of posterior and ``.keras`` files, so a retrained posterior under the
same path counts as a change, and a moved one does not; their paths are
recorded beside, not compared).  Left out: what only decides *whether* a
headline is written (``allow_unconverged``), where results go
(``output_dir``), logging, and how the computation is placed
(``--strategy``, ``--tpu``, ``--logical_cpus``, ``--jit``,
``hmc_parallelism``), which changes results by float rounding only.  Data
sets are identified by name, location and source, not by content: hashing
them would cost seconds on every run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import time
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tfp_bnn_adv import attacks
from tfp_bnn_adv import data as data_lib
from tfp_bnn_adv import files
from tfp_bnn_adv import models
from tfp_bnn_adv import validate
from tfp_bnn_adv.inference import hmc

__all__ = ["StudyOutput", "Progress", "markdown_table",
           "ATTACKS", "GRADIENT_ATTACKS", "run_attack", "limit_samples",
           "load_model",
           "load_data", "Seeds", "SWEEP_DATA_SEED", "study_seeds",
           "check_field", "slug",
           "UNCONVERGED", "CONVERGENCE_HEADER", "CONVERGENCE_NOTE",
           "UnconvergedPosteriorError", "check_max_rhat", "convergence_report",
           "is_unconverged", "mark", "describe", "convergence_columns",
           "convergence_results", "trace_figure", "record_posterior",
           "require_converged", "ConfigMismatchError", "fingerprint",
           "check_fingerprint", "file_sha256", "ensemble_sha256",
           "settings_fields", "data_fields", "check_directory",
           "fingerprint_diff"]

UNCONVERGED = "UNCONVERGED"
CONVERGENCE_HEADER = ("R-hat median", "R-hat < 1.1", "ESS min", "acceptance",
                      "divergent", "ELBO plateaued")
CONVERGENCE_NOTE = (
    "R-hat median: for HMC, the median over the probe points (held-out test "
    "points where the study has them) of the rank-normalised split R-hat of "
    "the predictive probability across chains; R-hat < 1.1: the fraction of "
    "probe points below 1.1; ESS min: their smallest bulk effective sample "
    "size; acceptance: mean Metropolis acceptance; divergent: divergent "
    "transitions after warm-up. An HMC posterior whose R-hat median exceeds "
    "max_rhat, or is unknown, is marked (UNCONVERGED). ELBO plateaued: VI's "
    "loss (negative ELBO per training point) changed by less than 1% between "
    "the mean of the last 20% of epochs and that of the 20% before.")
_HMC_RESULT_KEYS = ("function_rhat_median", "function_rhat_frac_below",
                    "function_ess_min", "acceptance", "num_divergent",
                    "converged", "max_rhat")
_VI_RESULT_KEYS = ("elbo_plateaued", "elbo_relative_change")
FINGERPRINT_KEY = "fingerprint"
FINGERPRINT_VERSION = 1
# What every study writes into its output directory; --overwrite deletes
# these, and the names a study adds (its tables, runs, checkpoints).
_OWNED = ("results.json", "figures", "tensorboard")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats with three decimals."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class StudyOutput:
    """A study's output directory: results, tables, figures, TensorBoard.

    With a ``fingerprint`` the directory belongs to one configuration: an
    earlier run's ``results.json`` is resumed (its keys kept) only when it
    holds the same fingerprint; another configuration is refused before
    anything is written, or, with ``overwrite``, its files are deleted and
    the run starts afresh.  The fingerprint is written to ``results.json``
    (key ``"fingerprint"``) at once, so it covers everything the run writes
    later.

    Args:
      output_dir: created if missing.
      name: the study's name, used in log lines.
      fingerprint: the study's :func:`fingerprint`; ``None`` leaves the
        directory untracked (earlier results are merged, whatever wrote them).
      overwrite: delete the files of an earlier run (``results.json``,
        ``figures/``, ``tensorboard/`` and ``owned``) and start afresh.
      owned: further files and directories, relative to ``output_dir``, that
        the study writes (deleted by ``overwrite``).

    Raises:
      ValueError: for an ``output_dir`` that is not a path, or an ``owned``
        name outside it.
      ConfigMismatchError: for results of another configuration (or without
        a fingerprint) in ``output_dir``, unless ``overwrite``.

    Example:
      >>> out = StudyOutput("/tmp/run", "attack_table",
      ...                   fingerprint=fingerprint("attack_table", {"eps": 0.25}))
      >>> out.update({"test/accuracy": 0.91})   # rewrites results.json
      >>> out.table("table", ["method", "FGSM"], [["HMC", 0.84]])
      >>> fig_path = out.figure_path("robustness_vs_width")
    """

    def __init__(self, output_dir: str, name: str, *,
                 fingerprint: Mapping[str, Any] | None = None,
                 overwrite: bool = False, owned: Sequence[str] = ()):
        self.dir = check_directory(output_dir, "output_dir")
        self.name = name
        self.fingerprint = None if fingerprint is None else dict(fingerprint)
        if self.fingerprint is not None:
            check_fingerprint(self.dir, self.fingerprint, overwrite=overwrite)
        if overwrite:
            self._delete(_OWNED + tuple(owned))
        os.makedirs(os.path.join(self.dir, "figures"), exist_ok=True)
        self.results: dict[str, Any] = {}
        path = self.path("results.json")
        if os.path.exists(path):
            try:
                self.results = dict(files.read_json(path))
            except ValueError:
                logging.warning("%s: ignoring unreadable %s", name, path)
        if self.fingerprint is not None:
            self.results[FINGERPRINT_KEY] = self.fingerprint
            files.write_json(path, self.results)
        self._writer = None

    def _delete(self, names: Sequence[str]) -> None:
        for name in names:
            rel = os.path.normpath(name)
            if os.path.isabs(rel) or rel == os.curdir or rel.startswith(
                    os.pardir):
                raise ValueError(f"owned names must lie inside output_dir, "
                                 f"got {name!r}.")
            path = self.path(rel)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
            else:
                continue
            logging.info("%s: overwrite: deleted %s", self.name, path)

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def update(self, values: Mapping[str, Any]) -> None:
        """Merges ``values`` into ``results.json`` (atomically) and TensorBoard."""
        self.results.update(values)
        files.write_json(self.path("results.json"), self.results)
        self.scalars(values)

    def drop(self, keys: Iterable[str]) -> None:
        """Removes ``keys`` from ``results.json`` (atomically), if present."""
        keys = [k for k in keys if k in self.results]
        if keys:
            for k in keys:
                del self.results[k]
            files.write_json(self.path("results.json"), self.results)

    def scalars(self, values: Mapping[str, Any], step: int = 0) -> None:
        """Writes the numeric entries of ``values`` as TensorBoard scalars."""
        numeric = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not numeric:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.path("tensorboard"))
        with self._writer.as_default():
            for k, v in numeric.items():
                tf.summary.scalar(k, v, step=step)
        self._writer.flush()

    def table(self, stem: str, header: Sequence[str],
              rows: Sequence[Sequence[Any]], note: str = "") -> str:
        """Writes ``<stem>.csv`` and ``<stem>.md``; returns the Markdown."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        writer.writerows(rows)
        files.write_text(self.path(f"{stem}.csv"), buf.getvalue())
        md = markdown_table(header, rows) + (f"\n{note}\n" if note else "")
        files.write_text(self.path(f"{stem}.md"), md)
        return md

    def figure_path(self, stem: str) -> str:
        return self.path("figures", f"{stem}.png")

    def save_figure(self, fig, stem: str) -> str:
        """Saves a matplotlib figure atomically as ``figures/<stem>.png``."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        path = self.figure_path(stem)
        files.write_bytes(path, buf.getvalue())
        pyplot().close(fig)
        return path


class Progress:
    """Stage-by-stage progress with an ETA, logged with absl.

    Example:
      >>> p = Progress("sweep", total=12)
      >>> for cfg in configs:
      ...     run(cfg)
      ...     p.step(f"width={cfg.width}")
    """

    def __init__(self, name: str, total: int):
        self.name = name
        self.total = max(1, int(total))
        self.done = 0
        self.start = time.perf_counter()

    def step(self, what: str = "", count: int = 1) -> None:
        self.done += count
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        logging.info("[%s] %d/%d %s | elapsed %s, ETA %s", self.name,
                     self.done, self.total, what, _hms(elapsed), _hms(eta))


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend.

    Imported on first use, not at module import: choosing the backend is a
    process-wide change that only a study drawing figures should make.
    """
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    return plt


# ----------------------------------------------------- what studies share
# One attack dispatcher, one model loader, one data loader and one seed rule,
# so that every study and script names, builds and seeds things alike.

ATTACKS = ("random", "fgsm", "pgd", "apgd-ce", "apgd-t", "square")
# The attacks that take a gradient definition.
GRADIENT_ATTACKS = ("fgsm", "pgd", "apgd-ce", "apgd-t")


def run_attack(ensemble, x, y, attack: str, eps: float, *, seed,
               gradient: str | None = None, pgd_steps: int | None = None,
               pgd_restarts: int | None = None,
               pgd_step_size: float | None = None,
               pgd_random_start: bool | None = None,
               random_trials: int | None = None,
               square_queries: int | None = None,
               apgd_steps: int | None = None):
    """One attack of :data:`ATTACKS`, by name.

    Settings left ``None`` take the attack's own default (``pgd``: 40 steps,
    1 restart, step size ``2.5 eps / steps``, a random start;
    ``random_attack``: 1 trial; ``square_attack``: 1000 queries; APGD: 100
    steps; FGSM and PGD: the expected gradient, APGD the predictive one).
    ``"apgd-ce"`` is APGD on the cross-entropy, ``"apgd-t"`` AutoAttack's
    targeted APGD on the DLR loss over ``min(9, C - 1)`` targets, falling
    back to the targeted cross-entropy below the four classes DLR needs
    (:func:`tfp_bnn_adv.attacks.apgd`).

    Args:
      ensemble: the :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` attacked.
      x: float32 inputs ``[B, *input_shape]`` in ``[0, 1]``.
      y: int labels ``[B]``.
      attack: one of :data:`ATTACKS`.
      eps: the L-inf radius, ``>= 0``.
      seed: the attack's seed.
      gradient: FGSM's and PGD's gradient definition (``"expected"``,
        ``"predictive"``, ``"paper"``, ``"sample"``); ignored by the others.
      pgd_steps, pgd_restarts, pgd_step_size, pgd_random_start: PGD's
        settings.
      random_trials: best-of-k of the random attack.
      square_queries: Square Attack's query budget per example.
      apgd_steps: APGD's iterations (per target for ``"apgd-t"``).

    Returns:
      The attacked inputs, float32 ``[B, *input_shape]``.

    Raises:
      ValueError: for an unknown ``attack`` (and whatever the attack raises).

    Example:
      >>> x_adv = run_attack(ens, x, y, "pgd", 0.25, seed=0,
      ...                    gradient="predictive", pgd_steps=20)
    """
    if attack == "random":
        fn, options = attacks.random_attack, {"trials": random_trials}
    elif attack == "fgsm":
        fn, options = attacks.fgsm, {"gradient": gradient}
    elif attack == "pgd":
        fn, options = attacks.pgd, {"steps": pgd_steps,
                                    "restarts": pgd_restarts,
                                    "step_size": pgd_step_size,
                                    "random_start": pgd_random_start,
                                    "gradient": gradient}
    elif attack in ("apgd-ce", "apgd-t"):
        targeted = attack == "apgd-t"
        fn, options = attacks.apgd, {
            "loss": "dlr" if targeted else "ce", "targeted": targeted,
            "steps": apgd_steps, "gradient": gradient}
        if targeted:
            options.update(
                num_targets=min(9, ensemble.network.num_classes - 1),
                dlr_fallback=True)
    elif attack == "square":
        fn, options = attacks.square_attack, {"max_queries": square_queries}
    else:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}.")
    return fn(ensemble, x, y, eps, seed=seed,
              **{k: v for k, v in options.items() if v is not None})


def limit_samples(ensemble, max_samples: int | None):
    """At most ``max_samples`` samples, evenly spaced over the ensemble.

    Args:
      ensemble: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`.
      max_samples: ``None`` keeps all.

    Returns:
      The ensemble, or its samples at ``round(linspace(0, S - 1, max))``.
    """
    if not max_samples or ensemble.num_samples <= max_samples:
        return ensemble
    return ensemble[np.round(np.linspace(0, ensemble.num_samples - 1,
                                         max_samples)).astype(int)]


def load_model(input_shape: Sequence[int], num_classes: int, *,
               hidden: Sequence[int] = (), keras_model=None,
               architecture: str = "mlp", filters: Sequence[int] = (),
               negative_slope: float | None = None):
    """The Keras model a study fits: a ``.keras`` file, else a built-in one.

    Args:
      input_shape: one input's shape, e.g. ``(28, 28, 1)``.
      num_classes: output classes.
      hidden: the MLP's hidden widths (the CNN's dense layers after its
        convolutions, where a 0 means none).
      keras_model: path of a saved Keras 3 model used instead (loaded
        uncompiled; ``input_shape`` and the rest are then ignored).
      architecture: ``"mlp"`` or ``"cnn"``.
      filters: the CNN's convolution filters.
      negative_slope: the built-in models' Leaky-ReLU slope (``None``:
        Keras' 0.2; the authors' PyTorch nets: 0.01).

    Returns:
      A built, uncompiled ``keras.Model``.
    """
    if keras_model:
        return keras.saving.load_model(keras_model, compile=False)
    if architecture == "cnn":
        return models.cnn(input_shape, num_classes, tuple(filters),
                          hidden=tuple(h for h in hidden if h),
                          negative_slope=negative_slope,
                          **({"activation": "leaky_relu"} if negative_slope
                             else {}))
    return models.mlp(input_shape, num_classes, tuple(hidden),
                      negative_slope=negative_slope)


def load_data(name: str, *, data_dir=None, data_source: str = "auto",
              half_moons_n: int = 1000, seed: int = 0):
    """A study's data set, through :func:`tfp_bnn_adv.data.load_dataset`.

    Args:
      name: one of :data:`tfp_bnn_adv.data.DATASET_NAMES`.
      data_dir, data_source: where an image data set is read from (ignored
        for half-moons, which is generated).
      half_moons_n: half-moons' size (80/20 train/test split).
      seed: half-moons' draw (:func:`study_seeds`' ``data``).

    Returns:
      The :class:`~tfp_bnn_adv.data.Dataset`.
    """
    if name == "half_moons":
        return data_lib.load_dataset(name, n=half_moons_n, seed=seed)
    return data_lib.load_dataset(name, data_dir=data_dir, source=data_source)


class Seeds(NamedTuple):
    """The seeds of one study run (see :func:`study_seeds`).

    Attributes:
      data: half-moons' draw and the training subset.
      model: the fit (``InferenceSettings.seed``; VI draws its samples with
        ``model + 1``).
      attack: the first attack; the ``i``-th column of an attack table uses
        ``attack + i``.
    """
    data: int
    model: int
    attack: int


# A sweep's data are the same for every seed of the sweep.
SWEEP_DATA_SEED = 0


def study_seeds(seed, *, sweep: bool = False) -> Seeds:
    """The one rule by which every study derives its seeds from its seed.

    Data, model and attack are all seeded with the study's ``seed``: a
    study is one draw of everything.  A sweep that trains one model per seed
    (``robustness_accuracy``) keeps its data fixed instead
    (:data:`SWEEP_DATA_SEED`), so that its models differ only in their own
    seed.

    Args:
      seed: the study's (or sweep run's) seed, an int ``>= 0``.
      sweep: whether ``seed`` is one of a sweep's seeds.

    Returns:
      :class:`Seeds`.

    Raises:
      TypeError, ValueError: for a seed that is not an int ``>= 0``.

    Example:
      >>> study_seeds(3)
      Seeds(data=3, model=3, attack=3)
      >>> study_seeds(3, sweep=True)
      Seeds(data=0, model=3, attack=3)
    """
    seed = validate.integer(seed, "seed", minimum=0)
    return Seeds(data=SWEEP_DATA_SEED if sweep else seed, model=seed,
                 attack=seed)


class ConfigMismatchError(ValueError):
    """An output directory holds results of another configuration."""


def check_directory(path, name: str) -> str:
    """``path`` if it is a writable directory or can become one; see
    :func:`tfp_bnn_adv.validate.directory` (a non-path is a ValueError here,
    as flag and config errors are)."""
    try:
        return validate.directory(path, name)
    except TypeError as e:
        raise ValueError(str(e)) from None


# (absolute path, size, mtime_ns) -> SHA-256, so a file hashed by a launch
# script's check and again by its study is read once.
_SHA256_CACHE: dict[tuple, str] = {}


def file_sha256(path) -> str:
    """The SHA-256 (hex) of a file's content.

    Raises:
      FileNotFoundError: if ``path`` is not a file.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such file: {path!r}.")
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256_CACHE[key] = h.hexdigest()
    return _SHA256_CACHE[key]


def ensemble_sha256(ensemble) -> str:
    """The SHA-256 (hex) of an in-memory ensemble's content.

    Covers what a study reads from it: the architecture (its Keras config),
    every weight (dtype, shape and bytes of each ``[S, ...]`` parameter) and
    the metadata's ``method`` and ``diagnostics``.
    """
    meta = ensemble.metadata or {}
    h = hashlib.sha256(json.dumps(
        {"network": ensemble.network.get_config(),
         "method": meta.get("method"), "diagnostics": meta.get("diagnostics")},
        sort_keys=True, default=str).encode("utf-8"))
    for p in ensemble.params:
        a = np.ascontiguousarray(p.numpy() if hasattr(p, "numpy") else p)
        h.update(f"{a.dtype.str}{a.shape}".encode("utf-8"))
        h.update(a.tobytes())
    return h.hexdigest()


def settings_fields(settings, drop: Sequence[str] = ()) -> dict[str, Any]:
    """The fingerprint fields of an ``InferenceSettings``.

    Its method's own fields (``relevant()``: for HMC no VI epochs, and so
    on), plus HMC's ``matmul_precision`` (TF32 or bfloat16 passes change
    results beyond rounding); without ``hmc_parallelism`` (how replicas share
    the work) and without the names in ``drop`` (fields a study sets itself).
    """
    out = settings.relevant()
    if settings.method == "hmc":
        out["matmul_precision"] = settings.matmul_precision
    return {k: v for k, v in out.items() if k not in drop}


def data_fields(dataset: str, data_dir=None, data_source: str = "auto",
                half_moons_n: int | None = None) -> dict[str, Any]:
    """The fingerprint fields naming a data set: what it is and where from.

    Half-moons is generated, so only its size counts; an image data set's
    directory is made absolute (a relative one means the same files from
    any working directory).
    """
    if dataset == "half_moons":
        return {"dataset": dataset, "half_moons_n": half_moons_n}
    if data_dir is not None and "://" not in os.fspath(data_dir):
        data_dir = os.path.abspath(os.fspath(data_dir))
    return {"dataset": dataset, "data_dir": data_dir,
            "data_source": data_source}


def _json_default(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"fingerprint fields must be JSON-able, got "
                    f"{type(obj).__name__}: {obj!r}.")


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default,
                      separators=(",", ":"))


def fingerprint(study: str, fields: Mapping[str, Any],
                inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A study configuration's fingerprint, as stored in ``results.json``.

    Args:
      study: the study's name (results of another study never resume).
      fields: what determines the results (see the module docstring): a
        JSON-able mapping (tuples, numpy scalars and dataclasses are
        converted); nested mappings are compared field by field.
      inputs: recorded for the reader but never compared (e.g. the paths of
        input files whose SHA-256 is in ``fields``).

    Returns:
      ``{"study", "version", "fields", "sha256", "inputs"}``, JSON-able;
      ``sha256`` digests ``study``, ``version`` and ``fields``.

    Example:
      >>> fp = fingerprint("attack_table", {"eps": 0.25, "seed": 0})
      >>> fp["fields"], len(fp["sha256"])
      ({'eps': 0.25, 'seed': 0}, 64)
    """
    canonical = json.loads(_canonical_json(dict(fields)))
    digest = hashlib.sha256(_canonical_json(
        {"study": study, "version": FINGERPRINT_VERSION,
         "fields": canonical}).encode("utf-8")).hexdigest()
    return {"study": study, "version": FINGERPRINT_VERSION,
            "fields": canonical, "sha256": digest,
            "inputs": json.loads(_canonical_json(dict(inputs or {})))}


def _flat(fields: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in fields.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_ABSENT = object()


def _shown(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 300 else text[:297] + "..."


def fingerprint_diff(saved: Mapping[str, Any], current: Mapping[str, Any]
                     ) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, current value)`` of every differing field.

    Nested fields are named with dots (``image_hmc.num_results``); a field
    only one side has shows the other as ``(absent)``.
    """
    old, new = _flat(saved), _flat(current)
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a is _ABSENT or b is _ABSENT or (
                _canonical_json(a) != _canonical_json(b)):
            out.append((key, a, b))
    return out


_REMEDY = ("Rerun with the earlier configuration to resume it, pass "
           "--overwrite (overwrite=True) to delete those results and start "
           "afresh, or choose another output_dir.")


def check_fingerprint(output_dir, fp: Mapping[str, Any], *,
                      overwrite: bool = False) -> bool:
    """Whether ``output_dir`` may receive the results of ``fp``'s run.

    Reads ``output_dir/results.json`` and writes nothing.

    Args:
      output_dir: a study's output directory (need not exist).
      fp: the run's :func:`fingerprint`.
      overwrite: the earlier results will be deleted: nothing to check.

    Returns:
      True when earlier results of the same configuration are there (the
      run resumes them), False when there are none or ``overwrite``.

    Raises:
      ConfigMismatchError: when ``results.json`` holds results of another
        study or configuration, or results without a fingerprint, or cannot
        be read; the message names each differing field with its saved and
        current value, and ``--overwrite``.
    """
    path = os.path.join(os.fspath(output_dir), "results.json")
    if overwrite or not os.path.exists(path):
        return False
    try:
        saved = files.read_json(path)
    except ValueError as e:
        raise ConfigMismatchError(
            f"{e} Cannot tell which configuration wrote the results in "
            f"{output_dir!r}. {_REMEDY}") from e
    if not saved:
        return False
    old = saved.get(FINGERPRINT_KEY) if isinstance(saved, Mapping) else None
    if not isinstance(old, Mapping) or not isinstance(old.get("fields"),
                                                      Mapping):
        raise ConfigMismatchError(
            f"{path!r} holds results without a configuration fingerprint "
            "(written by an earlier version of tfp_bnn_adv, or by hand), so "
            f"they cannot be told apart from this {fp['study']} run's. "
            + _REMEDY)
    if old.get("study") != fp["study"]:
        raise ConfigMismatchError(
            f"{output_dir!r} holds results of the {old.get('study')!r} study; "
            f"this is a {fp['study']!r} run. {_REMEDY}")
    diff = fingerprint_diff(old["fields"], fp["fields"])
    if old.get("version") != fp["version"]:
        diff.insert(0, ("fingerprint version", old.get("version"),
                        fp["version"]))
    if diff:
        lines = "\n".join(f"  {key}: {_shown(a)} (saved) -> {_shown(b)} (now)"
                          for key, a, b in diff)
        raise ConfigMismatchError(
            f"{output_dir!r} holds results of another {fp['study']} "
            f"configuration; refusing to mix them with this run's. "
            f"{len(diff)} field{'s differ' if len(diff) > 1 else ' differs'}:"
            f"\n{lines}\n{_REMEDY}")
    return True


class UnconvergedPosteriorError(RuntimeError):
    """A study's headline would rest on an unconverged HMC posterior."""


def check_max_rhat(value, name: str = "max_rhat") -> float:
    """``value`` as a float ``>= 1``, else a ValueError naming ``name``.

    Args:
      value: the R-hat threshold.
      name: what to call it in the error (a config field or ``--max_rhat``).

    Returns:
      ``float(value)``.

    Raises:
      ValueError: for a non-number, a non-finite number or one below 1
        (R-hat is never below 1 in expectation, so nothing would pass).
    """
    try:
        return validate.real(value, name, minimum=1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number >= 1 (R-hat is never "
                         f"below 1 in expectation), got {value!r}.") from None


def check_field(check, value, *args, **kwargs):
    """A :mod:`tfp_bnn_adv.validate` check of a config field.

    Its TypeError (a field of the wrong type) is raised as a ValueError: to a
    config's ``validate()`` both are a bad configuration.
    """
    try:
        return check(value, *args, **kwargs)
    except TypeError as e:
        raise ValueError(str(e)) from None


def convergence_report(metadata: Mapping[str, Any] | None,
                       max_rhat: float = 1.1) -> dict[str, Any]:
    """One posterior's convergence evidence, from its ensemble metadata.

    Args:
      metadata: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`'s
        ``metadata`` as :func:`~tfp_bnn_adv.studies.training.fit_posterior`
        leaves it (or any mapping with ``"method"`` and ``"diagnostics"``).
      max_rhat: an HMC posterior is converged when its median
        function-space R-hat is at most this (``>= 1``).

    Returns:
      A JSON-able dict with ``"method"``, ``"diagnostics"`` (the metadata's,
      or ``None``) and ``"converged"``: for HMC a bool, False when the R-hat
      is missing or NaN; ``None`` (not gated) for other methods.  HMC adds
      the columns of :func:`tfp_bnn_adv.inference.hmc.convergence_summary`
      and ``"max_rhat"``; VI adds ``"elbo_plateaued"`` and
      ``"elbo_relative_change"``.

    Raises:
      ValueError: for a ``max_rhat`` below 1.

    Example:
      >>> report = convergence_report(ens.metadata, max_rhat=1.1)
      >>> report["converged"], report["function_rhat_median"]
      (False, 1.42)
    """
    max_rhat = check_max_rhat(max_rhat)
    metadata = metadata or {}
    method = metadata.get("method")
    diag = metadata.get("diagnostics")
    diag = dict(diag) if isinstance(diag, Mapping) else None
    report: dict[str, Any] = {"method": method, "converged": None,
                              "diagnostics": diag}
    if method == "hmc":
        report.update(hmc.convergence_summary(diag, max_rhat),
                      max_rhat=max_rhat)
    elif method == "vi":
        report.update(elbo_plateaued=(diag or {}).get("plateaued"),
                      elbo_relative_change=(diag or {}).get("relative_change"))
    return report


def is_unconverged(report: Mapping[str, Any]) -> bool:
    """Whether ``report`` is of an HMC posterior that did not converge."""
    return report.get("method") == "hmc" and not report.get("converged")


def mark(label: str, unconverged) -> str:
    """``label``, with `` (UNCONVERGED)`` appended if ``unconverged``.

    Args:
      label: a table row's label, legend entry or title.
      unconverged: a :func:`convergence_report` or a bool (e.g. for a
        legend entry covering several posteriors).
    """
    if isinstance(unconverged, Mapping):
        unconverged = is_unconverged(unconverged)
    return f"{label} ({UNCONVERGED})" if unconverged else label


def _num(v, fmt: str) -> str:
    return "missing" if v is None else format(v, fmt)


def _rhat_text(label: str, report: Mapping[str, Any]) -> str:
    med = report.get("function_rhat_median")
    return (f"{label!r} (function-space R-hat median {_num(med, '.3f')}, "
            f"max_rhat {report.get('max_rhat', 1.1):g})")


def describe(label: str, report: Mapping[str, Any]) -> str:
    """One line on a posterior's convergence, for logs and figure titles."""
    method = report.get("method")
    if method == "hmc":
        state = "converged" if report["converged"] else UNCONVERGED
        frac = report.get("function_rhat_frac_below")
        return (f"{label}: HMC {state}: function-space R-hat median "
                f"{_num(report.get('function_rhat_median'), '.3f')} (max_rhat "
                f"{report['max_rhat']:g}), "
                f"{_num(None if frac is None else 100 * frac, '.0f')}% of "
                f"probe points < 1.1, ESS min "
                f"{_num(report.get('function_ess_min'), '.0f')}, acceptance "
                f"{_num(report.get('acceptance'), '.2f')}, divergent "
                f"{_num(report.get('num_divergent'), 'd')}")
    if method == "vi":
        plateau = {True: "plateaued", False: "did NOT plateau"}.get(
            report.get("elbo_plateaued"), "unknown")
        return (f"{label}: VI loss {plateau} (relative change "
                f"{_num(report.get('elbo_relative_change'), '.4f')})")
    return f"{label}: {method} (no convergence diagnostics)"


def convergence_columns(report: Mapping[str, Any]) -> list:
    """A table row's cells under :data:`CONVERGENCE_HEADER`."""
    cells = [None] * len(CONVERGENCE_HEADER)
    if report.get("method") == "hmc":
        ess = report.get("function_ess_min")
        cells[:5] = [report.get("function_rhat_median"),
                     report.get("function_rhat_frac_below"),
                     None if ess is None else int(round(ess)),
                     report.get("acceptance"), report.get("num_divergent")]
    elif report.get("method") == "vi":
        cells[5] = {True: "yes", False: "no"}.get(report.get("elbo_plateaued"))
    return cells


def convergence_results(label: str, report: Mapping[str, Any]
                        ) -> dict[str, Any]:
    """The ``results.json`` entries of one posterior's report.

    Returns:
      For HMC ``<label>/diagnostics`` (the full diagnostics dict) and
      ``<label>/convergence/<key>`` for ``function_rhat_median``,
      ``function_rhat_frac_below``, ``function_ess_min``, ``acceptance``,
      ``num_divergent``, ``converged`` and ``max_rhat``; for VI
      ``<label>/diagnostics`` (with the loss trace) and
      ``<label>/convergence/elbo_plateaued`` and ``.../elbo_relative_change``;
      nothing for other methods.
    """
    method = report.get("method")
    if method not in ("hmc", "vi"):
        return {}
    keys = _HMC_RESULT_KEYS if method == "hmc" else _VI_RESULT_KEYS
    out = {f"{label}/diagnostics": report.get("diagnostics")}
    out.update({f"{label}/convergence/{k}": report.get(k) for k in keys})
    return out


def slug(label: str) -> str:
    """``label`` as a file or directory name (``"NN (SGD)"`` -> ``"NN_SGD"``)."""
    return re.sub(r"[^A-Za-z0-9=._-]+", "_", label).strip("_") or "posterior"


def trace_figure(out: "StudyOutput", label: str, ensemble,
                 report: Mapping[str, Any]) -> str | None:
    """An HMC posterior's trace and rank plot, ``figures/traces_<label>.png``.

    Args:
      out: the study's output.
      label: the posterior's label (made file-name safe).
      ensemble: the :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`, or its
        metadata.
      report: its :func:`convergence_report` (for the title).

    Returns:
      The PNG's path, or ``None`` for a non-HMC posterior or one without
      ``metadata["traces"]``.
    """
    metadata = getattr(ensemble, "metadata", ensemble) or {}
    traces = metadata.get("traces")
    if report.get("method") != "hmc" or not traces:
        return None
    return hmc.plot_traces(traces, out.figure_path(f"traces_{slug(label)}"),
                           title=describe(label, report))


def record_posterior(out: "StudyOutput", label: str, ensemble,
                     max_rhat: float = 1.1) -> dict[str, Any]:
    """Reports one posterior: ``results.json``, its trace plot, a log line.

    Args:
      out: the study's output.
      label: the posterior's name in the study (the key prefix).
      ensemble: the :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`.
      max_rhat: the convergence threshold (``>= 1``).

    Returns:
      Its :func:`convergence_report`; the entries of
      :func:`convergence_results` (and ``<label>/figures/traces``, the trace
      plot of an HMC posterior) are already in ``results.json``.

    Example:
      >>> report = record_posterior(out, "HMC", ens, max_rhat=1.1)
      >>> row = [mark("HMC", report)] + convergence_columns(report)
    """
    report = convergence_report(ensemble.metadata, max_rhat)
    values = convergence_results(label, report)
    figure = trace_figure(out, label, ensemble, report)
    if figure:
        values[f"{label}/figures/traces"] = figure
    if values:
        out.update(values)
    if report["method"] in ("hmc", "vi"):
        quiet = (report["converged"] is not False and
                 report.get("elbo_plateaued") is not False)
        log = logging.info if quiet else logging.warning
        log("[%s] %s", out.name, describe(label, report))
    return report


def require_converged(reports: Mapping[str, Mapping[str, Any]], *,
                      allow_unconverged: bool, what: str,
                      saved_to: str | None = None) -> list[str]:
    """Refuses a headline that rests on an unconverged HMC posterior.

    Call it after the posteriors' diagnostics are saved (so nothing computed
    is lost) and before the headline is written.

    Args:
      reports: ``label -> convergence_report``.
      allow_unconverged: write anyway (the caller marks the posteriors
        UNCONVERGED); a warning is logged.
      what: the headline, for the messages (e.g. ``"the attack table"``).
      saved_to: where the diagnostics were saved, named in the error.

    Returns:
      The labels of the unconverged HMC posteriors (empty when all
      converged; only returned when ``allow_unconverged``).

    Raises:
      UnconvergedPosteriorError: naming each unconverged posterior, its
        R-hat and ``--allow_unconverged``, unless ``allow_unconverged``.
    """
    bad = [label for label, report in reports.items()
           if is_unconverged(report)]
    if not bad:
        return []
    details = "; ".join(_rhat_text(label, reports[label]) for label in bad)
    if allow_unconverged:
        logging.warning("Writing %s with UNCONVERGED HMC posteriors, marked "
                        "so (allow_unconverged): %s.", what, details)
        return bad
    raise UnconvergedPosteriorError(
        f"Refusing to write {what} from unconverged HMC posteriors: "
        f"{details}. "
        + (f"Their diagnostics are saved in {saved_to}. " if saved_to else "")
        + "Sample longer or retune HMC (num_burnin_steps, num_results, "
        "num_chains, trajectory_length), or pass --allow_unconverged "
        "(allow_unconverged=True) to write it with these posteriors marked "
        f"{UNCONVERGED}.")
