"""spurfast.bench.compiled and benchmarks/compile_overhead.py at quick sizes on CPU: the JSON's
fields, the compiled statistics against eager's, dynamo's graph breaks and recompiles as
strings; no test asserts on a timing."""
import doctest
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from spurfast.bench import compiled

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
STEP_FIELDS = {"median_ms", "q1_ms", "q3_ms", "iqr_ms", "repeats", "runs_ms"}
RATIO_FIELDS = {"median", "q1", "q3", "iqr", "rounds"}
EVENT_FIELDS = {"frames_started", "graphs_compiled", "graph_breaks", "graph_break_reasons", "recompiles",
                "recompile_reasons"}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compile_overhead", BENCHMARKS / "compile_overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compile_overhead"] = module
    spec.loader.exec_module(module)
    return module


def _check_entry(entry, layers):
    assert entry.get("error") is None, entry.get("error")
    assert entry["num_tracked_layers"] == len(entry["layer_names"]) == layers
    assert set(entry["first_call_s"]) == {"compiled_record", "compiled", "compiled_record_after_compiled",
                                          "eager", "eager_record"}
    assert all(isinstance(v, float) and v >= 0 for v in entry["first_call_s"].values())
    assert set(entry["steps"]) == set(compiled.VARIANTS) and set(entry["steps_before_record"]) == {"eager", "compiled"}
    for row in list(entry["steps"].values()) + list(entry["steps_before_record"].values()):
        assert set(row) >= STEP_FIELDS
    assert set(entry["ratios"]) == {f"{a}/{b}" for a, b in compiled.RATIOS} | {"compiled_before_record/eager"}
    assert all(set(r) >= RATIO_FIELDS and r["median"] > 0 for r in entry["ratios"].values())
    dynamo = entry["dynamo"]
    for key in ("first_compiled_record", "first_compiled", "first_record_after_compiled", "timed_steps",
                "timed_steps_before_record"):
        assert set(dynamo[key]) == EVENT_FIELDS, key
    assert dynamo["recompiled_during_timed_steps"] is False
    assert dynamo["first_compiled"]["graph_breaks"] == 0  # outside record the model compiles whole
    # inside record: one break per tracked layer call, each spurfast's torch.compiler.disable'd forward
    breaks = entry["graph_breaks"]
    assert breaks["count"] >= 1 and breaks["reasons"] and all(isinstance(r, str) for r in breaks["reasons"])
    for reason in dynamo["first_compiled_record"]["graph_break_reasons"]:
        assert isinstance(reason["reason"], str) and "torch.compiler.disable" in reason["reason"]
        assert isinstance(reason["site"], str) and reason["count"] >= 1
    assert sum(r["count"] for r in dynamo["first_compiled_record"]["graph_break_reasons"]) == breaks["count"]
    # entering record on a model compiled outside it recompiles, on the forward the block installs
    guards = [g for r in dynamo["first_record_after_compiled"]["recompile_reasons"] for g in r["guard_failures"]]
    assert any("'forward'" in g for g in guards), guards
    assert all(isinstance(g, str) for g in guards)
    explained = dynamo["explain_in_record"]
    assert {"graph_count", "graph_break_count", "op_count", "break_reasons"} <= set(explained)
    assert all(isinstance(r["reason"], str) for r in explained["break_reasons"])
    assert set(entry["compiled_code_run_per_step"]) == {"compiled_before_record", "compiled_record",
                                                        "compiled_after_record"}
    exact = entry["exactness"]
    assert exact["recorded_steps"] >= 3
    assert set(exact["max_rel_diff"]) == set(compiled.EXACT_TABLES) | {"weight_grad"}
    assert exact["max_rel_diff_grad_sq_sum"] == exact["max_rel_diff"]["grad_sq_sum"]
    for table, diff in exact["max_rel_diff"].items():
        assert diff < 1e-5, (table, diff)


