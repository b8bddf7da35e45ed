"""Fit a posterior by method name, and the training study that saves one.

HMC (:mod:`~tfp_bnn_adv.inference.hmc`), VI (:mod:`~tfp_bnn_adv.inference.vi`),
SGD and deep ensembles (:mod:`~tfp_bnn_adv.inference.sgd`) all end in a
:class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`; :func:`fit_posterior` picks
the method from :class:`InferenceSettings` so a study can sweep over methods
with one call.

Every posterior's convergence evidence goes into ``info["diagnostics"]`` and
the ensemble's ``metadata["diagnostics"]``: for HMC the function-space
R-hat/ESS of :class:`~tfp_bnn_adv.inference.hmc.Diagnostics` (on a held-out
probe set when the caller has one), for VI the per-epoch training loss (the
negative ELBO per training point) and whether it plateaued
(:func:`elbo_plateau`).

:func:`run_training` is the study behind ``launch.train``: it fits one
posterior (:class:`TrainingConfig`), evaluates it on the test points and
writes ``posterior.npz``, ``results.json`` (with the posterior's
diagnostics and the run's :func:`fingerprint`), ``ckpt/`` and, for HMC, a
trace plot.
"""

from __future__ import annotations

import dataclasses
import os
import math
import time
from typing import Any, Sequence

from absl import logging
import numpy as np

from tfp_bnn_adv import data as data_lib
from tfp_bnn_adv import validate
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.inference import hmc
from tfp_bnn_adv.inference import sgd
from tfp_bnn_adv.inference import vi
from tfp_bnn_adv.studies import common

__all__ = ["METHODS", "InferenceSettings", "fit_posterior", "elbo_plateau",
           "PLATEAU_WINDOW", "PLATEAU_TOLERANCE", "MAX_PROBE_POINTS",
           "TrainingConfig", "run_training", "fingerprint"]

METHODS = ("hmc", "vi", "sgd", "ensemble")
_MASS_MATRICES = hmc.MASS_MATRICES
# Everything the training study writes besides results.json, figures/,
# tensorboard/.
_OWNED = ("posterior.npz", "ckpt")

