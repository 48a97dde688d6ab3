"""spurfast.train.silent_majority: features from one forward, the per-epoch mask, the dense/masked
step against a functional reference, the loop (checkpoints, bit-identical resume, the model's
state), and the ERM-vs-framework study's plumbing (benchmarks/silent_majority.py --tiny)."""
import copy
import importlib.util
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from spurfast.data import SynthWaterbirds
from spurfast.experiments.erm_study import InputNormalization
from spurfast.losses import dense_masked_loss, nt_xent
from spurfast.masks import Mask
from spurfast.models import MLP, SmallCNN
from spurfast.train import checkpoint_path, latest_checkpoint, load_checkpoint
from spurfast.train.silent_majority import (
    dense_masked_step,
    features_and_logits,
    find_classifier,
    gradient_stats,
    mask_path,
    refresh_mask,
    silent_majority,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return SynthWaterbirds("train", seed=0, n=96), SynthWaterbirds("test", seed=0, n=32)


def _small_cnn():
    torch.manual_seed(1)
    return SmallCNN(width=4)


def _dropout_cnn():
    # Dropout makes the run depend on the global RNG, which a checkpoint must carry.
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2),
    )


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, snapshot):
    state = model.state_dict()
    assert list(state) == list(snapshot)
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), k


def _no_hooks_left(model):
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks and not m._backward_hooks, type(m).__name__
        for name, _ in m.named_parameters(recurse=False):
            assert name not in vars(m), f"{type(m).__name__}.{name} is shadowed"


# ------------------------------------------------------------------ features and logits


def test_features_and_logits_are_the_classifier_input_and_the_output():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 32, 32)
    cnn = SmallCNN(width=4).eval()
    features, logits = features_and_logits(cnn, x)
    assert torch.equal(features, cnn.forward_features(x)) and torch.equal(logits, cnn(x))
    mlp = MLP(in_features=3 * 32 * 32, hidden=(8, 6))
    features, logits = features_and_logits(mlp, x)
    assert features.shape == (5, 6) and torch.equal(features, mlp.forward_features(x))
    wrapped = nn.Sequential(OrderedDict(normalize=InputNormalization((0.5,) * 3, (0.25,) * 3), net=cnn))
    assert find_classifier(wrapped)[0] == "net.classifier"
    features, _ = features_and_logits(wrapped, x)
    assert torch.allclose(features, cnn.forward_features((x - 0.5) / 0.25))
    _no_hooks_left(wrapped)
    # gradients flow through both
    features, logits = features_and_logits(cnn, x)
    (features.sum() + logits.sum()).backward()
    assert cnn.features.conv1.weight.grad is not None


def test_features_and_logits_needs_one_classifier_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.fc(x))

    model = Twice()
    with pytest.raises(RuntimeError, match="ran 2 times"):
        features_and_logits(model, torch.randn(2, 3))
    _no_hooks_left(model)
    with pytest.raises(ValueError, match="no nn.Linear"):
        find_classifier(nn.Sequential(nn.Conv2d(3, 2, 1)))
    with pytest.raises(ValueError, match="no submodule"):
        find_classifier(model, "head")
    with pytest.raises(ValueError, match="not a submodule"):
        find_classifier(model, nn.Linear(3, 3))
    assert find_classifier(model, model.fc) == ("fc", model.fc)


def test_features_and_logits_of_efficientnet_lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    from spurfast.models import efficientnet_lite0

    torch.manual_seed(0)
    model = efficientnet_lite0(num_classes=2, pretrained=False).eval()
    assert find_classifier(model)[0] == "_fc"
    features, logits = features_and_logits(model, torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 1280) and torch.allclose(logits, model._fc(features))
    # one framework step through every padded conv of the masked branch
    model.train()
    before = _snapshot(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = dense_masked_step(model, refresh_mask(model, 0.01), torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]),
                            optimizer, on="softmax")
    assert torch.isfinite(out.total)
    assert not torch.equal(model._conv_stem.conv.weight, before["_conv_stem.conv.weight"])
    _no_hooks_left(model)


