"""spurfast.train.example_tied: seeded per-example channels, train/test behaviour, index sources, hook
hygiene; spurfast.experiments.example_tied and benchmarks/example_tied.py --tiny (plumbing)."""
import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import spurfast.train.example_tied as etd_module
from spurfast.attribution import ablation_oracle
from spurfast.experiments.example_tied import ExampleTiedConfig, default_unit_layer
from spurfast.models import SmallCNN
from spurfast.train import erm
from spurfast.train.example_tied import ExampleTiedDropout

ROOT = Path(__file__).resolve().parents[1]


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(num_classes=2, width=4)


def test_generalist_and_memorization_channels_partition_each_layer():
    model = small_cnn()
    etd = ExampleTiedDropout(model, ["features.bn3", "features.bn4"], generalist=0.2, p=0.1, seed=0)
    assert etd.channels == {"features.bn3": 16, "features.bn4": 16}
    assert etd.generalist_channels() == {"features.bn3": [0, 1, 2], "features.bn4": [0, 1, 2]}  # round(3.2)
    for n in etd.channels:
        assert sorted(etd.generalist_channels()[n] + etd.memorization_channels()[n]) == list(range(16))
        assert set(etd.channels_of(5)[n]) <= set(etd.memorization_channels()[n])
    etd.remove()


def test_draws_depend_on_seed_and_example_only_and_have_rate_p():
    model = small_cnn()
    a = ExampleTiedDropout(model, {"features.relu4": 16}, generalist=0.25, p=0.3, seed=7)
    b = ExampleTiedDropout(model, {"features.relu4": 16}, generalist=0.25, p=0.3, seed=7)
    c = ExampleTiedDropout(model, {"features.relu4": 16}, generalist=0.25, p=0.3, seed=8)
    b.channels_of(999)  # a different order of queries does not change anything
    assert all(a.channels_of(i) == b.channels_of(i) for i in range(50))
    assert any(a.channels_of(i) != c.channels_of(i) for i in range(50))
    on = a.masks(torch.arange(2000))["features.relu4"][:, 4:]  # [N, 12] memorization channels
    assert abs(on.double().mean().item() - 0.3) < 0.03  # 24000 Bernoulli(0.3) draws: sd 0.003
    assert bool(a.masks(torch.arange(10))["features.relu4"][:, :4].all())
    for etd in (a, b, c):
        etd.remove()


def test_train_forward_uses_each_examples_channels_and_eval_drops_them():
    model = small_cnn()
    etd = ExampleTiedDropout(model, ["features.bn4"], generalist=0.2, p=0.5, seed=1)
    seen = {}
    handle = model.features.relu4.register_forward_hook(lambda m, i, o: seen.update(out=o.detach().clone()))
    x = torch.randn(4, 3, 16, 16)
    indices = torch.tensor([3, 10, 3, 42])
    model.train()
    with etd.examples(indices):
        model(x)
    active = seen["out"].abs().flatten(2).sum(2) > 0  # [B, C] channels with any output
    for row, i in enumerate(indices.tolist()):
        allowed = set(etd.generalist_channels()["features.bn4"]) | set(etd.channels_of(i)["features.bn4"])
        assert set(active[row].nonzero().flatten().tolist()) <= allowed
    model.eval()
    model(x)
    active = seen["out"].abs().flatten(2).sum(2) > 0
    assert not active[:, 3:].any()  # test time: only the generalist channels 0..2
    model.train()
    with pytest.raises(RuntimeError, match="train mode without example indices"):
        model(x)
    with pytest.raises(ValueError, match="batch of 4 samples but 3 example indices"):
        with etd.examples(torch.tensor([1, 2, 3])):
            model(x)
    handle.remove()
    etd.remove()


def test_gradients_of_dropped_channels_are_zero_for_that_example():
    model = small_cnn()
    etd = ExampleTiedDropout(model, ["features.bn4"], generalist=0.2, p=0.3, seed=2)
    model.train()
    x, y = torch.randn(1, 3, 16, 16), torch.tensor([1])
    with etd.examples(torch.tensor([17])):
        F.cross_entropy(model(x), y).backward()
    on = set(etd.generalist_channels()["features.bn4"]) | set(etd.channels_of(17)["features.bn4"])
    grad_rows = model.features.conv4.weight.grad.flatten(1).abs().sum(1)  # [16]
    off = [c for c in range(16) if c not in on]
    assert off and torch.all(grad_rows[off] == 0)
    assert torch.all(grad_rows[sorted(on)] > 0)
    etd.remove()