# VI's loss has plateaued when the mean over the last 20% of epochs differs
# from the mean over the 20% before by less than 1% (relative).
PLATEAU_WINDOW = 0.2
PLATEAU_TOLERANCE = 0.01
# Held-out probe points used for HMC's function-space diagnostics (evenly
# spaced over the given set): the probe probabilities cost
# ``S * P * classes`` float64 numbers.
MAX_PROBE_POINTS = 256


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """Settings of every inference method; each uses its own fields.

    Attributes:
      method: ``"hmc"``, ``"vi"``, ``"sgd"`` or ``"ensemble"``.
      num_chains, num_burnin_steps, num_results, thinning, step_size
        (initial; adapted), kernel, hmc_init: HMC (see
        :func:`tfp_bnn_adv.inference.hmc.sample`).
      trajectory_length: HMC's integration time; ``None`` uses
        ``HMCConfig.DEFAULT_TRAJECTORY_LENGTH`` unless
        ``num_leapfrog_steps`` is given.
      num_leapfrog_steps: a fixed leapfrog count instead of
        ``trajectory_length`` (the paper: 10 steps of about 0.005, on
        half-moons 0.001); ``None``: set from ``trajectory_length``.
      max_leapfrog_steps: HMC's cap on leapfrog steps per iteration.
      mass_matrix: ``"diagonal"`` (adapted) or ``"identity"``.
      prior_scale: prior standard deviation of HMC and VI (paper: 1).
      epochs, batch_size, learning_rate: VI and SGD training.
      vi_samples: posterior samples drawn from a VI fit.
      num_members: deep-ensemble size.
      seed: the run's seed.
      hmc_parallelism: with a multi-replica strategy, HMC splits the data
        (``"data"``) or the chains (``"chains"``) across replicas.
      matmul_precision: HMC's float32 matmul precision, ``"highest"`` or
        ``"default"`` (see :func:`tfp_bnn_adv.distribute.matmul_precision`).
      hmc_restart_batch_size, hmc_resample_draws: HMC's emulation of the
        authors' Pyro loop (``restart_batch_size`` and ``resample_draws`` of
        :class:`~tfp_bnn_adv.inference.hmc.HMCConfig`); ``None``: full-data
        HMC, the draws as sampled.
      vi_kl_weight, vi_init: VI's ``kl_weight`` and ``init`` (the authors'
        code: ``N / batch_size`` and ``"paper"``; see
        :mod:`tfp_bnn_adv.paper`).
    """
    method: str = "hmc"
    num_chains: int = 4
    num_burnin_steps: int = 500
    num_results: int = 200
    thinning: int = 1
    step_size: float = 0.01
    trajectory_length: float | None = None
    num_leapfrog_steps: int | None = None
    max_leapfrog_steps: int = 100
    mass_matrix: str = "diagonal"
    kernel: str = "hmc"
    hmc_init: str = "prior"
    prior_scale: float = 1.0
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    vi_samples: int = 100
    num_members: int = 5
    seed: int = 0
    hmc_parallelism: str = "data"
    matmul_precision: str = "highest"
    hmc_restart_batch_size: int | None = None
    hmc_resample_draws: int | None = None
    vi_kl_weight: float = 1.0
    vi_init: str = "default"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got "
                             f"{self.method!r}.")
        if self.trajectory_length is not None and (
                self.num_leapfrog_steps is not None):
            raise ValueError(
                "Give trajectory_length or num_leapfrog_steps, not both; got "
                f"trajectory_length={self.trajectory_length!r} and "
                f"num_leapfrog_steps={self.num_leapfrog_steps!r}.")
        if self.mass_matrix not in _MASS_MATRICES:
            raise ValueError(f"mass_matrix must be one of {_MASS_MATRICES}, "
                             f"got {self.mass_matrix!r}.")

    def replace(self, **changes) -> "InferenceSettings":
        return dataclasses.replace(self, **changes)

    def relevant(self) -> dict:
        """The fields this method uses (for run ids and metadata)."""
        common = {"method": self.method, "seed": self.seed}
        if self.method == "hmc":
            keys = ("num_chains", "num_burnin_steps", "num_results", "thinning",
                    "step_size", "trajectory_length", "num_leapfrog_steps",
                    "max_leapfrog_steps", "mass_matrix", "kernel", "hmc_init",
                    "prior_scale")
        elif self.method == "vi":
            keys = ("epochs", "batch_size", "learning_rate", "prior_scale",
                    "vi_samples")
        elif self.method == "sgd":
            keys = ("epochs", "batch_size", "learning_rate")
        else:
            keys = ("epochs", "batch_size", "learning_rate", "num_members")
        out = {**common, **{k: getattr(self, k) for k in keys}}
        # The authors' training semantics enter only when set, so the ids and
        # fingerprints of every ordinary run stay what they were.
        extra = {"hmc": (("hmc_restart_batch_size", None),
                         ("hmc_resample_draws", None)),
                 "vi": (("vi_kl_weight", 1.0), ("vi_init", "default"))}
        for key, default in extra.get(self.method, ()):
            if getattr(self, key) != default:
                out[key] = getattr(self, key)
        return out


