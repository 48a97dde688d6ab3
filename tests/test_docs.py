"""The README's quick start and the docstring examples run and say what they claim."""
import doctest
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCTEST_MODULES = [
    "spurfast._extension",
    "spurfast.capture",
    "spurfast.ops.linear_grad_stats",
    "spurfast.ops.conv_grad_stats",
    "spurfast.ops.activation_stats",
    "spurfast.attribution.scores",
    "spurfast.attribution.localize",
    "spurfast.attribution.influence",
    "spurfast.attribution.interventions",
    "spurfast.attribution.trace",
    "spurfast.data.synth",
    "spurfast.data.patterns",
    "spurfast.data.transforms",
    "spurfast.metrics",
    "spurfast.train.erm",
    "spurfast.train.checkpoints",
]


def test_readme_quick_start_runs(capsys):
    text = (ROOT / "README.md").read_text()
    quick_start = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick_start, re.S).group(1)
    exec(compile(code, "README quick start", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "['0', '4']"
    assert out[1] == "torch.Size([32, 16])"


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
