"""tfp_bnn_adv: adversarial robustness of Bayesian neural networks on TFP.

Every model is a pure function of its weights (:class:`Network`); every
posterior is a stack of weight sets with a leading sample axis ``S``
(:class:`PosteriorEnsemble`).  HMC, VI and SGD fill the stack; gradients,
attacks, metrics and studies only ever see the stack.
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble
# Registers the exported model's Keras layer, so .keras files load.
from tfp_bnn_adv import export
from tfp_bnn_adv.gradients import expected_loss_gradient
from tfp_bnn_adv.gradients import paper_loss_gradient
from tfp_bnn_adv.gradients import per_sample_loss_gradients
from tfp_bnn_adv.gradients import predictive_loss_gradient
from tfp_bnn_adv.network import Network

__version__ = "0.1.0"

__all__ = ["Network", "PosteriorEnsemble", "expected_loss_gradient",
           "predictive_loss_gradient", "per_sample_loss_gradients",
           "paper_loss_gradient", "export"]
