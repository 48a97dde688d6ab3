"""The scoring profile: every layer's phases add up to its profiler scope, the scopes name the
user's layers, and the benchmark script writes its JSON and table."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import spurfast as sf
from spurfast.bench.profile import PHASES, phase_times

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_phases_add_up_to_each_layer_scope(backend, one_thread):
    torch.manual_seed(0)
    # 16 input channels: the stride-1 conv takes the im2col-free path; at 12x12 the per-sample
    # products (direct) cost less than the Gram path with its deferred group sums
    model = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12 * 12, 5))
    stats = sf.NeuronStats(model, num_groups=3, backend=backend)
    x, y, g = torch.randn(10, 16, 12, 12), torch.randint(0, 5, (10,)), torch.arange(10) % 3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with stats.record(g):
            F.cross_entropy(model(x), y).backward()
    events = prof.events()
    layers = phase_times(events)
    assert set(layers) == {"0", "3"}
    for name, phases in layers.items():
        assert set(phases) <= set(PHASES), phases
        scope = sum(e.cpu_time_total for e in events if e.name == f"spurfast.backward:{name}") / 1e3
        forward = sum(e.cpu_time_total for e in events if e.name == f"spurfast.activations:{name}") / 1e3
        assert sum(phases.values()) == pytest.approx(scope + forward, rel=1e-6, abs=1e-6)
        assert phases.get("activation statistics", 0) > 0, phases
        if backend == "cpp":  # the registered ops the phases are read from (the reference is plain torch)
            assert phases.get("removal effect", 0) > 0, phases
            assert phases.get("GEMMs", 0) > 0 and phases.get("fused reduction", 0) > 0, phases
    if backend == "cpp":
        # the conv's per-sample products give its group sums and dW (no patch matrix: stride 1);
        # the Linear (one token per sample) defers its group sums
        assert layers["0"].get("dW", 0) > 0 and layers["0"].get("im2col", 0) == 0, layers["0"]
        assert layers["3"].get("deferred group sums", 0) > 0, layers["3"]
    stats.remove()


def test_scopes_cost_nothing_visible_without_a_profiler(one_thread):
    """The scopes change no statistic: the same numbers as before them (the reference backend)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y, g = torch.randn(8, 6), torch.randint(0, 3, (8,)), torch.arange(8) % 2
    stats = sf.NeuronStats(model, num_groups=2, backend="torch")
    with stats.record(g):
        F.cross_entropy(model(x), y).backward()
    want = torch.func.vmap(torch.func.grad(lambda p, xi, yi: F.cross_entropy(
        torch.func.functional_call(model, p, (xi[None],)), yi[None])), in_dims=(None, 0, 0))(
        {k: v.detach() for k, v in model.named_parameters()}, x, y)
    assert torch.allclose(stats.last_grad_sq["0"], want["0.weight"].square().sum(-1), rtol=1e-4, atol=1e-7)


def test_benchmark_quick_writes_json_and_table(tmp_path, one_thread):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import scoring_profile
    finally:
        sys.path.pop(0)
    data = scoring_profile.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "scoring_profile.json").read_text())
    row = saved["models"]["mlp_small"]
    assert row["ratio"] > 0 and row["plain_ms"] > 0 and set(row["layers"]) == {"1", "3", "5"}
    assert all(layer["plain_dW_ms"] > 0 and layer["phases_ms"] for layer in row["layers"].values())
    assert "| layer | weight |" in (tmp_path / "scoring_profile.md").read_text()
    assert data["models"].keys() == saved["models"].keys()
