"""launch.reproduce / studies.reproduction: every file and key, resuming
from the small files alone, the headline without unconverged posteriors."""

import dataclasses
import json
import os
import pathlib
import shutil

from absl import flags
from absl.testing import flagsaver
import pytest

from launch import flags as lf
from launch import gradient_study
from launch import reproduce
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies import reproduction
from tfp_bnn_adv.studies.gradient_study import GradientStudyConfig

FLAGS = flags.FLAGS


@pytest.fixture(autouse=True)
def parsed_flags():
    if not FLAGS.is_parsed():
        FLAGS(["pytest"])
    yield


def _json(path):
    return json.loads(pathlib.Path(path).read_text())


def _table_rows(path):
    return [line for line in pathlib.Path(path).read_text().splitlines()
            if line.startswith("|") and not line.startswith("|---")][1:]


# What a finished image part must hold (the small files that are committed).
IMAGE_FILES = (
    "summary.md", "results.json", "figures/traces_HMC.png",
    "attack_table/table.md", "attack_table/table.csv",
    "attack_table/results.json",
    "attack_table/reports/HMC/report.md", "attack_table/reports/HMC/report.json",
    "attack_table/reports/VI/report.md",
    "gradient_study/gradients.md", "gradient_study/gradients.csv",
    "gradient_study/results.json",
    "robustness_accuracy/sweep.md", "robustness_accuracy/results.json",
    "paper_ablation/table.md", "paper_ablation/results.json")
MOONS_FILES = ("gradients.md", "gradients.csv", "results.json",
               "figures/grad_vs_width.png", "figures/grad_vs_train_size.png")


def test_quick_preset_writes_every_file_and_resumes_from_small_files(
        tmp_path, capsys):
    out = tmp_path / "repro"
    with flagsaver.flagsaver(output_dir=str(out), preset="quick"):
        reproduce.main(["reproduce"])
    printed = capsys.readouterr().out
    top = _json(out / "results.json")
    assert top["preset"] == "quick"
    assert set(top["parts"]) == {"fashion_mnist", "half_moons"}
    assert all(s["complete"] for s in top["parts"].values())
    for name in ("findings.md", "summary.md", "flags.txt"):
        assert (out / name).exists(), name
    assert "--preset=quick" in (out / "flags.txt").read_text()
    for rel in IMAGE_FILES:
        assert (out / "fashion_mnist" / rel).exists(), rel
    for rel in MOONS_FILES:
        assert (out / "half_moons" / "gradient_study" / rel).exists(), rel

    # Every HMC posterior has its function-space R-hat in results.json.
    fm = _json(out / "fashion_mnist" / "results.json")
    assert "function_rhat_median" in fm["HMC/diagnostics"]
    moons = _json(out / "half_moons" / "gradient_study" / "results.json")
    prefix = "half_moons/hmc/width=4/n_train=60"
    assert "function_rhat_median" in moons[f"{prefix}/diagnostics"]
    assert f"{prefix}/samples=2/grad_mean_abs/expected" in moons
    # The image part's gradient study has no half-moons grid of its own.
    grads = _json(out / "fashion_mnist" / "gradient_study" / "results.json")
    assert not any(k.startswith("half_moons/") for k in grads)
    assert any(k.startswith("fashion_mnist/hmc/") for k in grads)

    # The headline: converged rows verbatim, unconverged ones left out and
    # named (4 draws per chain do not converge: the study files mark them).
    findings = (out / "findings.md").read_text()
    assert findings in printed
    rows = _table_rows(out / "fashion_mnist" / "attack_table" / "table.md")
    marked = [r for r in rows if "(UNCONVERGED)" in r]
    assert marked, "the tiny HMC posterior should be flagged"
    for row in rows:
        assert (row in findings) is (row not in marked), row
    assert "(UNCONVERGED)" not in "\n".join(
        line for line in findings.splitlines() if line.startswith("|"))
    assert "Left out, unconverged: `fashion_mnist / HMC (UNCONVERGED)`" in (
        findings)
    expected_unconverged = ["fashion_mnist: " + u for u in
                            top["parts"]["fashion_mnist"]["unconverged"]] + [
        "half_moons: " + u for u in top["parts"]["half_moons"]["unconverged"]]
    assert top["unconverged"] == expected_unconverged
    assert "half_moons: " + prefix in top["unconverged"]

    # A fresh clone of the committed results holds only the small files:
    # the same command keeps both parts without refitting anything.
    for path in list(out.rglob("*")):
        if path.is_dir() and path.name in ("ckpt", "tensorboard", "posteriors"):
            shutil.rmtree(path)
        elif path.is_file() and path.suffix == ".npz":
            path.unlink()
    table_json = out / "fashion_mnist" / "attack_table" / "results.json"
    before = table_json.read_text()
    mtime = os.stat(table_json).st_mtime_ns
    with flagsaver.flagsaver(output_dir=str(out), preset="quick"):
        reproduce.main(["reproduce"])
    assert os.stat(table_json).st_mtime_ns == mtime
    assert table_json.read_text() == before
    assert not list(out.rglob("*.npz"))  # nothing was refitted
    assert (out / "findings.md").read_text() == findings

    # Other settings in the same directory are refused before any work.
    with flagsaver.flagsaver(output_dir=str(out), preset="quick", seed=1):
        with pytest.raises(lf.FlagError, match="seed"):
            reproduce.main(["reproduce"])

    # One part alone, of the same settings, is kept as it is.
    config = reproduction.preset_config("quick")
    alone = reproduction.run_reproduction(
        dataclasses.replace(config, half_moons=None), str(out))
    assert alone["parts"]["fashion_mnist"]["complete"]
    assert os.stat(table_json).st_mtime_ns == mtime
    # Other settings of one part: refused before any work, naming the part;
    # once its directory is deleted it reruns, and the other part is kept.
    moons_dir = out / "half_moons" / "gradient_study"
    other = dataclasses.replace(config, half_moons=dataclasses.replace(
        config.half_moons, moons_widths=(3,)))
    moons_before = (moons_dir / "results.json").read_text()
    with pytest.raises(common.ConfigMismatchError,
                       match="(?s)Part 'half_moons'.*moons_widths"):
        reproduction.run_reproduction(other, str(out))
    assert (moons_dir / "results.json").read_text() == moons_before
    shutil.rmtree(moons_dir)
    rerun = reproduction.run_reproduction(other, str(out))
    assert os.stat(table_json).st_mtime_ns == mtime
    assert ("half_moons/hmc/width=3/n_train=60/samples=2/grad_mean_abs/"
            "expected") in _json(moons_dir / "results.json")
    assert "half_moons: half_moons/hmc/width=3/n_train=60" in (
        rerun["unconverged"])