def elbo_plateau(losses: Sequence[float], *, window: float = PLATEAU_WINDOW,
                 tolerance: float = PLATEAU_TOLERANCE) -> dict[str, Any]:
    """Whether a per-epoch training loss (VI's negative ELBO) has plateaued.

    With ``n`` epochs and ``w = max(1, floor(window * n))``, the mean loss of
    the last ``w`` epochs, ``m_last``, is compared with the mean of the ``w``
    epochs before them, ``m_prev``: the relative change is
    ``|m_last - m_prev| / |m_prev|`` and the loss has plateaued when it is
    below ``tolerance``.  Fewer than two epochs, or a non-finite loss in the
    compared windows, cannot show a plateau.

    Args:
      losses: the loss after each epoch, ``[n]`` (e.g. Keras'
        ``history["loss"]``).
      window: fraction of the epochs in each compared window, in
        ``(0, 0.5]``.
      tolerance: the largest relative change that counts as a plateau,
        ``> 0``.

    Returns:
      ``{"plateaued": bool, "relative_change": float or None, "window": w}``.

    Raises:
      ValueError: for a ``window`` outside ``(0, 0.5]`` or a ``tolerance``
        that is not ``> 0``.

    Example:
      >>> elbo_plateau([3.0, 2.0, 1.5, 1.2, 1.01, 1.0, 1.0, 1.0, 1.0, 1.0])
      {'plateaued': True, 'relative_change': 0.0, 'window': 2}
    """
    if isinstance(window, bool) or not isinstance(window, (int, float)) or (
            not 0 < window <= 0.5):
        raise ValueError(f"window must be a fraction in (0, 0.5], got "
                         f"{window!r}.")
    if isinstance(tolerance, bool) or not isinstance(
            tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}.")
    values = np.asarray(losses, np.float64).reshape(-1)
    n = values.size
    w = max(1, int(math.floor(window * n)))
    if n < 2 * w:
        return {"plateaued": False, "relative_change": None, "window": w}
    last, prev = values[n - w:].mean(), values[n - 2 * w:n - w].mean()
    if not (math.isfinite(last) and math.isfinite(prev)):
        return {"plateaued": False, "relative_change": None, "window": w}
    if prev == 0:
        change = 0.0 if last == 0 else math.inf
    else:
        change = abs(last - prev) / abs(prev)
    return {"plateaued": bool(change < tolerance),
            "relative_change": change if math.isfinite(change) else None,
            "window": w}


def _probe(probe_x, probe_y):
    """At most ``MAX_PROBE_POINTS`` held-out points, evenly spaced."""
    if probe_x is None:
        if probe_y is not None:
            raise ValueError("probe_y was given without probe_x.")
        return None, None
    n = len(probe_x)
    if n <= MAX_PROBE_POINTS:
        return probe_x, probe_y
    idx = np.unique(np.linspace(0, n - 1, MAX_PROBE_POINTS).astype(int))
    return (np.asarray(probe_x)[idx],
            None if probe_y is None else np.asarray(probe_y)[idx])


