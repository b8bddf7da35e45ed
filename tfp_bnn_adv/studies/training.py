"""Fit a posterior by method name: the one dispatcher studies and scripts use.

HMC (:mod:`~tfp_bnn_adv.inference.hmc`), VI (:mod:`~tfp_bnn_adv.inference.vi`),
SGD and deep ensembles (:mod:`~tfp_bnn_adv.inference.sgd`) all end in a
:class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`; :func:`fit_posterior` picks
the method from :class:`InferenceSettings` so a study can sweep over methods
with one call.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from absl import logging

from tfp_bnn_adv.ensemble import PosteriorEnsemble

__all__ = ["METHODS", "InferenceSettings", "fit_posterior"]

METHODS = ("hmc", "vi", "sgd", "ensemble")


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """Settings of every inference method; each uses its own fields.

    Attributes:
      method: ``"hmc"``, ``"vi"``, ``"sgd"`` or ``"ensemble"``.
      num_chains, num_burnin_steps, num_results, thinning, step_size,
      num_leapfrog_steps, kernel, hmc_init: HMC (see
        :func:`tfp_bnn_adv.inference.hmc.sample`); the paper's step size is
        about 0.005 (half-moons 0.001) with 10 leapfrog steps.
      prior_scale: prior standard deviation of HMC and VI (paper: 1).
      epochs, batch_size, learning_rate: VI and SGD training.
      vi_samples: posterior samples drawn from a VI fit.
      num_members: deep-ensemble size.
      seed: the run's seed.
      hmc_parallelism: with a multi-replica strategy, HMC splits the data
        (``"data"``) or the chains (``"chains"``) across replicas.
      matmul_precision: HMC's float32 matmul precision, ``"highest"`` or
        ``"default"`` (see :func:`tfp_bnn_adv.distribute.matmul_precision`).
    """
    method: str = "hmc"
    num_chains: int = 2
    num_burnin_steps: int = 200
    num_results: int = 100
    thinning: int = 1
    step_size: float = 0.005
    num_leapfrog_steps: int = 10
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

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got "
                             f"{self.method!r}.")

    def replace(self, **changes) -> "InferenceSettings":
        return dataclasses.replace(self, **changes)

    def relevant(self) -> dict:
        """The fields this method uses (for run ids and metadata)."""
        common = {"method": self.method, "seed": self.seed}
        if self.method == "hmc":
            keys = ("num_chains", "num_burnin_steps", "num_results", "thinning",
                    "step_size", "num_leapfrog_steps", "kernel", "hmc_init",
                    "prior_scale")
        elif self.method == "vi":
            keys = ("epochs", "batch_size", "learning_rate", "prior_scale",
                    "vi_samples")
        elif self.method == "sgd":
            keys = ("epochs", "batch_size", "learning_rate")
        else:
            keys = ("epochs", "batch_size", "learning_rate", "num_members")
        return {**common, **{k: getattr(self, k) for k in keys}}


def fit_posterior(model, train_x, train_y, settings: InferenceSettings, *,
                  checkpoint_dir: str | None = None, verbose: int = 0
                  ) -> tuple[PosteriorEnsemble, dict[str, Any]]:
    """Fits a posterior (or SGD network) to the training data.

    Args:
      model: a built Keras 3 model (never modified).
      train_x: inputs ``[N, *input_shape]``.
      train_y: int labels ``[N]``.
      settings: the method and its settings.
      checkpoint_dir: HMC checkpoints (resumable runs); VI saves its
        variational posterior there too.
      verbose: Keras progress output for VI/SGD.

    Returns:
      ``(ensemble, info)``: the ensemble (``S`` samples, members or 1) and a
      JSON-able dict with the wall time and the method's diagnostics.
    """
    start = time.perf_counter()
    s = settings
    info: dict[str, Any] = {"settings": s.relevant()}
    logging.info("Fitting %s posterior on %d points: %s", s.method,
                 len(train_x), s.relevant())
    if s.method == "hmc":
        from tfp_bnn_adv.inference import hmc  # pylint: disable=g-import-not-at-top
        ens, diag = hmc.sample(
            model, train_x, train_y, num_chains=s.num_chains,
            num_burnin_steps=s.num_burnin_steps, num_results=s.num_results,
            thinning=s.thinning, step_size=s.step_size,
            num_leapfrog_steps=s.num_leapfrog_steps, kernel=s.kernel,
            prior_scale=s.prior_scale, seed=s.seed, init=s.hmc_init,
            checkpoint_dir=checkpoint_dir, parallelism=s.hmc_parallelism,
            matmul_precision=s.matmul_precision)
        info["diagnostics"] = diag.to_dict()
    elif s.method == "vi":
        from tfp_bnn_adv.inference import vi  # pylint: disable=g-import-not-at-top
        post = vi.fit(model, train_x, train_y, epochs=s.epochs,
                      batch_size=s.batch_size, learning_rate=s.learning_rate,
                      prior_scale=s.prior_scale, seed=s.seed, verbose=verbose)
        if checkpoint_dir:
            post.save(os.path.join(checkpoint_dir, "vi_posterior.npz"))
        ens = post.sample_ensemble(s.vi_samples, seed=s.seed + 1)
        info["diagnostics"] = {"final_loss": float(post.history["loss"][-1])}
    else:
        from tfp_bnn_adv.inference import sgd  # pylint: disable=g-import-not-at-top
        members = 1 if s.method == "sgd" else s.num_members
        ens = sgd.train_ensemble(model, train_x, train_y, num_members=members,
                                 epochs=s.epochs, batch_size=s.batch_size,
                                 learning_rate=s.learning_rate, seed=s.seed,
                                 verbose=verbose)
        info["diagnostics"] = {"members": ens.metadata.get("members")}
    info["wall_seconds"] = time.perf_counter() - start
    ens.metadata.update({"num_train": int(len(train_x)),
                         "wall_seconds": info["wall_seconds"]})
    logging.info("%s posterior: S=%d in %.1f s", s.method, ens.num_samples,
                 info["wall_seconds"])
    return ens, info
