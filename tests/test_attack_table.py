"""The attack table: every cell is its attack's measured result."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from tfp_bnn_adv import attacks  # pylint: disable=wrong-import-position
from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import sgd  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import attack_table as at  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def moons_ensembles():
    ds = data.half_moons(600, seed=0)
    ens = sgd.train_ensemble(models.mlp((2,), 2, (16,)), ds.train_x, ds.train_y,
                             num_members=2, epochs=20, batch_size=32,
                             learning_rate=1e-2, seed=0, verbose=0)
    return ds, {"Deep ensemble": ens, "NN": ens[0]}


def test_table_cells_are_the_attacks_results(moons_ensembles, tmp_path):
    ds, ensembles = moons_ensembles
    config = at.AttackTableConfig.quick(
        dataset="half_moons", half_moons_n=600, num_test=60, pgd_steps=3,
        square_queries=10, eps=0.1, eps_sweep=(0.05,))
    results = at.run_attack_table(config, str(tmp_path), ensembles=ensembles)
    x, y = ds.test_x[:60], ds.test_y[:60]
    # Independent recomputation of two cells: the attacks' own outputs,
    # scored with plain numpy.
    ens = ensembles["NN"]
    order = at._columns(config)  # pylint: disable=protected-access
    i = order.index(("fgsm", "predictive"))
    x_adv = attacks.fgsm(ens, x, y, 0.1, gradient="predictive", seed=config.seed + i)
    acc = np.mean(ens.predict(x_adv) == y)
    unchanged = np.mean(ens.predict(x_adv) == ens.predict(x))
    assert results["NN/eps=0.1/test/adv_accuracy/fgsm/predictive"] == pytest.approx(acc)
    assert results["NN/eps=0.1/test/adv_robustness/fgsm/predictive"] == pytest.approx(unchanged)
    assert "NN/eps=0.05/test/adv_accuracy/pgd/expected" in results
    md = (tmp_path / "table.md").read_text()
    assert "Accuracy on attacked inputs" in md and "Unchanged predictions" in md
    assert "half_moons / Deep ensemble (eps=0.1)" in md
    header = (tmp_path / "table.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["dataset / method", "clean", "Rand"]
    assert header[-3:] == ["paper Rand", "paper FGSM", "paper PGD"]
    assert (tmp_path / "figures" / "attack_table.png").exists()


def test_paper_figures_sit_next_to_matching_rows(tmp_path):
    net = Network.from_keras(models.mlp((28, 28, 1), 10, (8,)))
    ens = PosteriorEnsemble(net, net.init_params(0, num_samples=2),
                            metadata={"method": "hmc"})
    path = tmp_path / "hmc.npz"
    ens.save(path)
    config = at.AttackTableConfig.quick(
        posteriors=((None, str(path)),), dataset="fashion_mnist", num_test=20,
        attacks=("random",))
    results = at.run_attack_table(config, str(tmp_path / "out"))
    row = [line for line in results["table_markdown"].splitlines()
           if line.startswith("| fashion_mnist / HMC")][0]
    assert row.rstrip(" |").endswith("0.812 | 0.848 | 0.826")


def test_bad_configs():
    with pytest.raises(ValueError, match="attacks"):
        at.AttackTableConfig(attacks=("cw",)).validate()
    with pytest.raises(ValueError, match="eps"):
        at.AttackTableConfig(eps=-0.1).validate()
    with pytest.raises(ValueError, match="not found"):
        at.AttackTableConfig(posteriors=(("x", "/nonexistent.npz"),)).validate()
    with pytest.raises(ValueError, match="no posterior"):
        at.run_attack_table(at.AttackTableConfig(dataset="half_moons"), "/tmp/unused")