def fit_posterior(model, train_x, train_y, settings: InferenceSettings, *,
                  checkpoint_dir: str | None = None, verbose: int = 0,
                  probe_x=None, probe_y=None, max_rhat: float = 1.1
                  ) -> tuple[PosteriorEnsemble, dict[str, Any]]:
    """Fits a posterior (or SGD network) to the training data.

    Args:
      model: a built Keras 3 model (never modified).
      train_x: inputs ``[N, *input_shape]``.
      train_y: int labels ``[N]``.
      settings: the method and its settings.
      checkpoint_dir: a directory for HMC's and VI's checkpoints (a rerun
        with the same arguments resumes where it stopped); VI also saves
        its variational posterior there (``vi_posterior.npz``).  An
        existing file is refused before any work.
      verbose: Keras progress output for VI/SGD.
      probe_x: optional held-out inputs ``[P, *input_shape]`` (never training
        points) on which HMC's function-space R-hat/ESS are computed; at most
        ``MAX_PROBE_POINTS``, evenly spaced, are used.  Without them HMC uses
        a fixed subset of the training inputs.
      probe_y: optional labels ``[P]`` of ``probe_x`` (per-chain accuracy).
      max_rhat: HMC's convergence threshold on the median function-space
        R-hat (``>= 1``).

    Returns:
      ``(ensemble, info)``: the ensemble (``S`` samples, members or 1) and a
      JSON-able dict with the wall time (``wall_seconds``; for HMC resumed
      from checkpoints, at least the sampling time of every run that made
      the chains) and the method's diagnostics.  For
      HMC these are :meth:`~tfp_bnn_adv.inference.hmc.Diagnostics.to_dict`;
      for VI ``final_loss``, ``loss_trace`` (the per-epoch loss, i.e. the
      negative ELBO per training point) and :func:`elbo_plateau`'s
      ``plateaued``, ``relative_change`` and ``window``.  HMC and VI
      ensembles carry the same dict in ``metadata["diagnostics"]``.

    Raises:
      ValueError: for ``probe_y`` without ``probe_x``, a ``checkpoint_dir``
        that is an existing file, and whatever the method raises for bad
        settings or inputs; all before any training.
    """
    start = time.perf_counter()
    checkpoint_dir = validate.directory(checkpoint_dir, "checkpoint_dir",
                                        optional=True)
    s = settings
    probe_x, probe_y = _probe(probe_x, probe_y)
    info: dict[str, Any] = {"settings": s.relevant()}
    logging.info("Fitting %s posterior on %d points: %s", s.method,
                 len(train_x), s.relevant())
    if s.method == "hmc":
        emulation = {k: v for k, v in (
            ("restart_batch_size", s.hmc_restart_batch_size),
            ("resample_draws", s.hmc_resample_draws)) if v is not None}
        ens, diag = hmc.sample(
            model, train_x, train_y, num_chains=s.num_chains,
            num_burnin_steps=s.num_burnin_steps, num_results=s.num_results,
            thinning=s.thinning, step_size=s.step_size,
            trajectory_length=s.trajectory_length,
            num_leapfrog_steps=s.num_leapfrog_steps,
            max_leapfrog_steps=s.max_leapfrog_steps,
            mass_matrix=s.mass_matrix, kernel=s.kernel,
            prior_scale=s.prior_scale, seed=s.seed, init=s.hmc_init,
            probe_x=probe_x, probe_y=probe_y, max_rhat=max_rhat,
            checkpoint_dir=checkpoint_dir, parallelism=s.hmc_parallelism,
            matmul_precision=s.matmul_precision, **emulation)
        info["diagnostics"] = diag.to_dict()
    elif s.method == "vi":
        paper_init = {"init": s.vi_init} if s.vi_init != "default" else {}
        post = vi.fit(model, train_x, train_y, epochs=s.epochs,
                      batch_size=s.batch_size, learning_rate=s.learning_rate,
                      prior_scale=s.prior_scale, seed=s.seed,
                      kl_weight=s.vi_kl_weight,
                      checkpoint_dir=checkpoint_dir or None, verbose=verbose,
                      **paper_init)
        if checkpoint_dir:
            post.save(os.path.join(checkpoint_dir, "vi_posterior.npz"))
        ens = post.sample_ensemble(s.vi_samples, seed=s.seed + 1)
        losses = [float(v) for v in post.history["loss"]]
        info["diagnostics"] = {"final_loss": losses[-1], "loss_trace": losses,
                               **elbo_plateau(losses)}
        ens.metadata["diagnostics"] = info["diagnostics"]
        if info["diagnostics"]["plateaued"]:
            logging.info("VI loss plateaued: relative change %.4f over the "
                         "last epochs.", info["diagnostics"]["relative_change"])
        else:
            logging.warning("VI loss (negative ELBO per point) did NOT "
                            "plateau: relative change %s over the last "
                            "epochs.", info["diagnostics"]["relative_change"])
    else:
        members = 1 if s.method == "sgd" else s.num_members
        ens = sgd.train_ensemble(model, train_x, train_y, num_members=members,
                                 epochs=s.epochs, batch_size=s.batch_size,
                                 learning_rate=s.learning_rate, seed=s.seed,
                                 verbose=verbose)
        info["diagnostics"] = {"members": ens.metadata.get("members")}
    info["wall_seconds"] = time.perf_counter() - start
    if s.method == "hmc":
        # A resumed run: the sampling time of the earlier runs counts too
        # (the checkpoints carry it), not only this call's.
        earlier = float(info["diagnostics"].get("wall_seconds", 0.0))
        info["wall_seconds"] = max(info["wall_seconds"], earlier)
    ens.metadata.update({"num_train": int(len(train_x)),
                         "wall_seconds": info["wall_seconds"]})
    logging.info("%s posterior: S=%d in %.1f s", s.method, ens.num_samples,
                 info["wall_seconds"])
    return ens, info


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """What the training study fits.

    Attributes:
      settings: the method and its settings; ``settings.seed`` is the run's
        seed (the data's too: :func:`~tfp_bnn_adv.studies.common.study_seeds`).
      dataset: ``"fashion_mnist"``, ``"mnist"`` or ``"half_moons"``.
      num_train: training subset size (``None``: all).
      num_test: test points for the accuracy and HMC's diagnostics
        (the first ``num_test``; ``None``: all).
      architecture: ``"mlp"`` or ``"cnn"`` (ignored with ``keras_model``).
      hidden: the MLP's hidden widths (the CNN's dense layers; 0: none).
      filters: the CNN's convolution filters.
      keras_model: a ``.keras`` file used instead of ``architecture``.
      data_dir, data_source, half_moons_n: where the data come from.
      max_rhat: an HMC posterior is converged when its median function-space
        R-hat is at most this (``>= 1``).
    """
    settings: InferenceSettings = InferenceSettings()
    dataset: str = "fashion_mnist"
    num_train: int | None = None
    num_test: int | None = None
    architecture: str = "mlp"
    hidden: tuple = (512,)
    filters: tuple = (32, 64)
    keras_model: str | None = None
    data_dir: str | None = None
    data_source: str = "auto"
    half_moons_n: int = 2000
    max_rhat: float = 1.1

    def validate(self) -> None:
        common.check_max_rhat(self.max_rhat, "max_rhat")
        validate.instance(self.settings, InferenceSettings, "settings")
        validate.choice(self.dataset, data_lib.DATASET_NAMES, "dataset")
        validate.choice(self.architecture, ("mlp", "cnn"), "architecture")
        for name in ("num_train", "num_test"):
            common.check_field(validate.optional_positive_int,
                               getattr(self, name), name)
        common.check_field(validate.int_sequence, self.hidden, "hidden",
                           minimum=0 if self.architecture == "cnn" else 1)
        if self.architecture == "cnn":
            common.check_field(validate.int_sequence, self.filters, "filters")
        if self.keras_model is not None and not os.path.isfile(
                self.keras_model):
            raise ValueError(f"keras_model file {self.keras_model!r} not "
                             "found.")


