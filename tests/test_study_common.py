"""The study output writer: atomic results, tables, figures."""

import json

import pytest

from tfp_bnn_adv.studies import common


def test_tables_render_exactly():
    md = common.markdown_table(["a", "b"], [["x", 0.12345], ["y", None]])
    assert md == "| a | b |\n|---|---|\n| x | 0.123 |\n| y |  |\n"
    txt = common.format_table(["name", "v"], [["long name", 1.0]])
    assert txt.splitlines()[0] == "name       v    "
    assert txt.splitlines()[2] == "long name  1.000"


def test_results_merge_and_survive_reopening(tmp_path):
    out = common.StudyOutput(str(tmp_path), "t")
    out.update({"test/accuracy": 0.5})
    out.update({"test/adv_accuracy/pgd/expected": 0.25, "note": "x"})
    again = common.StudyOutput(str(tmp_path), "t")
    assert again.results == {"test/accuracy": 0.5, "note": "x",
                             "test/adv_accuracy/pgd/expected": 0.25}
    assert json.loads((tmp_path / "results.json").read_text()) == again.results
    assert list((tmp_path / "tensorboard").iterdir())  # scalars were written
    md = out.table("t", ["k", "v"], [["a", 1]], note="n")
    assert (tmp_path / "t.csv").read_bytes() == b"k,v\r\na,1\r\n"
    assert md.endswith("\nn\n")
    plt = common.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = out.save_figure(fig, "line")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="output_dir"):
        common.StudyOutput("", "t")
