"""The README runs as pasted, its tables are what the committed results render to, and the
docstring examples run and say what they claim."""
import doctest
import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCTEST_MODULES = [
    "spurfast._extension",
    "spurfast.capture",
    "spurfast.masks",
    "spurfast.ops.linear_grad_stats",
    "spurfast.ops.conv_grad_stats",
    "spurfast.ops.group_grad",
    "spurfast.ops.group_row_sums",
    "spurfast.ops.activation_stats",
    "spurfast.ops.ablation_stats",
    "spurfast.ops.masked_step",
    "spurfast.optim",
    "spurfast.bench.masked_step",
    "spurfast.bench.profile",
    "spurfast.bench.sweep",
    "spurfast.bench.models",
    "spurfast.attribution.scores",
    "spurfast.attribution.objectives",
    "spurfast.attribution.ablation",
    "spurfast.attribution.oracle",
    "spurfast.attribution.verify",
    "spurfast.attribution.localize",
    "spurfast.attribution.influence",
    "spurfast.attribution.interventions",
    "spurfast.attribution.trace",
    "spurfast.data.synth",
    "spurfast.data.textured",
    "spurfast.rare.patterns",
    "spurfast.rare.influence",
    "spurfast.rare.localize",
    "spurfast.data.fashion",
    "spurfast.experiments.rare",
    "spurfast.experiments.rare_deletion",
    "spurfast.experiments.rare_runner",
    "spurfast.report.rare",
    "spurfast.data.transforms",
    "spurfast.data.specs",
    "spurfast.metrics",
    "spurfast.losses",
    "spurfast.train.erm",
    "spurfast.train.silent_majority",
    "spurfast.train.dfr",
    "spurfast.experiments.framework_study",
    "spurfast.train.checkpoints",
    "spurfast.train.example_tied",
    "spurfast.report.runs",
    "spurfast.integrations.lightning",
    "spurfast.integrations.huggingface",
]


def readme_python_blocks():
    """``(code, needs_real_data)`` of every ```python block, with its heading as id.

    On the line before a block, ``<!-- test: slow -->`` marks it slow, ``<!-- test: needs real
    data -->`` skips it where TexturedFashion's packages are missing and ``<!-- test: needs
    package lightning -->`` where that package is not installed (CI installs them all).
    """
    blocks = []
    for match in re.finditer(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)```", README, re.S):
        heading = [h for h in re.findall(r"^#+ (.*)$", README[: match.start()], re.M)][-1]
        before = match.group("before")
        marks = [pytest.mark.slow] if "<!-- test: slow" in before else []
        package = re.search(r"<!-- test: needs package ([\w.]+)", before)
        if package and importlib.util.find_spec(package.group(1)) is None:
            marks.append(pytest.mark.skip(reason=f"this block needs {package.group(1)}, which is not installed"))
        real = "<!-- test: needs real data" in before
        blocks.append(pytest.param(match.group("code"), real, id=heading, marks=marks))
    return blocks


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert first_block[:2] == ['pip install -e . && spurfast demo', 'pip install -e ".[test]" && python -m pytest -q tests']


@pytest.mark.parametrize("code, needs_real_data", readme_python_blocks())
def test_readme_python_block_runs_as_pasted(code, needs_real_data, tmp_path, monkeypatch):
    missing = _real_data_missing() if needs_real_data else None
    if missing:
        pytest.skip(f"this block needs TexturedFashion's local data: {missing}")
    monkeypatch.chdir(tmp_path)  # blocks that write files (checkpoints, plots) write them here
    exec(compile(code, "README block", "exec"), {"__name__": "__readme__"})


def test_readme_quick_start_prints_what_it_says(capsys):
    quick_start = README.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick_start, re.S).group(1)
    exec(compile(code, "README quick start", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "['0', '4']"
    assert out[1] == "torch.Size([32, 16])"


def test_readme_tables_are_the_committed_results():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "--check"],
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr


def _real_data_missing():
    """Why TexturedFashion cannot be built here (its doctest then skips), or None."""
    try:
        from spurfast.data.textured import load_fashion_mnist, load_texture

        load_texture("grass")
        load_fashion_mnist("t10k")
    except Exception as exc:  # a missing package or file: the error names the install command
        return str(exc)
    return None


def _fashion_mnist_missing():
    """Why the Fashion-MNIST files cannot be read here, or None."""
    try:
        from spurfast.data.textured import load_fashion_mnist

        load_fashion_mnist("t10k")
    except Exception as exc:  # the error names the apt package
        return str(exc)
    return None


def _package_missing(package):
    return lambda: None if importlib.util.find_spec(package) else f"{package} is not installed"


DOCTEST_NEEDS = {"spurfast.data.textured": _real_data_missing, "spurfast.data.fashion": _fashion_mnist_missing,
                 "spurfast.integrations.lightning": _package_missing("lightning"),
                 "spurfast.integrations.huggingface": _package_missing("transformers")}


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples(name):
    missing = DOCTEST_NEEDS.get(name, lambda: None)()
    if missing:
        pytest.skip(f"{name}'s examples need what is not here: {missing}")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0


def test_readme_table_regions_are_replaced_one_by_one():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import readme_tables
    finally:
        sys.path.pop(0)
    text = "a\n<!-- table: erm -->\n<!-- /table -->\nb\n<!-- table: nope -->\nold\n<!-- /table -->\nc\n"
    new, changed, unknown = readme_tables.update(text)
    assert changed == ["erm"] and unknown == ["nope"]
    assert new.startswith("a\n<!-- table: erm -->\n| seed |") and new.endswith("\nb\n<!-- table: nope -->\nold\n<!-- /table -->\nc\n")
