"""Full-batch HMC/NUTS posteriors over any imported Keras network.

The package follows TFP's own seams:

* :mod:`~.target`: the log-density (prior plus full-batch likelihood over
  static data shards, optionally spread over ``tf.distribute`` replicas);
* :mod:`~.kernel`: TFP's preconditioned HMC/NUTS inside dual-averaging
  step-size and diagonal mass-matrix adaptation, in Stan's warm-up windows,
  with the leapfrog count set from a trajectory length;
* :mod:`~.driver`: compiled segments, checkpoints and bit-identical resume
  (:func:`run_chains`, which samples any batched target);
* :mod:`~.diagnostics`: weight-, likelihood- and function-space R-hat/ESS,
  ArviZ export and trace plots;
* :mod:`~.init`: over-dispersed initial states;
* :mod:`~.sample`: :func:`sample`, a network and data in, a diagnosed
  :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` out;

all configured by one frozen, validated :class:`HMCConfig`, which can also
emulate the paper's sampler (:meth:`HMCConfig.as_authors`: HMC restarted on
every batch of training points, the last run's draws resampled).
"""

from tfp_bnn_adv.inference.hmc.config import HMCConfig
from tfp_bnn_adv.inference.hmc.config import INITS
from tfp_bnn_adv.inference.hmc.config import KERNELS
from tfp_bnn_adv.inference.hmc.config import MASS_MATRICES
from tfp_bnn_adv.inference.hmc.diagnostics import convergence_summary
from tfp_bnn_adv.inference.hmc.diagnostics import Diagnostics
from tfp_bnn_adv.inference.hmc.diagnostics import plot_traces
from tfp_bnn_adv.inference.hmc.diagnostics import to_inference_data
from tfp_bnn_adv.inference.hmc.driver import CHECKPOINT_FILE
from tfp_bnn_adv.inference.hmc.driver import ChainResult
from tfp_bnn_adv.inference.hmc.driver import run_chains
from tfp_bnn_adv.inference.hmc.kernel import warmup_windows
from tfp_bnn_adv.inference.hmc.sample import restart_batches
from tfp_bnn_adv.inference.hmc.sample import resample_indices
from tfp_bnn_adv.inference.hmc.sample import sample
from tfp_bnn_adv.inference.hmc.target import log_likelihood
from tfp_bnn_adv.inference.hmc.target import log_prior
from tfp_bnn_adv.inference.hmc.target import PARALLELISMS
from tfp_bnn_adv.inference.hmc.target import replicated_log_likelihood
from tfp_bnn_adv.inference.hmc.target import shard_data
from tfp_bnn_adv.inference.hmc.target import shard_log_likelihood

__all__ = ["sample", "run_chains", "HMCConfig", "Diagnostics", "ChainResult",
           "log_likelihood", "shard_log_likelihood", "log_prior", "shard_data",
           "replicated_log_likelihood", "to_inference_data", "plot_traces",
           "convergence_summary", "warmup_windows", "KERNELS", "INITS",
           "MASS_MATRICES", "PARALLELISMS", "CHECKPOINT_FILE",
           "restart_batches", "resample_indices"]
