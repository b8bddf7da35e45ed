"""The attack table: every cell is its attack's measured result."""

import csv
import dataclasses
import json

import numpy as np
import pytest  # pylint: disable=wrong-import-position

from tfp_bnn_adv import attacks  # pylint: disable=wrong-import-position
from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import sgd  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import attack_table as at  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import common  # pylint: disable=wrong-import-position


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
        square_queries=10, apgd_steps=3, eps=0.1, eps_sweep=(0.05,),
        # The APGD columns have their own test (the worst case, below).
        attacks=("random", "fgsm", "pgd", "square"), verdict=False)
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
    assert header[-3:] == ["published Rand", "published FGSM",
                           "published PGD"]
    assert (tmp_path / "figures" / "attack_table.png").exists()
    assert "worst case" in header and not (tmp_path / "reports").exists()


def test_worst_case_is_every_attack_failing_per_example(moons_ensembles,
                                                        tmp_path):
    ds, ensembles = moons_ensembles
    config = at.AttackTableConfig.quick(
        dataset="half_moons", half_moons_n=600, num_test=60, pgd_steps=3,
        apgd_steps=4, square_queries=10, eps=0.15, verdict=False)
    results = at.run_attack_table(config, str(tmp_path),
                                  ensembles={"NN": ensembles["NN"]})
    x, y = ds.test_x[:60], ds.test_y[:60]
    ens = ensembles["NN"]
    # Every column again, straight from the attacks, then a per-point AND.
    correct = ens.predict(x) == y
    each = []
    for i, (attack, gradient) in enumerate(at._columns(config)):  # pylint: disable=protected-access
        seed = config.seed + i
        if attack == "random":
            x_adv = attacks.random_attack(ens, x, y, 0.15, seed=seed)
        elif attack == "fgsm":
            x_adv = attacks.fgsm(ens, x, y, 0.15, gradient=gradient, seed=seed)
        elif attack == "pgd":
            x_adv = attacks.pgd(ens, x, y, 0.15, steps=3, gradient=gradient,
                                seed=seed)
        elif attack == "apgd-ce":
            x_adv = attacks.apgd(ens, x, y, 0.15, steps=4, gradient=gradient,
                                 seed=seed)
        elif attack == "apgd-t":
            # Two classes: one target, and the targeted cross-entropy in
            # place of the DLR loss (which needs four classes).
            x_adv = attacks.apgd(ens, x, y, 0.15, steps=4, gradient=gradient,
                                 loss="dlr", targeted=True, num_targets=1,
                                 dlr_fallback=True, seed=seed)
        else:
            x_adv = attacks.square_attack(ens, x, y, 0.15, max_queries=10,
                                          seed=seed)
        hit = ens.predict(x_adv) == y
        each.append(hit.mean())
        correct &= hit
    worst = results["NN/eps=0.15/test/worst_case_accuracy"]
    assert worst == pytest.approx(correct.mean())
    assert worst <= min(each)
    with open(tmp_path / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["worst case"]) == pytest.approx(worst)


def test_verdict_per_posterior(moons_ensembles, tmp_path):
    _, ensembles = moons_ensembles
    config = _moons_config(verdict=True, report_num_test=20, apgd_steps=3,
                           square_queries=10)
    config = dataclasses.replace(config, report_labels=("NN",))
    results = at.run_attack_table(config, str(tmp_path), ensembles=ensembles)
    # Only the labels asked for get a report; the others' cells stay empty.
    assert not (tmp_path / "reports" / "Deep_ensemble").exists()
    assert "Deep ensemble/verdict" not in results
    for label in ("NN",):
        report = json.loads((tmp_path / "reports" / common.slug(label) /
                             "report.json").read_text())
        assert results[f"{label}/verdict"] == report["verdict"]
        assert report["verdict"] in ("robust", "not_robust", "inconclusive")
        assert results[f"{label}/verdict_reason"] == report["verdict_reason"]
    md = results["table_markdown"]
    assert "## Verdict per posterior" in md
    with open(tmp_path / "table.csv", newline="") as f:
        rows = {r["dataset / method"]: r for r in csv.DictReader(f)}
    assert rows["half_moons / NN"]["verdict"] == results["NN/verdict"]
    assert rows["half_moons / Deep ensemble"]["verdict"] == ""
    with pytest.raises(TypeError, match="report_labels"):
        _moons_config(report_labels="NN").validate()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["NN/verdict"] == results["NN/verdict"]


