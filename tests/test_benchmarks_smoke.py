"""Smoke tests of benchmarks/: the scripts run on CPU at tiny sizes and write complete JSON.

They check plumbing and the per-sample norm conventions (every peer's grad_sq must equal
spurfast's), not speed; the real runs are on a GPU (benchmarks/README_gpu.md).
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ROW_FIELDS = {"time_ms_median", "time_ms_iqr", "samples_per_s", "peak_mem_bytes", "ratio_to_plain",
              "mem_ratio_to_plain", "max_rel_err", "error"}
TINY_RUN = ["--device", "cpu", "--models", "mlp", "--batch-size", "4", "--tiny", "--warmup", "1", "--repeats", "2"]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scoring():
    return _load("scoring_throughput")


@pytest.fixture(scope="module")
def gemm(scoring):
    assert sys.modules["scoring_throughput"] is scoring  # what its sibling import finds
    saved_path = list(sys.path)
    try:
        return _load("gemm_efficiency")
    finally:
        sys.path[:] = saved_path


def test_scoring_tiny_mlp_writes_complete_json(scoring, tmp_path):
    out = tmp_path / "scoring.json"
    scoring.main(TINY_RUN + ["--methods", "spurfast,plain,func", "--out", str(out)])
    data = json.loads(out.read_text())
    env = data["environment"]
    for key in ("device", "torch", "triton", "cuda", "build_info", "spurfast"):
        assert key in env
    assert env["torch"] == torch.__version__
    entry = data["results"]["mlp"]
    assert entry["batch_size"] == 4 and entry["reference_method"] == "spurfast"
    assert entry["num_tracked_layers"] == 3
    rows = entry["methods"]
    assert list(rows) == ["spurfast", "plain", "func"]
    for method, row in rows.items():
        assert set(row) >= ROW_FIELDS, method
        assert row["error"] is None, (method, row["error"])
        assert row["time_ms_median"] > 0 and row["samples_per_s"] > 0
        assert row["peak_mem_bytes"] is None  # CPU: no per-method peak
    assert rows["plain"]["ratio_to_plain"] == pytest.approx(1.0)
    assert rows["plain"]["max_rel_err"] is None
    assert rows["spurfast"]["max_rel_err"] == 0.0
    assert rows["func"]["max_rel_err"] < 1e-3


@pytest.mark.parametrize("method,package", [("opacus", "opacus"), ("backpack", "backpack")])
def test_scoring_peers_agree_with_spurfast(scoring, tmp_path, method, package):
    pytest.importorskip(package)
    out = tmp_path / "scoring.json"
    scoring.main(TINY_RUN + ["--methods", f"spurfast,{method}", "--out", str(out)])
    row = json.loads(out.read_text())["results"]["mlp"]["methods"][method]
    assert row["error"] is None, row["error"]
    # Checks the mean-reduction rescaling: both peers must give gradients of l_n, not l_n / B.
    assert row["max_rel_err"] < 1e-3


def test_scoring_records_method_errors(scoring, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("peer exploded")

    monkeypatch.setitem(scoring.SETUPS, "func", broken)
    out = tmp_path / "scoring.json"
    scoring.main(TINY_RUN + ["--methods", "plain,func,spurfast", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["mlp"]["methods"]
    assert rows["func"]["error"] == "RuntimeError: peer exploded"
    assert rows["func"]["time_ms_median"] is None
    assert rows["spurfast"]["error"] is None and rows["spurfast"]["max_rel_err"] == 0.0


def test_scoring_render_table(scoring, tmp_path, capsys):
    out = tmp_path / "scoring.json"
    scoring.main(TINY_RUN + ["--methods", "spurfast,plain", "--out", str(out)])
    capsys.readouterr()
    scoring.main(["--render", str(out)])
    table = capsys.readouterr().out
    assert "| model | B | method |" in table
    assert "| mlp | 4 | spurfast |" in table and "| mlp | 4 | plain |" in table


def test_gemm_tiny_writes_json(gemm, tmp_path):
    from spurfast._extension import load_extension

    backend = "cpp" if load_extension() is not None else "torch"
    out = tmp_path / "gemm.json"
    gemm.main(["--device", "cpu", "--tiny", "--backend", backend, "--warmup", "1", "--repeats", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["settings"]["backend"] == backend and data["environment"]["torch"] == torch.__version__
    assert len(data["results"]) == len(gemm.tiny_shapes())
    for row in data["results"]:
        assert row["error"] is None, row["error"]
        assert row["cublas"]["ms"] > 0
        assert set(row["spurfast"]) >= {"auto", "direct", "gram"}
        for entry in row["spurfast"].values():
            assert entry["error"] is None and entry["ratio"] > 0
        assert row["max_rel_err_dw"] < 1e-4
    assert "| tiny | conv3x3 |" in gemm.render_table(data)


def test_gemm_shapes_are_the_models_layers(gemm, scoring):
    """The hand-written shape list holds exactly the distinct layer calls of the benchmark's models."""
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    listed, seen = set(), set()
    for shape in gemm.default_shapes():
        if shape.is_conv:
            listed.add((shape.model, shape.in_channels, shape.out_channels, shape.height, shape.kernel, shape.stride,
                        shape.padding, shape.batch))
        else:
            listed.add((shape.model, shape.in_channels, shape.out_channels, shape.tokens, shape.batch))
    for name, spec in scoring.MODEL_SPECS.items():
        model = scoring.prepare_model(spec["build"](False))

        def hook(module, inputs, output, name=name):
            x = inputs[0]
            if isinstance(module, torch.nn.Conv2d):
                seen.add((name, module.in_channels, module.out_channels, x.shape[2], module.kernel_size[0],
                          module.stride[0], module.padding[0], spec["batch"]))
            else:
                seen.add((name, module.in_features, module.out_features, x[0].numel() // x.shape[-1], spec["batch"]))

        for _, layer in scoring.tracked_layers(model):
            layer.register_forward_hook(hook)
        with torch.no_grad():
            model(torch.randn((1,) + tuple(spec["shape"](False))))
    assert listed == seen


@pytest.mark.parametrize("model", ["small_cnn", "mlp"])
def test_memorization_tiny_summarizes_every_setting(model, tmp_path, one_thread):
    memo = _load("memorization_synth")
    out = tmp_path / "m.json"
    data = memo.main(["--tiny", "--model", model, "--modes", "random_init", "zero", "--sigmas", "init", "0.01",
                      "--ks", "1", "2", "--oracle", "--out", str(out), "--threads", "1"])
    assert json.loads(out.read_text())["summary"] == data["summary"]
    # every (target, mode, sigma, k, split) appears once; deterministic modes carry no sigma
    keys = [(s["target"], s["mode"], s["sigma"], s["k"], s["split"]) for s in data["summary"]]
    settings = [("random_init", "init"), ("random_init", 0.01), ("zero", None)]
    assert sorted(keys, key=str) == sorted(
        [(t, m, sg, k, sp) for t in (1, 2) for m, sg in settings for k in (1, 2) for sp in ("train", "test")], key=str)
    for s in data["summary"]:
        claim = (s["target_drop"] >= 10 and s["target_drop"] >= 3 * max(s["majority_drop"].values())
                 and s["target_drop"] >= 3 * s["control_target_drop"])
        assert s["claim_met"] == claim
    assert set(data["claim_met_any_k_le_3"]) == {
        f"{t}/{m}{'' if sg is None else f'/sigma={sg}'}/{sp}" for t in (1, 2) for m, sg in settings
        for sp in ("train", "test")}
    assert 0.0 <= data["self_influence_auroc"]["mean"] <= 1.0
    # the oracle zeroes every eligible unit: all conv channels / hidden neurons, not the classifier
    eligible = 4 + 8 + 16 + 16 if model == "small_cnn" else 16 + 16
    for target in (1, 2):
        o = data["runs"][0]["oracle"][target]
        assert o["units"] == eligible and 0 <= o["group_specific_units"] <= eligible
        assert len(o["score_top3"]) == 3
