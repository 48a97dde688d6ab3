"""spurfast.train (ERM, checkpoints, resume) and spurfast.models."""
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from spurfast.data import SynthWaterbirds
from spurfast.models import MLP, SmallCNN, create_model
from spurfast.train import checkpoint_path, erm, latest_checkpoint, load_checkpoint, make_optimizer, save_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return SynthWaterbirds("train", seed=0, n=96), SynthWaterbirds("test", seed=0, n=32)


def _dropout_cnn():
    # Dropout makes the run depend on the global RNG, which a checkpoint must carry.
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2),
    )


def _small_cnn():
    torch.manual_seed(1)
    return SmallCNN(width=4)


@pytest.mark.parametrize("make_model", [_small_cnn, _dropout_cnn], ids=["small_cnn", "dropout"])
@pytest.mark.parametrize("optimizer,schedule", [("sgd", "constant"), ("adam", "cosine")])
def test_resume_is_bit_identical(tmp_path, tiny, make_model, optimizer, schedule):
    train, test = tiny
    kwargs = dict(lr=0.05 if optimizer == "sgd" else 0.01, batch_size=32, seed=3, optimizer=optimizer,
                  lr_schedule=schedule, weight_decay=1e-4, eval_datasets={"test": test}, progress=False)
    straight = make_model()
    full_history = erm(straight, train, epochs=2, **kwargs)

    first = make_model()
    erm(first, train, epochs=1, checkpoint_dir=tmp_path, **kwargs) if schedule == "constant" else erm(
        first, train, epochs=2, checkpoint_dir=tmp_path, **kwargs
    )
    if schedule == "cosine":  # the cosine horizon is part of the run: stop it after epoch 1 by deleting epoch 2
        os.remove(checkpoint_path(tmp_path, 2))
    torch.manual_seed(12345)  # resume must not depend on the caller's RNG or initial weights
    resumed = make_model()
    for p in resumed.parameters():
        nn.init.normal_(p)
    resumed_history = erm(resumed, train, epochs=2, checkpoint_dir=tmp_path, resume=True, **kwargs)

    expected = straight.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert [h["loss"] for h in resumed_history] == [h["loss"] for h in full_history]
    assert resumed_history[-1]["test"] == full_history[-1]["test"]