def fingerprint(config: TrainingConfig) -> dict[str, Any]:
    """The run's :func:`~tfp_bnn_adv.studies.common.fingerprint`.

    Fields: the data set (name, and directory and source or half-moons
    size), ``num_train`` and ``num_test`` (the test points give the accuracy
    and HMC's diagnostics), the model (the SHA-256 of ``keras_model``, else
    ``architecture``, ``hidden`` and, for the CNN, ``filters``), the
    method's own inference settings with their seed
    (:func:`~tfp_bnn_adv.studies.common.settings_fields`) and ``max_rhat``
    (the verdict in ``results.json``).

    Raises:
      FileNotFoundError: for a ``keras_model`` that does not exist.
    """
    if config.keras_model:
        model = {"keras_model": common.file_sha256(config.keras_model)}
    else:
        model = {"architecture": config.architecture,
                 "hidden": tuple(config.hidden)}
        if config.architecture == "cnn":
            model["filters"] = tuple(config.filters)
    fields = {"data": common.data_fields(config.dataset, config.data_dir,
                                         config.data_source,
                                         config.half_moons_n),
              "num_train": config.num_train, "num_test": config.num_test,
              "model": model,
              "settings": common.settings_fields(config.settings),
              "max_rhat": config.max_rhat}
    inputs = ({"keras_model": os.path.abspath(config.keras_model)}
              if config.keras_model else {})
    return common.fingerprint("train", fields, inputs)