def test_quick_run_with_inductor_writes_the_expected_json(script, tmp_path, capsys):
    out = tmp_path / "compile.json"
    script.main(["--quick", "--models", "mlp", "--out", str(out)])  # inductor, from an empty cache
    data = json.loads(out.read_text())
    assert data["benchmark"] == "compile_overhead"
    assert data["command"] == data["environment"]["command"]
    assert data["command"].startswith("python benchmarks/compile_overhead.py --quick")
    assert data["environment"]["torch"] == torch.__version__ and data["machine"]["cpu_count"] >= 1
    assert data["settings"]["backend"] == "inductor" and data["settings"]["quick"] is True
    entry = data["results"]["mlp"]
    _check_entry(entry, layers=3)
    # an nn.Sequential: the break sits in its loop, so inside record the whole forward runs eagerly
    assert entry["compiled_code_run_per_step"]["compiled_before_record"]["graphs"] == 1
    assert entry["compiled_code_run_per_step"]["compiled_record"]["graphs"] == 0
    table = capsys.readouterr().out
    assert "| mlp | 4 | 3 |" in table and "Graph breaks dynamo logged" in table
    script.main(["--render", str(out)])
    assert capsys.readouterr().out.strip() == compiled.render(data).strip()


def test_cnn_breaks_once_per_tracked_layer_and_matches_eager():
    # aot_eager: dynamo's graph breaks and AOTAutograd's graphs as with inductor, without its codegen time
    data = compiled.measure(compiled.Settings(models=["cnn"], quick=True, backend="aot_eager", warmup=0, repeats=2))
    entry = data["results"]["cnn"]
    _check_entry(entry, layers=7)
    assert entry["graph_breaks"]["count"] == 7  # conv1, two convs per block, the shortcut conv, fc
    sites = {r["site"].split(":")[0] for r in entry["dynamo"]["first_compiled_record"]["graph_break_reasons"]}
    assert "spurfast/bench/models.py" in sites  # inside BasicBlock.forward: the user's code, resumed there
    ran = entry["compiled_code_run_per_step"]
    assert ran["compiled_before_record"]["graphs"] == 1 and ran["compiled_record"]["graphs"] > 1


def test_default_out_is_a_fresh_run_folder(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script.main(["--quick", "--models", "mlp", "--backend", "eager", "--repeats", "1", "--warmup", "0"])
    written = list(tmp_path.glob("runs/compile_overhead-*/compile_*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["results"]["mlp"].get("error") is None


def test_bad_arguments_exit_naming_the_flag(script, capsys):
    for argv, flag in ((["--models", "resnet19"], "--models"), (["--repeats", "0"], "--repeats")):
        with pytest.raises(SystemExit):
            script.main(argv)
        assert flag in capsys.readouterr().err


def test_parsers_of_dynamo_messages():
    short = ("Graph break (user stack suppressed due to duplicate graph break) in user code at "
             "/x/site-packages/torch/nn/modules/module.py:1789\nGraph Break Reason: Skip calling "
             "`torch.compiler.disable()`d function\n  Explanation: Skip calling function `<function f at 0x7f00>` "
             "since it was wrapped\n  Hint: Remove the `torch.compiler.disable` call")
    parsed = compiled.parse_graph_break(short)
    assert parsed["site"] == "torch/nn/modules/module.py:1789" and "0x7f00" not in parsed["reason"]
    assert parsed["reason"].startswith("Skip calling `torch.compiler.disable()`d function Explanation:")
    recompile = ("Recompiling function forward in /x/site-packages/torch/nn/modules/container.py:250\n"
                 "    triggered by the following guard failure(s):\n"
                 "    - 0/0: not ___dict_contains('forward', self._modules['1'].__dict__)  # input = module(input)\n")
    assert compiled.parse_recompile(recompile) == {
        "function": "forward (torch/nn/modules/container.py:250)",
        "guard_failures": ["not ___dict_contains('forward', self._modules['1'].__dict__)"]}


def test_docstring_examples():
    assert doctest.testmod(compiled, optionflags=doctest.ELLIPSIS).failed == 0
