"""Shared pytest set-up: quiet TensorFlow, CPU only, fixed seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Tests measure XLA-vs-default choices afresh; never read or write the
# user's remembered choices.
os.environ.setdefault("TFP_BNN_ADV_JIT_CACHE", "none")