def test_strip_unconverged_drops_marked_rows_only():
    text = ("| posterior | clean |\n|---|---|\n"
            "| mnist / HMC (UNCONVERGED) | 0.9 |\n| mnist / VI | 0.8 |\n"
            "| mnist | hmc (UNCONVERGED) | 16 | 500 | 1 |\n"
            "note (UNCONVERGED) outside a table stays\n")
    kept, dropped = reproduction._strip_unconverged(text)
    assert kept.splitlines() == ["| posterior | clean |", "|---|---|",
                                 "| mnist / VI | 0.8 |",
                                 "note (UNCONVERGED) outside a table stays"]
    assert dropped == ["mnist / HMC (UNCONVERGED)",
                       "mnist / hmc (UNCONVERGED) / 16 / 500"]


def test_presets_build_and_data_dir_goes_to_mnist():
    for preset in reproduction.PRESETS:
        config = reproduction.preset_config(preset)
        assert config.parts == ("fashion_mnist", "half_moons")
        fm = config.images["fashion_mnist"]
        # One posterior set per part: every study scores the part's data.
        assert fm.table.dataset == fm.sweep.dataset == "fashion_mnist"
        assert fm.ablation.num_train == fm.num_train
        assert config.half_moons.image_dataset is None
    both = reproduction.preset_config(
        "quick", parts=("half_moons", "mnist", "fashion_mnist"),
        data_dir="/data/mnist")
    assert both.parts == ("fashion_mnist", "mnist", "half_moons")
    assert both.images["mnist"].data_dir == "/data/mnist"
    assert both.images["mnist"].table.data_dir == "/data/mnist"
    assert both.images["fashion_mnist"].data_dir is None
    alone = reproduction.preset_config("quick", parts=("fashion_mnist",),
                                       data_dir="/data/fm")
    assert alone.images["fashion_mnist"].data_dir == "/data/fm"
    assert alone.half_moons is None
    # Different preset, different fingerprint; same preset, same.
    assert (reproduction.fingerprint(reproduction.preset_config("quick"))
            == reproduction.fingerprint(reproduction.preset_config("quick")))
    assert (reproduction.fingerprint(reproduction.preset_config("quick"))
            != reproduction.fingerprint(reproduction.preset_config("cpu")))


@pytest.mark.parametrize("kwargs, match", [
    (dict(preset="huge"), "preset"),
    (dict(preset="quick", parts=("cifar",)), "cifar"),
    (dict(preset="quick", parts=()), "parts"),
    (dict(preset="quick", parts="fashion_mnist"), "parts"),
])
def test_bad_arguments_are_refused(kwargs, match):
    preset = kwargs.pop("preset")
    with pytest.raises((ValueError, TypeError), match=match):
        reproduction.preset_config(preset, **kwargs)


def test_bad_flags_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "never"
    with flagsaver.flagsaver(output_dir=str(out), preset="quick",
                             parts=["fashion_mnist", "cifar"]):
        with pytest.raises(lf.FlagError, match="cifar"):
            reproduce.main(["reproduce"])
    assert not out.exists()
    # --preset=cpu belongs to launch.reproduce alone.
    with flagsaver.flagsaver(output_dir=str(out), preset="cpu"):
        with pytest.raises(lf.FlagError, match="launch.reproduce"):
            gradient_study.main(["gradient_study"])
    assert not out.exists()


def test_a_half_moons_only_study_needs_a_grid():
    with pytest.raises(ValueError, match="nothing to run"):
        GradientStudyConfig(moons_widths=(), moons_train_sizes=(),
                            image_dataset=None).validate()
    with pytest.raises(ValueError, match="both be empty"):
        GradientStudyConfig(moons_widths=(4,), moons_train_sizes=(),
                            image_dataset=None).validate()
