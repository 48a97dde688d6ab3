"""Layers spurfast does not track are named, with the reason, and warned about."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spurfast as sf


class FLinearBlock(nn.Module):
    """A projection that calls F.linear on its own parameter (as Hugging Face's GPT-2 Conv1D does)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, d))  # not a weight matrix: not listed

    def forward(self, x):
        return F.linear(x + self.pos_embed, self.weight)


class Model(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.block = FLinearBlock(d)
        self.frozen = nn.Linear(d, d)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # x [B, 3, 4]
        h = self.inp(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.frozen(self.block(h))).mean(1)


def test_skipped_layers_are_listed_with_reasons_and_warned_about():
    model = Model()
    with pytest.warns(UserWarning, match="not tracked") as caught:
        stats = sf.NeuronStats(model, num_groups=2)
    message = str(caught[0].message)
    for name in ("'attn'", "'attn.out_proj'", "'block'"):
        assert name in message
    assert "'frozen'" not in message  # frozen on purpose: listed, not warned about
    assert stats.layer_names == ["inp", "head"]
    assert set(stats.untracked) == {"attn", "attn.out_proj", "block", "frozen"}
    assert "in_proj_weight" in stats.untracked["attn"]
    assert "inside nn.MultiheadAttention 'attn'" in stats.untracked["attn.out_proj"]
    assert "FLinearBlock is not a supported layer" in stats.untracked["block"]
    assert stats.untracked["frozen"].startswith("frozen Linear")
    x, y = torch.randn(6, 3, 4), torch.randint(0, 3, (6,))
    with stats.record(torch.arange(6) % 2):  # the tracked layers still record
        F.cross_entropy(model(x), y).backward()
    assert stats.last_grad_sq["inp"].shape == (6, 8)


def test_no_warning_when_everything_with_a_gradient_is_tracked_or_layers_are_chosen():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    model[2].weight.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = sf.NeuronStats(model, num_groups=2)
        chosen = sf.NeuronStats(Model(), num_groups=2, layers=["head"])
    assert stats.untracked == {"2": "frozen Linear: its weight does not require grad"}
    assert chosen.untracked["inp"] == "Linear not among the layers chosen"
    assert "attn" in chosen.untracked
