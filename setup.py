"""tfp_bnn_adv: adversarial robustness of Bayesian neural networks, on TFP."""

import setuptools

setuptools.setup(
    name="tfp_bnn_adv",
    version="0.1.0",
    description=("Adversarial robustness of Bayesian neural networks with "
                 "TensorFlow Probability: HMC/VI/SGD posteriors as vectorised "
                 "ensembles, XLA input gradients, FGSM/PGD/random/Square "
                 "attacks and the studies of Carbone et al. (NeurIPS 2020)."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["tfp_bnn_adv", "tfp_bnn_adv.*",
                                               "launch", "launch.*"]),
    install_requires=[
        "tensorflow-cpu==2.21.0; platform_machine=='x86_64'",
        "tensorflow==2.21.0; platform_machine!='x86_64'",
        "tensorflow-probability==0.25.0",
        "tf-keras==2.21.0",
        "keras>=3.10,<4",
        "tensorflow-datasets==4.9.10",
        "absl-py>=2.1",
        "tensorboard>=2.21",
        "numpy>=1.26",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scipy>=1.11", "arviz>=0.20,<1",
                 "adversarial-robustness-toolbox==1.20.1"],
        "bench": ["jax[cpu]==0.10.2", "numpyro==0.22.0",
                  "adversarial-robustness-toolbox==1.20.1"],
        "arviz": ["arviz>=0.20,<1"],
    },
    entry_points={
        "console_scripts": [],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
