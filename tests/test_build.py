"""BUILD covers every module, test and script, and its targets are consistent.

Bazel cannot fetch its Python rules offline here, so this test stands in for
``bazel query``: it parses the BUILD file and checks that every library
module has a ``py_library``, every test module a ``py_test``, every launch and
bench script a ``py_binary``, that every file named exists, and that every
local dependency names a real target.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_RULE = re.compile(r"^(py_library|py_test|py_binary)\(\n(.*?)^\)", re.M | re.S)


def _rules():
    text = (ROOT / "BUILD").read_text()
    rules = []
    for kind, body in _RULE.findall(text):
        fields = {}
        for key in ("name", "main"):
            m = re.search(rf'^\s*{key}\s*=\s*"([^"]+)"', body, re.M)
            fields[key] = m.group(1) if m else None
        for key in ("srcs", "deps", "data"):
            m = re.search(rf"^\s*{key}\s*=\s*(\[.*?\])", body, re.M | re.S)
            value = re.sub(r'requirement\("([^"]+)"\)', r'"@pypi//\1"',
                           m.group(1)) if m else "[]"
            fields[key] = ast.literal_eval(value)
        rules.append((kind, fields))
    return rules


RULES = _rules()


def _targets(kind):
    return {f["name"]: f for k, f in RULES if k == kind}


def _srcs(kind):
    return {s for k, f in RULES if k == kind for s in f["srcs"]}


def _py_files(directory, pattern="*.py"):
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / directory).rglob(pattern)
                  if "__pycache__" not in p.parts)


def test_build_file_parses_into_rules():
    assert RULES, "no py_library/py_test/py_binary rules found in BUILD"
    names = [f["name"] for _, f in RULES]
    assert len(names) == len(set(names)), "duplicate target names in BUILD"


@pytest.mark.parametrize("module", _py_files("tfp_bnn_adv"))
def test_every_package_module_has_a_library(module):
    assert module in _srcs("py_library"), f"{module} has no py_library in BUILD"


@pytest.mark.parametrize("module", _py_files("tests", "test_*.py"))
def test_every_test_module_has_a_py_test(module):
    assert module in _srcs("py_test"), f"{module} has no py_test in BUILD"


@pytest.mark.parametrize("script", [
    s for s in _py_files("launch") + _py_files("bench")
    if not s.endswith("__init__.py") and not s.endswith("common.py")
    and not s.endswith("flags.py")])
def test_every_script_has_a_binary(script):
    assert script in _srcs("py_binary"), f"{script} has no py_binary in BUILD"


def test_every_named_file_exists_and_every_local_dep_resolves():
    names = {f["name"] for _, f in RULES}
    for kind, f in RULES:
        for src in f["srcs"] + f["data"]:
            assert (ROOT / src).exists(), f"{kind} {f['name']}: {src} missing"
        for dep in f["deps"]:
            assert dep.startswith((":", "@pypi//")), f"{f['name']}: odd dep {dep}"
            if dep.startswith(":"):
                assert dep[1:] in names, f"{f['name']} depends on unknown {dep}"