def test_checkpoint_contents_and_atomic_write(tmp_path, tiny):
    train, _ = tiny
    model = _small_cnn()
    erm(model, train, epochs=2, lr=0.01, batch_size=48, optimizer="sgd", checkpoint_dir=tmp_path, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["epoch_0001.safetensors", "epoch_0002.safetensors"]  # no temp files
    assert latest_checkpoint(tmp_path) == str(tmp_path / "epoch_0002.safetensors")
    with safe_open(str(tmp_path / "epoch_0002.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.features.conv1.weight" in keys and "model.features.bn1.running_mean" in keys
    assert "optimizer.state.0.momentum_buffer" in keys and "rng.torch" in keys
    reloaded = _small_cnn()
    meta = load_checkpoint(tmp_path / "epoch_0002.safetensors", reloaded)
    assert meta["epoch"] == 2 and len(meta["extra"]["history"]) == 2
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


def test_save_checkpoint_failure_leaves_no_file(tmp_path):
    model = nn.Linear(2, 2)
    path = tmp_path / "epoch_0001.safetensors"
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(path, model, extra={"bad": object()})
    assert os.listdir(tmp_path) == []


def test_load_checkpoint_checks_optimizer_type(tmp_path):
    model = nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / "c.safetensors", model, make_optimizer(model, "sgd", lr=0.1), epoch=1)
    with pytest.raises(ValueError, match="SGD"):
        load_checkpoint(path, model, make_optimizer(model, "adam", lr=0.1))


def test_resume_rejects_changed_settings(tmp_path, tiny):
    train, _ = tiny
    erm(_small_cnn(), train, epochs=1, lr=0.01, batch_size=32, seed=0, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        erm(_small_cnn(), train, epochs=2, lr=0.01, batch_size=16, seed=0, checkpoint_dir=tmp_path, resume=True,
            progress=False)
    with pytest.warns(UserWarning, match="no checkpoint"):
        erm(_small_cnn(), train, epochs=1, lr=0.01, checkpoint_dir=tmp_path / "empty", resume=True, progress=False)


def test_erm_learns_and_reports_groups(tiny):
    train, test = tiny
    torch.manual_seed(0)
    model = MLP(hidden=(64,))
    history = erm(model, train, epochs=15, lr=1e-3, optimizer="adam", batch_size=32,
                  eval_datasets={"train": train, "test": test}, eval_every=5, progress=False)
    assert [("train" in h) for h in history] == [False] * 4 + [True] + [False] * 4 + [True] + [False] * 4 + [True]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["train"]["avg_acc"] > 0.9  # an MLP this size fits 96 images
    assert history[-1]["train"]["group_counts"] == train.group_counts().tolist()
    assert history[-1]["test"]["group_counts"] == [8, 8, 8, 8]
    assert history[-1]["test"]["weighted_acc"] is not None


def test_erm_goes_through_a_dataloader_for_transformed_datasets(tiny):
    train, _ = tiny
    seen = []

    def transform(image):
        seen.append(1)
        return image

    ds = SynthWaterbirds("train", seed=0, n=96, transform=transform)
    a, b = _small_cnn(), _small_cnn()
    h_a = erm(a, ds, epochs=1, lr=0.01, batch_size=32, progress=False)
    h_b = erm(b, train, epochs=1, lr=0.01, batch_size=32, progress=False)
    assert len(seen) == 96
    assert h_a[0]["loss"] == pytest.approx(h_b[0]["loss"], rel=1e-5)


def test_cosine_schedule_ends_near_zero(tiny):
    train, _ = tiny
    history = erm(_small_cnn(), train, epochs=2, lr=0.1, batch_size=32, lr_schedule="cosine", progress=False)
    assert history[0]["lr"] < 0.1 and history[-1]["lr"] < 0.01


def test_erm_rejects_bad_arguments(tiny):
    train, _ = tiny
    with pytest.raises(ValueError, match="optimizer"):
        erm(_small_cnn(), train, epochs=1, lr=0.1, optimizer="rmsprop", progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        erm(_small_cnn(), train, epochs=1, lr=0.1, resume=True, progress=False)
    with pytest.raises(ValueError, match="clashes"):
        erm(_small_cnn(), train, epochs=1, lr=0.1, eval_datasets={"loss": train}, progress=False)


def test_models_and_factory():
    cnn = create_model("small_cnn", num_classes=3, width=4)
    assert isinstance(cnn, SmallCNN) and cnn(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert cnn.features.conv1.out_channels == 4 and cnn.classifier.in_features == 16
    assert cnn.forward_features(torch.zeros(2, 3, 32, 32)).shape == (2, 16)
    mlp = create_model("mlp", num_classes=2, in_features=3 * 8 * 8, hidden=(7, 5))
    assert isinstance(mlp, MLP) and mlp(torch.zeros(4, 3, 8, 8)).shape == (4, 2)
    assert [n for n, m in mlp.named_modules() if isinstance(m, nn.Linear)] == ["fc1", "fc2", "classifier"]
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no_such_model_xyz")
    with pytest.raises(ValueError, match="width"):
        SmallCNN(width=0)


def test_benchmark_script_tiny_run_writes_json(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "erm_synth_waterbirds.py"
    spec = importlib.util.spec_from_file_location("erm_synth_waterbirds", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = torch.get_num_threads()
    try:
        module.main(["--tiny", "--threads", "1", "--out", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(saved)
    data = json.loads((tmp_path / "r.json").read_text())
    run = data["runs"][0]
    assert len(run["train_group_acc"]) == 4 and len(run["test_group_acc"]) == 4
    assert data["data"]["test_group_counts"] == [12, 12, 12, 12]
    assert set(data["summary"]) >= {"all_train_groups_fit", "wga_at_least_20_below_avg", "test_worst_group_acc"}
