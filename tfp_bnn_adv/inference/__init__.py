"""Ways to fill a PosteriorEnsemble: HMC (``hmc``), VI (``vi``), SGD (``sgd``)."""