def test_paper_figures_sit_next_to_matching_rows(tmp_path):
    net = Network.from_keras(models.mlp((28, 28, 1), 10, (8,)))
    ens = PosteriorEnsemble(net, net.init_params(0, num_samples=2),
                            metadata={"method": "hmc"})
    path = tmp_path / "hmc.npz"
    ens.save(path)
    config = at.AttackTableConfig.quick(
        posteriors=((None, str(path)),), dataset="fashion_mnist", num_test=20,
        attacks=("random",), allow_unconverged=True, verdict=False)
    results = at.run_attack_table(config, str(tmp_path / "out"))
    row = [line for line in results["table_markdown"].splitlines()
           if line.startswith("| fashion_mnist / HMC")][0]
    assert row.rstrip(" |").endswith("0.812 | 0.848 | 0.826")
    # No diagnostics at all: that HMC posterior counts as unconverged.
    assert row.startswith("| fashion_mnist / HMC (UNCONVERGED) |")
    assert results["unconverged"] == ["HMC"]


def _moons_config(**kw):
    return at.AttackTableConfig.quick(**{
        "dataset": "half_moons", "half_moons_n": 600, "num_test": 20,
        "attacks": ("random",), "eps": 0.1, "verdict": False, **kw})


def test_unconverged_hmc_is_refused_before_any_attack(moons_ensembles, tmp_path,
                                                      monkeypatch, hmc_metadata):
    _, ensembles = moons_ensembles
    meta = hmc_metadata(1.4, traces=True)
    hmc_ens = PosteriorEnsemble(ensembles["Deep ensemble"].network,
                                ensembles["Deep ensemble"].params, metadata=meta)

    def no_attack(*args, **kwargs):
        raise AssertionError("attacked an unconverged posterior")

    monkeypatch.setattr(common, "run_attack", no_attack)
    with pytest.raises(common.UnconvergedPosteriorError) as e:
        at.run_attack_table(_moons_config(), str(tmp_path),
                            ensembles={"HMC": hmc_ens, "NN": ensembles["NN"]})
    msg = str(e.value)
    assert "'HMC'" in msg and "1.400" in msg and "--allow_unconverged" in msg
    assert "the attack table" in msg
    # What was computed is kept: the diagnostics and the trace plot.
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["HMC/diagnostics"] == meta["diagnostics"]
    assert saved["HMC/convergence/converged"] is False
    assert saved["HMC/convergence/function_rhat_median"] == 1.4
    assert (tmp_path / "figures" / "traces_HMC.png").exists()
    assert not (tmp_path / "table.md").exists()
    assert not (tmp_path / "table.csv").exists()


