"""spurfast.attribution.trace on a tiny model whose per-group accuracies are known by hand."""
import csv
import importlib
import json

import pytest
import torch
import torch.nn as nn

# spurfast/__init__.py re-exports the function `trace`, which shadows the submodule attribute
T = importlib.import_module("spurfast.attribution.trace")


def tiny_model():
    """hidden = relu(x); logits = hidden + [0, 0.1]: zeroing hidden unit 0 flips class-0 samples."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[2].weight.copy_(torch.eye(2))
        model[2].bias.copy_(torch.tensor([0.0, 0.1]))
    return model


def splits():
    # train: group 0 = class 0 at [1, 0]; group 1 = class 1 at [0, 1]; all correct before.
    train = (torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 2), torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 0, 0, 1, 1]))
    # test: group 1 = class 1 placed at [1, 0]: wrong before, right once unit 0 is gone.
    test = (torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]))
    return {"train": train, "test": test}


def row(result, **where):
    rows = result.select(**where)
    assert len(rows) == 1, rows
    return rows[0]


def test_trace_known_numbers(tmp_path):
    model = tiny_model()
    model.train()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    result = T.trace(model, [("0", 0)], splits(), modes=["zero", "random_init", "random_noise"],
                     sigmas=[0.0], repeats=4, seed=3)
    assert model.training
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())

    for mode in ("zero", "random_init"):  # sigma 0 re-init is zeroing
        r = row(result, mode=mode, units="selected", split="train", group=0)
        assert (r["acc_before"], r["acc_after_mean"], r["change_mean"], r["change_std"]) == (1.0, 0.0, -1.0, 0.0)
        assert row(result, mode=mode, units="selected", split="train", group=1)["change_mean"] == 0.0
        r = row(result, mode=mode, units="selected", split="test", group=1)
        assert (r["n"], r["acc_before"], r["acc_after_mean"]) == (2, 0.5, 1.0)
        assert r["unit_list"] == "0:0"
    assert row(result, mode="zero", units="selected", split="train", group=0)["draws"] == 1
    assert row(result, mode="random_init", units="selected", split="train", group=0)["draws"] == 4
    # the only other unit of layer "0" is channel 1: zeroing it changes no prediction
    for r in result.select(units="random"):
        assert r["draws"] == 4 and r["change_mean"] == 0.0
    for r in result.select(mode="random_noise"):  # adding N(0, 0) noise changes nothing
        assert r["change_mean"] == 0.0 and r["change_std"] == 0.0
    assert {r["sigma"] for r in result.select(mode="zero")} == {None}

    result.to_json(tmp_path / "t.json")
    result.to_csv(tmp_path / "t.csv")
    assert json.loads((tmp_path / "t.json").read_text()) == result.rows
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result.rows) and tuple(rows[0]) == T.COLUMNS
    assert "| zero | - | 1 | selected | train | 0 | 100.0 | -100.0 ± 0.0 | 1 |" in result.to_markdown()


def test_trace_over_k_and_plot(tmp_path):
    model = tiny_model()
    result = T.trace(model, [("0", 0), ("0", 1)], splits(), modes=["zero"], ks=[1, 2], control=False)
    assert not result.select(units="random")
    # k=2: every hidden unit off, logits = [0, 0.1], everything predicted class 1
    assert row(result, k=2, split="train", group=0)["acc_after_mean"] == 0.0
    assert row(result, k=2, split="train", group=1)["acc_after_mean"] == 1.0
    assert row(result, k=2, split="test", group=0)["acc_after_mean"] == 0.0
    pytest.importorskip("matplotlib")
    path = result.plot(tmp_path / "k.png", x="k", split="train")
    assert path.stat().st_size > 1000
    noisy = T.trace(model, [("0", 0)], splits(), modes=["random_noise"], sigmas=[0.01, 0.1], repeats=2)
    assert noisy.plot(tmp_path / "s.png", x="sigma").stat().st_size > 1000
    with pytest.raises(ValueError, match="x must"):
        result.plot(tmp_path / "z.png", x="depth")


def test_trace_seeds_reproduce():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    data = (torch.randn(64, 3), torch.randint(0, 2, (64,)), torch.arange(64) % 3)
    a = T.trace(model, [("0", 1), ("0", 5)], {"train": data}, sigmas=[0.5], repeats=3, seed=1)
    b = T.trace(model, [("0", 1), ("0", 5)], {"train": data}, sigmas=[0.5], repeats=3, seed=1)
    c = T.trace(model, [("0", 1), ("0", 5)], {"train": data}, sigmas=[0.5], repeats=3, seed=2)
    assert a.rows == b.rows
    assert a.rows != c.rows


def test_trace_validation():
    model = tiny_model()
    with pytest.raises(ValueError, match="modes"):
        T.trace(model, [("0", 0)], splits(), modes=["melt"])
    with pytest.raises(ValueError, match="modes"):
        T.trace(model, [("0", 0)], splits(), modes=["unstructured"])
    with pytest.raises(ValueError, match="ks"):
        T.trace(model, [("0", 0)], splits(), ks=[2])
    with pytest.raises(ValueError, match="repeats"):
        T.trace(model, [("0", 0)], splits(), repeats=0)
    with pytest.raises(ValueError, match="units"):
        T.trace(model, [("9", 0)], splits(), modes=["zero"])
    with pytest.raises(ValueError, match="cannot draw"):  # no free unit left for the control
        T.trace(model, [("0", 0), ("0", 1)], splits(), modes=["zero"])