# ------------------------------------------------------------------ the per-epoch mask


def _weights(model):
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_refresh_mask_selects_the_smallest_weights_globally():
    model = _small_cnn()
    before = _snapshot(model)
    mask = refresh_mask(model, fraction=0.01)
    total = sum(w.numel() for w in _weights(model))
    assert mask.count() == round(0.01 * total)
    assert mask.fraction() == pytest.approx(mask.count() / total)
    chosen, kept = [], []
    for name, p in model.named_parameters():
        if name in mask.entries:
            sel = mask.element_mask(name)
            chosen.append(p.detach().abs()[sel])
            kept.append(p.detach().abs()[~sel])
    assert torch.cat(chosen).max() <= torch.cat(kept).min()
    assert len({n.rsplit(".", 1)[0] for n, e in mask.entries.items() if e.any()}) > 1  # global, several layers
    _assert_same_state(model, before)
    assert refresh_mask(model, fraction=0.0).count() == 0


def test_refresh_mask_adds_gradient_norm_channels(tiny):
    train, _ = tiny
    model = _small_cnn()
    stats = gradient_stats(model, train, batch_size=40)
    base = refresh_mask(model, 0.01)
    channels = Mask.top_gradient_channels(stats, 0.1).to_elements()
    both = refresh_mask(model, 0.01, stats=stats, channel_fraction=0.1)
    assert both == (base | channels)
    assert both.count() > base.count()
    assert refresh_mask(model, 0.01, stats=stats, channel_fraction=0.1, group=1) == (
        base | Mask.top_gradient_channels(stats, 0.1, group=1).to_elements())
    with pytest.raises(ValueError, match="needs stats"):
        refresh_mask(model, 0.01, channel_fraction=0.1)
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="fraction"):
            refresh_mask(model, bad)


def test_gradient_stats_restores_grads_and_modes(tiny):
    train, _ = tiny
    model = _small_cnn()
    model.train()
    model.features.bn2.eval()  # a mixed state must come back as it was
    marker = torch.full_like(model.classifier.weight, 7.0)
    model.classifier.weight.grad = marker
    stats = gradient_stats(model, train, batch_size=40)
    assert stats.group_count.tolist() == train.group_counts().tolist()
    assert model.classifier.weight.grad is marker and model.features.conv1.weight.grad is None
    assert model.training and not model.features.bn2.training and model.features.bn1.training
    _no_hooks_left(model)


# ------------------------------------------------------------------ one step


@pytest.mark.parametrize("on", ["features", "logits", "softmax"])
def test_dense_masked_step_matches_a_functional_reference(on):
    torch.manual_seed(0)
    model = SmallCNN(width=4).double()
    reference = copy.deepcopy(model)
    x, y = torch.rand(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 2, (6,))
    mask = refresh_mask(model, 0.05)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    out = dense_masked_step(model, mask, x, y, optimizer, on=on, ce_weight=0.2, temperature=0.5)

    # Reference: two functional calls, the masked one on zeroed weights and on copies of the
    # buffers (BatchNorm uses batch statistics there but must not update the running ones).
    params = {n: p.detach().clone().requires_grad_() for n, p in reference.named_parameters()}
    buffers = dict(reference.named_buffers())
    masked_params = {n: torch.where(mask.element_mask(n), torch.zeros_like(p), p) if n in mask.entries else p
                     for n, p in params.items()}
    caught = []
    hook = reference.classifier.register_forward_pre_hook(lambda m, a: caught.append(a[0]))
    dense_logits = functional_call(reference, {**params, **buffers}, (x,))
    masked_logits = functional_call(reference, {**masked_params, **{k: v.clone() for k, v in buffers.items()}}, (x,))
    hook.remove()
    parts = dense_masked_loss(dense_logits, masked_logits, y, dense_features=caught[0], masked_features=caught[1],
                              on=on, ce_weight=0.2, temperature=0.5)
    grads = torch.autograd.grad(parts.total, list(params.values()))
    assert out.total.item() == pytest.approx(parts.total.item(), rel=1e-12)
    for (name, p), g in zip(params.items(), grads):
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), p.detach() - g,
                                   rtol=1e-10, atol=1e-12, msg=name)
    # BatchNorm running statistics moved once, as after the dense forward alone.
    for name, buf in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buf), name
    _no_hooks_left(model)