def test_indexed_inputs_equal_explicit_examples_and_serve_erm_and_the_oracle():
    model = small_cnn()
    etd = ExampleTiedDropout(model, ["features.bn3", "features.bn4"], p=0.3, seed=3)
    x = torch.randn(6, 3, 16, 16)
    indices = torch.tensor([5, 0, 9, 5, 2, 7])
    model.eval()
    with etd.examples(indices):
        explicit = model(x)
    with etd.indexed_inputs():
        implicit = model(etd.with_index_channel(x, indices))
    torch.testing.assert_close(implicit, explicit)
    with pytest.raises(ValueError, match="does not hold example indices"):
        with etd.indexed_inputs():
            model(torch.cat([x, torch.rand(6, 1, 16, 16)], 1))
    # the oracle replicates inputs, index channel included: its "before" is the tied model's accuracy
    data = (etd.with_index_channel(x, indices), torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([0, 1, 2, 3, 0, 1]))
    with etd.indexed_inputs():
        found = ablation_oracle(model, data, 4, [("features.conv4", 5), ("features.conv3", 1)])
    right = (explicit.argmax(1) == data[1]).double()
    torch.testing.assert_close(found.acc_before[0], right[data[2] == 0].mean())
    etd.remove()


def test_erm_under_indexed_inputs_trains_with_tied_channels():
    from spurfast.data.specs import TensorGroupDataset

    model = small_cnn()
    etd = ExampleTiedDropout(model, ["features.bn4"], p=0.2, seed=0)
    x, y, g = torch.randn(32, 3, 16, 16), torch.randint(0, 2, (32,)), torch.arange(32) % 4
    data = TensorGroupDataset(etd.with_index_channel(x), y, g, 4)
    with etd.indexed_inputs():
        history = erm(model, data, epochs=1, lr=0.01, batch_size=16, progress=False)
    assert len(history) == 1 and history[0]["loss"] == history[0]["loss"]
    with pytest.raises(RuntimeError, match="without example indices"):
        erm(model, TensorGroupDataset(x, y, g, 4), epochs=1, lr=0.01, batch_size=16, progress=False)
    etd.remove()


def test_hooks_are_removed_cleanly_and_validation_happens_first():
    model = small_cnn()
    hooks_before = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="'features.bn9' is not a submodule"):
        ExampleTiedDropout(model, ["features.bn4", "features.bn9"])
    with pytest.raises(ValueError, match="cannot tell how many channels 'features.relu4'"):
        ExampleTiedDropout(model, ["features.relu4"])
    with pytest.raises(ValueError, match="p must be a number in \\[0, 1\\]"):
        ExampleTiedDropout(model, ["features.bn4"], p=1.5)
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks_before
    with ExampleTiedDropout(model, ["features.bn4"]) as etd:
        with pytest.raises(RuntimeError, match="boom"):
            with etd.indexed_inputs():
                raise RuntimeError("boom")
        assert len(model._forward_pre_hooks) == 0 and len(model.features.bn4._forward_hooks) == 1
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks_before
    with pytest.raises(RuntimeError, match="was removed"):
        with etd.examples(torch.tensor([0])):
            pass
    model.train()
    model(torch.randn(2, 3, 16, 16))  # a plain model again
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        ExampleTiedDropout(model, ["features.bn4"]).masks(torch.tensor([0.5]))


def test_tie_counts_and_default_unit_layers():
    model = small_cnn()
    etd = ExampleTiedDropout(model, ["features.bn4"], p=0.5, seed=4)
    counts = etd.tie_counts(torch.tensor([1, 2, 3]))["features.bn4"]
    expected = torch.zeros(16, dtype=torch.int64)
    for i in (1, 2, 3):
        expected[etd.channels_of(i)["features.bn4"]] += 1
    assert torch.equal(counts, expected)
    assert default_unit_layer("features.bn3") == "features.conv3" and default_unit_layer("fc1") == "fc1"
    assert ExampleTiedConfig(layers=["features.bn4"]).unit_layers == {"features.bn4": "features.conv4"}
    with pytest.raises(ValueError, match="scores: unknown"):
        ExampleTiedConfig(scores=["nope"])
    etd.remove()


def test_docstring_examples():
    result = doctest.testmod(etd_module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_benchmark_tiny_writes_results_and_tables(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "example_tied.py"), "--tiny", "--threads", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    seed = results["seeds"][0]
    assert set(seed["erm"]) == {"train_group_acc", "test_group_acc", "gap"}
    assert len(seed["example_tied"]["gap"]) == results["data"]["num_groups"]
    for score in results["config"]["scores"]:
        assert set(seed["localization"][score]) == {str(t) for t in results["data"]["minority"]}
    tables = (tmp_path / "tables.md").read_text()
    assert "| ERM | 0 |" in tables and "AUROC tied vs rest" in tables
