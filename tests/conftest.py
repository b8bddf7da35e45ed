"""Shared pytest set-up: quiet TensorFlow, CPU only, fixed seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Tests measure XLA-vs-default choices afresh; never read or write the
# user's remembered choices.
os.environ.setdefault("TFP_BNN_ADV_JIT_CACHE", "none")

# Two logical CPU devices, so multi-device code (tf.distribute strategies,
# sharded HMC and attacks) runs in the tests; configured before any op runs.
# Everything else keeps running on /cpu:0 as before.
from tfp_bnn_adv import distribute  # pylint: disable=g-import-not-at-top,wrong-import-position

distribute.configure_logical_cpus(2)