def run_training(config: TrainingConfig, output_dir: str, *,
                 overwrite: bool = False, verbose: int = 0) -> dict[str, Any]:
    """Fits one posterior, evaluates it and saves it.

    Args:
      config: a :class:`TrainingConfig`.
      output_dir: receives ``posterior.npz`` (a PosteriorEnsemble: weights as
        arrays, the architecture as Keras config, no pickle),
        ``results.json``, ``ckpt/`` (HMC's and VI's checkpoints: the same
        call resumes after an interruption) and, for HMC,
        ``figures/traces_train.png``.
      overwrite: delete an earlier run in ``output_dir`` (its posterior,
        results and checkpoints, of any configuration) and start afresh.
      verbose: Keras progress output for VI/SGD.

    Returns:
      The entries written to ``results.json``: ``test/accuracy``,
      ``train/num_samples``, ``train/num_points``, ``train/fit_seconds``,
      ``train/diagnostics``, ``settings``, ``posterior`` (the file) and the
      posterior's ``train/convergence/...``
      (:func:`~tfp_bnn_adv.studies.common.convergence_results`); besides them
      ``convergence`` (its :func:`~tfp_bnn_adv.studies.common.convergence_report`)
      and ``summary`` (lines for the terminal).  An unconverged HMC posterior
      is saved, and reported UNCONVERGED.

    Raises:
      ValueError: for a bad configuration.
      ConfigMismatchError: when ``output_dir`` holds a run of another
        configuration (see :func:`fingerprint`), unless ``overwrite``;
        before anything is fitted or written.
    """
    config.validate()
    settings = config.settings
    seeds = common.study_seeds(settings.seed)
    ds = common.load_data(config.dataset, data_dir=config.data_dir,
                          data_source=config.data_source,
                          half_moons_n=config.half_moons_n, seed=seeds.data)
    if config.num_train is not None and config.num_train < len(ds.train_x):
        ds = ds.subset(num_train=config.num_train, seed=seeds.data)
    out = common.StudyOutput(output_dir, "train",
                             fingerprint=fingerprint(config),
                             overwrite=overwrite, owned=_OWNED)
    test_x = ds.test_x[:config.num_test]
    test_y = ds.test_y[:config.num_test]
    model = common.load_model(ds.input_shape, ds.num_classes,
                              hidden=config.hidden,
                              keras_model=config.keras_model,
                              architecture=config.architecture,
                              filters=config.filters)
    ens, info = fit_posterior(model, ds.train_x, ds.train_y,
                              settings.replace(seed=seeds.model),
                              checkpoint_dir=out.path("ckpt"),
                              verbose=verbose, probe_x=test_x, probe_y=test_y,
                              max_rhat=config.max_rhat)
    ens.metadata.update({"dataset": config.dataset})
    path = out.path("posterior.npz")
    ens.save(path)
    accuracy = ens.accuracy(test_x, test_y)
    report = common.record_posterior(out, "train", ens, config.max_rhat)
    results = {"test/accuracy": accuracy, "train/num_samples": ens.num_samples,
               "train/num_points": len(ds.train_x),
               "train/fit_seconds": info["wall_seconds"],
               "train/diagnostics": info.get("diagnostics"),
               "settings": info["settings"], "posterior": path}
    out.update(results)
    summary = [f"{common.mark(settings.method, report)} posterior with "
               f"{ens.num_samples} samples: test accuracy {accuracy:.4f}; "
               f"saved to {path}"]
    if report["method"] in ("hmc", "vi"):
        summary.append(common.describe("train", report))
    return {**common.convergence_results("train", report), **results,
            "convergence": report, "summary": "\n".join(summary)}
