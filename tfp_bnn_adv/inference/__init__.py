"""Ways to fill a PosteriorEnsemble: HMC (``hmc``), VI (``vi``), SGD (``sgd``).

``density`` holds the Gaussian prior and the categorical likelihood they share.
"""
