"""The paper ablation: its rows are the attacks' results under each
semantics, and its fully corrected row is the ordinary attack table."""

import json

import numpy as np
import pytest

from tfp_bnn_adv import attacks
from tfp_bnn_adv import metrics
from tfp_bnn_adv import models
from tfp_bnn_adv import paper
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.network import Network
from tfp_bnn_adv.studies import attack_table as at
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies import paper_ablation as pa

NUM_TEST = 24


@pytest.fixture(scope="module")
def posteriors():
    net = Network.from_keras(models.mlp((28, 28, 1), 10, (8,)))
    # Weights large enough that the predictions are confident and differ.
    params = [3.0 * p for p in net.init_params(seed=5, num_samples=14)]
    return net, params


def _ensembles(posteriors, hmc_metadata):
    net, params = posteriors
    hmc = PosteriorEnsemble(net, params, metadata=hmc_metadata(1.01))
    vi = PosteriorEnsemble(net, [p[::-1] for p in params],
                           metadata={"method": "vi"})
    return {"hmc": hmc, "vi": vi}


def _config(**kw):
    return pa.PaperAblationConfig.quick(**{
        "num_test": NUM_TEST, "hidden": (8,), "pgd_steps": 3,
        "switches": paper.ATTACK_SWITCHES, "max_samples": None,
        "paper_samples": 4, **kw})


def test_corrected_row_is_the_attack_table(posteriors, hmc_metadata, tmp_path):
    ensembles = _ensembles(posteriors, hmc_metadata)
    config = _config()
    res = pa.run_paper_ablation(config, str(tmp_path / "abl"),
                                ensembles=ensembles)
    table = at.run_attack_table(
        at.AttackTableConfig.quick(
            dataset="fashion_mnist", num_test=NUM_TEST, pgd_steps=3,
            attacks=("random", "fgsm", "pgd"), gradients=("predictive",),
            max_samples=None, seed=config.seed, verdict=False),
        str(tmp_path / "table"), ensembles={"HMC": ensembles["hmc"],
                                            "VI": ensembles["vi"]})
    for method, label in (("hmc", "HMC"), ("vi", "VI")):
        row = res["scores"]["corrected"][method]
        for attack, key in (("random", "random"), ("fgsm", "fgsm/predictive"),
                            ("pgd", "pgd/predictive")):
            prefix = f"{label}/eps=0.25/test"
            assert row[f"adv_accuracy/{attack}"] == pytest.approx(
                table[f"{prefix}/adv_accuracy/{key}"], abs=0)
            assert row[f"softmax_robustness/{attack}"] == pytest.approx(
                table[f"{prefix}/softmax_robustness/{key}"], rel=1e-12)
    saved = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert saved["corrected/hmc/adv_accuracy/pgd"] == \
        res["scores"]["corrected"]["hmc"]["adv_accuracy/pgd"]


def test_original_row_is_the_authors_attack(posteriors, hmc_metadata, tmp_path):
    """Recomputed from the pieces: the first samples, the double-softmax
    loss, the authors' PGD and the second-softmax metric."""
    ensembles = _ensembles(posteriors, hmc_metadata)
    config = _config()
    res = pa.run_paper_ablation(config, str(tmp_path), ensembles=ensembles)
    ds = common.load_data("fashion_mnist").subset(
        num_train=config.num_train, seed=common.study_seeds(config.seed).data)
    x, y = ds.test_x[:NUM_TEST], ds.test_y[:NUM_TEST]
    seed = common.study_seeds(config.seed).attack
    first = ensembles["hmc"][:4]
    x_pgd = attacks.pgd(first, x, y, 0.25, steps=40, step_size=2.0 / x.max(),
                        random_start=False, gradient="paper", seed=seed + 2)
    x_fgsm = attacks.fgsm(first, x, y, 0.25, gradient="paper", seed=seed + 1)
    row = res["scores"]["original (all switches on)"]["hmc"]
    assert row["adv_accuracy/pgd"] == np.mean(first.predict(x_pgd) == y)
    p, q = first.predict_proba(x), first.predict_proba(x_fgsm)
    soft = lambda a: np.exp(a) / np.exp(a).sum(axis=1, keepdims=True)  # noqa: E731
    want = 1 - np.mean(np.max(np.abs(soft(p) - soft(q)), axis=1))
    assert row["softmax_robustness/fgsm"] == pytest.approx(want, rel=1e-9)
    assert row["softmax_robustness/fgsm"] >= paper.double_softmax_floor(10)
    # A row with one switch off differs from the original only there.
    off = res["scores"]["original, softmax_metric off"]["hmc"]
    assert off["adv_accuracy/pgd"] == row["adv_accuracy/pgd"]
    assert off["softmax_robustness/fgsm"] == pytest.approx(
        metrics.softmax_robustness(p, q))


def test_files_rows_and_paragraph(posteriors, hmc_metadata, tmp_path):
    ensembles = _ensembles(posteriors, hmc_metadata)
    config = _config(methods=("hmc",))
    res = pa.run_paper_ablation(config, str(tmp_path), ensembles=ensembles)
    labels = [label for label, _ in pa.semantics_rows(config)]
    assert len(labels) == 2 * len(paper.ATTACK_SWITCHES) + 2
    assert labels[0].startswith("original") and labels[-1] == "corrected"
    md = (tmp_path / "table.md").read_text()
    for label in labels:
        assert f"| {label} |" in md
    assert "| published (Carbone et al. 2020, Table 1) |  | 0.812 | 0.848 | " \
        "0.826 |" in md
    assert "| semantics | HMC clean | HMC Rand |" in md
    for name in ("summary.md", "posteriors.md", "table.csv",
                 "figures/switch_effects.png"):
        assert (tmp_path / name).exists(), name
    assert "R-hat median" in (tmp_path / "posteriors.md").read_text()
    assert set(res["effects"]) == set(paper.ATTACK_SWITCHES)
    # The effects are differences of the table's own rows.
    e = res["effects"]["softmax_metric"]["hmc/softmax_robustness/fgsm"]
    s = res["scores"]
    assert e["turning_on_in_corrected"] == pytest.approx(
        s["corrected + softmax_metric"]["hmc"]["softmax_robustness/fgsm"]
        - s["corrected"]["hmc"]["softmax_robustness/fgsm"])
    assert "switches that move the numbers most" in res["paragraph"]


def test_config_is_checked(tmp_path):
    with pytest.raises(ValueError, match="switches must be distinct values"):
        pa.run_paper_ablation(_config(switches=("attack_loss", "bogus")),
                              str(tmp_path))
    with pytest.raises(ValueError, match="methods must be"):
        pa.run_paper_ablation(_config(methods=("sgd",)), str(tmp_path))
    with pytest.raises(ValueError, match="dataset must be one of"):
        pa.run_paper_ablation(_config(dataset="half_moons"), str(tmp_path))
    with pytest.raises(ValueError, match="negative_slope must be a finite"):
        pa.run_paper_ablation(_config(negative_slope=-0.5), str(tmp_path))
    assert pa.PaperAblationConfig.paper().negative_slope == 0.01
    with pytest.raises(ValueError, match="ensembles keys"):
        pa.run_paper_ablation(_config(), str(tmp_path),
                              ensembles={"sgd": None})