def test_allow_unconverged_writes_the_table_marked(moons_ensembles, tmp_path,
                                                   hmc_metadata):
    _, ensembles = moons_ensembles
    net, params = ensembles["Deep ensemble"].network, ensembles["Deep ensemble"].params
    targets = {"HMC short": PosteriorEnsemble(net, params,
                                              metadata=hmc_metadata(1.4)),
               "HMC long": PosteriorEnsemble(net, params,
                                             metadata=hmc_metadata(1.05)),
               "NN": ensembles["NN"]}
    results = at.run_attack_table(_moons_config(allow_unconverged=True),
                                  str(tmp_path), ensembles=targets)
    assert results["unconverged"] == ["HMC short"]
    assert results["HMC long/convergence/converged"] is True
    with open(tmp_path / "table.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    cols = ["Rand"]
    conv = list(common.CONVERGENCE_HEADER)
    assert header == (["dataset / method", "clean"] + cols + ["worst case"] +
                      conv +
                      ["published Rand", "published FGSM",
                           "published PGD"])
    assert set(body) == {"half_moons / HMC short (UNCONVERGED)",
                         "half_moons / HMC long", "half_moons / NN"}
    short = body["half_moons / HMC short (UNCONVERGED)"]
    assert float(short["R-hat median"]) == 1.4
    assert float(short["R-hat < 1.1"]) == 0.25 and short["divergent"] == "3"
    assert float(short["acceptance"]) == pytest.approx(0.75)
    assert float(body["half_moons / HMC long"]["R-hat median"]) == 1.05
    assert all(body["half_moons / NN"][c] == "" for c in conv)
    md = (tmp_path / "table.md").read_text()
    assert md.startswith("**Warning:**") and "HMC short" in md.splitlines()[0]
    assert "| half_moons / HMC short (UNCONVERGED) |" in md
    assert "| half_moons / HMC long |" in md
    unchanged = (tmp_path / "table_unchanged.md").read_text()
    assert "HMC short (UNCONVERGED)" in unchanged
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["HMC long/diagnostics"] == targets["HMC long"].metadata["diagnostics"]
    assert "NN/diagnostics" not in saved


def test_bad_configs():
    with pytest.raises(ValueError, match="attacks"):
        at.AttackTableConfig(attacks=("cw",)).validate()
    with pytest.raises(ValueError, match="eps"):
        at.AttackTableConfig(eps=-0.1).validate()
    with pytest.raises(ValueError, match="max_rhat"):
        at.AttackTableConfig(max_rhat=0.9).validate()
    with pytest.raises(ValueError, match="not found"):
        at.AttackTableConfig(posteriors=(("x", "/nonexistent.npz"),)).validate()
    with pytest.raises(ValueError, match="no posterior"):
        at.run_attack_table(at.AttackTableConfig(dataset="half_moons"), "/tmp/unused")


def test_rerun_with_other_posterior_and_eps_is_refused_not_mixed(
        moons_ensembles, tmp_path):
    _, ensembles = moons_ensembles
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    ensembles["Deep ensemble"].save(first)
    ensembles["NN"].save(second)
    out = tmp_path / "table"
    old = _moons_config(posteriors=(("P", str(first)),))
    at.run_attack_table(old, str(out))
    before = (out / "results.json").read_text()
    assert "P/eps=0.1/test/adv_accuracy/random" in json.loads(before)
    new = _moons_config(posteriors=(("P", str(second)),), eps=0.05)
    with pytest.raises(ValueError, match=r"eps: 0\.1 \(saved\) -> 0\.05 \(now\)"
                       ) as e:
        at.run_attack_table(new, str(out))
    assert "posteriors" in str(e.value) and "--overwrite" in str(e.value)
    assert (out / "results.json").read_text() == before
    # The same configuration reruns (and resumes) in place.
    at.run_attack_table(old, str(out))
    # A retrained posterior under the same path is another configuration.
    ensembles["NN"].save(first)
    with pytest.raises(ValueError, match="posteriors"):
        at.run_attack_table(old, str(out))
    # --overwrite: only the new run's keys, beside its table.
    at.run_attack_table(new, str(out), overwrite=True)
    saved = json.loads((out / "results.json").read_text())
    assert "P/eps=0.05/test/adv_accuracy/random" in saved
    assert not any(k.startswith("P/eps=0.1/") for k in saved)
    assert saved["fingerprint"]["fields"]["eps"] == 0.05
    assert saved["fingerprint"]["inputs"]["posteriors"] == [["P", str(second)]]
    assert saved["fingerprint"]["fields"]["posteriors"] == [
        ["P", common.file_sha256(second)]]


def test_fingerprint_fields_follow_what_changes_the_table(moons_ensembles):
    _, ensembles = moons_ensembles
    base = at.fingerprint(_moons_config(), {"NN": ensembles["NN"]})
    # Deciding whether to write, and settings of attacks not run, are out.
    assert at.fingerprint(_moons_config(allow_unconverged=True),
                          {"NN": ensembles["NN"]}) == base
    assert at.fingerprint(_moons_config(pgd_steps=7),
                          {"NN": ensembles["NN"]}) == base
    for change in (dict(num_test=21), dict(seed=1), dict(max_rhat=1.2),
                   dict(half_moons_n=500), dict(attacks=("random", "fgsm"))):
        assert at.fingerprint(_moons_config(**change),
                              {"NN": ensembles["NN"]}) != base, change
    assert at.fingerprint(_moons_config(), {"NN": ensembles["Deep ensemble"]}
                          )["fields"]["ensembles"] != base["fields"]["ensembles"]
    assert at.fingerprint(_moons_config(num_test=None))["fields"][
        "num_test"] is None
    at.AttackTableConfig(num_test=None).validate()  # None: every test point
    with pytest.raises(ValueError, match="num_test"):
        at.AttackTableConfig(num_test=0).validate()
    with pytest.raises(ValueError, match="eps"):
        at.AttackTableConfig(eps=float("nan")).validate()