def test_masked_branch_zeroes_the_mask():
    # With every weight of the classifier masked, the masked branch's logits are its bias:
    # then on="logits" compares each dense row to a constant row.
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    table = dict(model.named_parameters())
    mask = Mask.from_dict(model, {"classifier.weight": torch.ones_like(table["classifier.weight"], dtype=torch.bool)})
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 2, (4,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    out = dense_masked_step(model, mask, x, y, optimizer, on="logits", ce_weight=0.0)
    bias_rows = model.classifier.bias.detach().expand(4, 2)
    logits = model(x)  # train mode, as in the step; lr 0 left the weights as they were
    expected = nt_xent(logits, bias_rows) * 2
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------ the loop


@pytest.mark.parametrize("make_model", [_small_cnn, _dropout_cnn], ids=["small_cnn", "dropout"])
@pytest.mark.parametrize("on,plateau,channels", [("features", "loss", 0.0), ("softmax", "test:worst_group_acc", 0.1)])
def test_resume_is_bit_identical(tmp_path, tiny, make_model, on, plateau, channels):
    train, test = tiny
    kwargs = dict(lr=1e-3, batch_size=40, seed=3, on=on, channel_fraction=channels, plateau_metric=plateau,
                  plateau_patience=0, plateau_factor=0.5, weight_decay=1e-4, eval_datasets={"test": test},
                  progress=False)
    straight = make_model()
    full_history = silent_majority(straight, train, epochs=4, **kwargs)

    first = make_model()
    silent_majority(first, train, epochs=2, checkpoint_dir=tmp_path, **kwargs)
    torch.manual_seed(12345)  # resume must not depend on the caller's RNG or initial weights
    resumed = make_model()
    for p in resumed.parameters():
        nn.init.normal_(p)
    resumed_history = silent_majority(resumed, train, epochs=4, checkpoint_dir=tmp_path, resume=True, **kwargs)

    _assert_same_state(resumed, straight.state_dict())
    assert [h["loss"] for h in resumed_history] == [h["loss"] for h in full_history]
    assert [h["lr"] for h in resumed_history] == [h["lr"] for h in full_history]
    assert resumed_history[-1]["test"] == full_history[-1]["test"]
    if plateau != "loss":  # the scheduler acted after the resume point, so its state had to be restored
        assert full_history[3]["lr"] < full_history[2]["lr"]


def test_checkpoints_hold_model_optimizer_scheduler_and_mask(tmp_path, tiny):
    train, _ = tiny
    model = _small_cnn()
    initial = copy.deepcopy(model)
    history = silent_majority(model, train, epochs=2, batch_size=48, checkpoint_dir=tmp_path, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["epoch_0001.mask.safetensors", "epoch_0001.safetensors",
                                            "epoch_0002.mask.safetensors", "epoch_0002.safetensors"]
    assert latest_checkpoint(tmp_path) == str(tmp_path / "epoch_0002.safetensors")
    reloaded = _small_cnn()
    meta = load_checkpoint(checkpoint_path(tmp_path, 2), reloaded)
    _assert_same_state(reloaded, model.state_dict())
    assert meta["extra"]["settings"]["on"] == "features" and len(meta["extra"]["history"]) == 2
    assert meta["extra"]["scheduler"]["mode"] == "min" and meta["optimizer"] == "Adam"
    # epoch 1's mask is the 1 % smallest weights of the starting model
    assert Mask.load(mask_path(tmp_path, 1), model) == refresh_mask(initial, 0.01)
    assert history[0]["mask_count"] == refresh_mask(initial, 0.01).count()
    assert {"contrastive", "cross_entropy", "mask_fraction", "train_running_acc", "lr"} <= set(history[0])


def test_resume_rejects_changed_settings(tmp_path, tiny):
    train, _ = tiny
    silent_majority(_small_cnn(), train, epochs=1, batch_size=48, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="settings differ.*'on'"):
        silent_majority(_small_cnn(), train, epochs=2, batch_size=48, on="softmax", checkpoint_dir=tmp_path,
                        resume=True, progress=False)
    with pytest.warns(UserWarning, match="no checkpoint"):
        silent_majority(_small_cnn(), train, epochs=1, batch_size=48, checkpoint_dir=tmp_path / "empty",
                        resume=True, progress=False)


def test_the_model_comes_back_in_its_mode_also_after_an_error(tiny):
    train, _ = tiny
    model = _small_cnn().eval()
    params = list(model.parameters())
    silent_majority(model, train, epochs=1, batch_size=48, progress=False)
    assert not any(m.training for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params))
    _no_hooks_left(model)

    calls = []

    def failing(image):
        calls.append(1)
        if len(calls) > 60:
            raise RuntimeError("disk gone")
        return image

    broken = SynthWaterbirds("train", seed=0, n=96, transform=failing)
    model.train()
    model.features.bn1.eval()
    with pytest.raises(RuntimeError, match="disk gone"):
        silent_majority(model, broken, epochs=1, batch_size=48, progress=False)
    assert model.training and not model.features.bn1.training and model.features.bn2.training
    _no_hooks_left(model)


@pytest.mark.parametrize("kwargs,match", [
    (dict(on="probabilities"), "on must be one of"),
    (dict(prune_fraction=1.5), "prune_fraction"),
    (dict(channel_fraction=-0.1), "channel_fraction"),
    (dict(plateau_metric="val:worst_group_acc"), "plateau_metric"),
    (dict(plateau_metric="train:worst_group_acc", eval_datasets={"train": None}, eval_every=2), "eval_every=1"),
    (dict(eval_datasets={"loss": None}), "clashes"),
    (dict(resume=True), "checkpoint_dir"),
    (dict(temperature=0.0), "temperature"),
    (dict(ce_weight=-1.0), "ce_weight"),
    (dict(lr=0.0), "lr"),
    (dict(epochs=-1), "epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(classifier="head"), "no submodule"),
    (dict(channel_group=4), "channel_group"),
    (dict(plateau_factor=1.0), "plateau_factor"),
])
def test_bad_arguments_change_nothing(tiny, kwargs, match):
    train, _ = tiny
    model = _small_cnn()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        silent_majority(model, train, progress=False, **kwargs)
    _assert_same_state(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_fine_tuning_keeps_a_fitted_model_fitted(tiny):
    # A short ERM fit, then the framework: the dense branch must keep classifying the training
    # set (the cross-entropy term) while the contrastive term goes down.
    from spurfast.train import erm

    train, test = tiny
    torch.manual_seed(0)
    model = MLP(in_features=3 * 32 * 32, hidden=(64,))
    erm(model, train, epochs=15, lr=1e-3, optimizer="adam", batch_size=32, progress=False)
    history = silent_majority(model, train, epochs=4, lr=2e-4, batch_size=32, eval_datasets={"train": train},
                              progress=False)
    assert history[-1]["train"]["avg_acc"] > 0.9
    assert history[-1]["contrastive"] < history[0]["contrastive"]


# ------------------------------------------------------------------ the study and its benchmark


def _load_benchmark():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "silent_majority.py"
    spec = importlib.util.spec_from_file_location("silent_majority_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_tiny_run_writes_json_and_table(tmp_path):
    module = _load_benchmark()
    saved = torch.get_num_threads()
    try:
        module.main(["--tiny", "--threads", "1", "--out", str(tmp_path)])
        timing = module.main(["--tiny", "--threads", "1", "--estimate", "--no-dfr", "--variants", "logits"])
    finally:
        torch.set_num_threads(saved)
    data = json.loads((tmp_path / "results.json").read_text())
    methods = data["methods"]
    assert set(methods) == {"erm", "erm_continued", "framework_features", "framework_softmax", "framework_logits",
                            "dfr"}
    assert data["method_order"] == ["erm", "erm_continued", "framework_features", "framework_softmax",
                                    "framework_logits", "dfr"]
    for name, entry in methods.items():
        run = entry["runs"][0]
        assert len(run["train_group_acc"]) == 4 and len(run["test_group_acc"]) == 4, name
        assert len(run["memorization_gap"]) == 4 and "minority_gap" in run, name
        assert entry["summary"]["test_worst_group_acc"]["mean"] is not None, name
    assert data["data"]["minority_groups"] == [1, 2]
    assert set(data["timing"]["seconds_per_seed"]) == set(methods)
    table = (tmp_path / "results.md").read_text()
    assert "framework_features" in table and "dfr" in table
    assert set(timing["pieces_seconds"]) == {"erm_epoch", "evaluation", "erm_continued_epoch", "framework_logits_epoch"}
    assert timing["expected_full_run_seconds"] > 0


def test_study_methods_start_from_copies_of_the_erm_model(tiny):
    from spurfast.experiments.erm_study import ERMRecipe
    from spurfast.experiments.framework_study import FrameworkStudyConfig, _methods, method_names

    train, test = tiny
    val = SynthWaterbirds("val", seed=0, n=40)
    cfg = FrameworkStudyConfig(ERMRecipe("small_cnn", epochs=1, lr=2e-3, width=4), seeds=(0,), epochs=1,
                               batch_size=48, variants=("features", "logits"), dfr_subsamples=2)
    erm_model = _small_cnn()
    before = _snapshot(erm_model)
    names = []
    for name, model, history in _methods(cfg, erm_model, train, val, 0, epochs=1, num_groups=4, device="cpu",
                                         progress=False):
        names.append(name)
        assert model is not erm_model
        assert (history is None) == (name == "dfr")
        assert not torch.equal(model.classifier.weight, erm_model.classifier.weight), name
        _assert_same_state(erm_model, before)
    assert names == method_names(cfg)[1:]
    with pytest.raises(ValueError, match="variants"):
        FrameworkStudyConfig(ERMRecipe("small_cnn", epochs=1, lr=2e-3), variants=("features", "features"))


def test_compare_methods_on_a_model_trained_elsewhere_matches_run_seed(tiny):
    """The demo's path (ERM trained by the memorization study, then compare_methods) gives the
    rows run_seed gives when the ERM stage is the same, and leaves the ERM model unchanged."""
    from spurfast.experiments.erm_study import ERMRecipe, build_model
    from spurfast.experiments.framework_study import FrameworkStudyConfig, _erm_stage, compare_methods, run_seed

    train, test = tiny
    val = SynthWaterbirds("val", seed=0, n=40)
    cfg = FrameworkStudyConfig(ERMRecipe("small_cnn", epochs=1, lr=2e-3, width=4), seeds=(0,), epochs=1,
                               batch_size=48, variants=("logits",), dfr_subsamples=2)
    expected = run_seed(cfg, train, val, test, 0, num_groups=4)
    torch.manual_seed(0)
    erm_model = build_model(cfg.recipe)
    _erm_stage(cfg, erm_model, train, 0, epochs=1, num_groups=4, device="cpu", progress=False)
    before = _snapshot(erm_model)
    rows = compare_methods(cfg, erm_model, train, val, test, 0, num_groups=4)
    _assert_same_state(erm_model, before)
    assert list(rows) == list(expected) == ["erm", "erm_continued", "framework_logits", "dfr"]
    assert rows["erm"]["seconds"] is None and "epoch_seconds" not in rows["erm"]
    for name in rows:
        for key in ("test_group_acc", "train_group_acc", "memorization_gap", "minority_gap", "test_worst_group_acc"):
            assert rows[name][key] == expected[name][key], (name, key)
