"""First-order ablation scores, the exact oracle, verified/iterative localization, memorized samples."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spurfast as sf
from spurfast.attribution import evaluate_variants, fast_score, first_order_effects, intervene
from spurfast.metrics import evaluate


class Mixed(nn.Module):
    """Conv2d (bias, grouped, reflect), Conv1d, a token Linear and a Linear head, all called once."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, groups=2, padding_mode="reflect", bias=False)
        self.c3 = nn.Conv1d(6, 4, 3, padding=1)
        self.tok = nn.Linear(4, 5)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.c2(F.relu(self.c1(x)))))  # [B, 6, 6, 6]
        h = F.relu(self.c3(h.flatten(2)))  # [B, 4, 36]
        h = torch.tanh(self.tok(h.transpose(1, 2)))  # [B, 36, 5]
        return self.head(h.mean(1))


def _trained(seed=0, steps=60):
    torch.manual_seed(seed)
    model = Mixed()
    x = torch.randn(96, 3, 6, 6)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0.3).long()
    g = (torch.arange(96) % 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, (x, y, g)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


def _assert_untouched(model, snap):
    state, modes, grads = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


@pytest.mark.parametrize("objective", ["margin", "loss"])
def test_ablation_scores_are_group_means_of_the_recorded_statistic(objective, has_ext):
    model, (x, y, g) = _trained()
    model.train()  # scores run in eval mode and restore this
    model.head.weight.grad = torch.ones_like(model.head.weight)
    snap = _snapshot(model)
    scores = sf.ablation_scores(model, (x, y, g), num_groups=4, objective=objective, batch_size=40)
    _assert_untouched(model, snap)
    model.eval()
    stats = sf.NeuronStats(model, num_groups=4, loss_reduction="sum")
    with stats.record(g):
        logits = model(x)
        value = sf.margin(logits, y) if objective == "margin" else F.cross_entropy(logits, y, reduction="none")
        value.sum().backward()
    for p in model.parameters():
        p.grad = None
    right = logits.argmax(1) == y
    for name in stats.layer_names:
        effect = stats.last_ablation[name].double()  # [N, C]
        want = torch.stack([effect[g == k].mean(0) for k in range(4)])
        assert torch.allclose(scores.effect[name], want, atol=1e-5)
        assert torch.allclose(scores.harm[name], -want if objective == "margin" else want, atol=1e-5)
        after = value.detach().double().unsqueeze(1) + effect
        wrong = after < 0 if objective == "margin" else after > torch.log(torch.tensor(2.0)).item()
        flips = (right.unsqueeze(1) & wrong).double()
        want_rate = torch.stack([flips[g == k].mean(0) for k in range(4)])
        assert torch.allclose(scores.flip_rate[name], want_rate)
        contrast = scores.contrast(1, majority=[0, 3])[name]
        assert torch.allclose(contrast, want_rate[1] - want_rate[[0, 3]].max(0).values)


def test_contrast_rejects_bad_groups():
    model, data = _trained(steps=5)
    scores = sf.ablation_scores(model, data, num_groups=5)  # group 4 is empty
    with pytest.raises(ValueError, match="group 4 has no samples"):
        scores.contrast(4)
    with pytest.raises(ValueError, match="exclude the target 1"):
        scores.contrast(1, majority=[1, 0])
    with pytest.raises(ValueError, match="of must be one of"):
        scores.contrast(1, of="loss")
    with pytest.raises(ValueError, match="objective must be one of"):
        sf.ablation_scores(model, data, num_groups=4, objective="accuracy")


@pytest.mark.parametrize("mode", ["zero", "random_init"])
def test_oracle_equals_intervening_on_each_unit_alone(mode, has_ext):
    model, data = _trained()
    snap = _snapshot(model)
    units = [(n, c) for n in ("c1", "c2", "c3", "tok", "head") for c in range(3)]
    result = sf.ablation_oracle(model, data, num_groups=4, units=units, mode=mode, sigma=0.5, seed=3,
                                per_sample=True, batch_size=30, max_rows=70)  # several chunks of both kinds
    _assert_untouched(model, snap)
    x, y, g = data
    base = evaluate(model, data, num_groups=4).group_acc.double()
    assert torch.allclose(result.acc_before.double(), base)
    for i, u in enumerate(units):
        with intervene(model, [u], mode, sigma=0.5 if mode == "random_init" else None, seed=3):
            with torch.no_grad():
                logits = model(x)
        assert torch.equal(result.correct_after[i], logits.argmax(1) == y), u
        margins = sf.margin(logits, y)
        want = torch.stack([margins[g == k].mean() for k in range(4)]).double()
        assert torch.allclose(result.objective_after[i], want, atol=1e-4), u
        flipped = ((model(x).argmax(1) == y) & (logits.argmax(1) != y)).nonzero().squeeze(1)
        assert torch.equal(result.flipped(u), flipped)
    _assert_untouched(model, snap)
    assert result.drop.shape == (len(units), 4)
    assert result.seconds > 0 and result.seconds_per_unit > 0


def test_oracle_default_units_are_the_eligible_ones_and_bad_input_is_refused():
    model, data = _trained(steps=5)
    result = sf.ablation_oracle(model, data, num_groups=4)
    assert {u.layer for u in result.units} == {"c1", "c2", "c3", "tok"}  # classifier excluded by default
    assert len(result.units) == 6 + 6 + 4 + 5
    with pytest.raises(ValueError, match="mode must be one of"):
        sf.ablation_oracle(model, data, num_groups=4, mode="rewind")
    with pytest.raises(ValueError, match="channel 9 out of range for layer 'c3'"):
        sf.ablation_oracle(model, data, num_groups=4, units=[("c3", 9)])
    with pytest.raises(ValueError, match="'bn' is not an nn.Linear/nn.Conv1d/nn.Conv2d"):
        sf.ablation_oracle(model, data, num_groups=4, units=[("bn", 0)])
    with pytest.raises(ValueError, match="group ids must lie in"):
        sf.ablation_oracle(model, data, num_groups=2)


def test_evaluate_variants_removes_units_together():
    model, (x, y, g) = _trained()
    pair = [("c1", 0), ("tok", 2)]
    correct, value = evaluate_variants(model, (x, y, g), [pair, []], "loss", batch_size=17, max_rows=40)
    with intervene(model, pair, "zero"), torch.no_grad():
        logits = model(x)
    assert torch.equal(correct[0], logits.argmax(1) == y)
    assert torch.allclose(value[0], F.cross_entropy(logits, y, reduction="none"), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(value[1], F.cross_entropy(model(x), y, reduction="none"), atol=1e-5)


def test_verified_localize_ranks_candidates_by_exact_utility():
    model, data = _trained()
    snap = _snapshot(model)
    found = sf.verified_localize(model, data, num_groups=4, target=1, k=3, candidates=8, penalty=2.0)
    _assert_untouched(model, snap)
    assert len(found.candidates) == 8 and len(found.units) == 3
    fast = fast_score(model, data, 4, 1)
    assert found.candidates == sf.localize(fast, k=8)
    exact = sf.ablation_oracle(model, data, num_groups=4, units=found.candidates)
    drop = exact.drop
    want = drop[:, 1] - 2.0 * drop[:, [0, 2, 3]].max(1).values.clamp(min=0)
    assert torch.allclose(found.utility, want)
    best = torch.sort(want, descending=True, stable=True).indices[:3].tolist()
    assert found.units == [found.candidates[i] for i in best]
    with pytest.raises(ValueError, match="target must be an int in"):
        sf.verified_localize(model, data, num_groups=4, target=7)
    with pytest.raises(ValueError, match="candidates must be a positive int"):
        sf.verified_localize(model, data, num_groups=4, target=1, candidates=0)


def test_iterative_localize_recomputes_with_the_chosen_units_zeroed():
    model, data = _trained()
    snap = _snapshot(model)
    units = sf.iterative_localize(model, data, num_groups=4, target=2, k=3)
    _assert_untouched(model, snap)
    assert len(set(units)) == 3
    assert units[0] == sf.localize(fast_score(model, data, 4, 2), k=1)[0]
    with intervene(model, units[:1], "zero"):
        second = fast_score(model, data, 4, 2)
    masked = {n: t.clone() for n, t in second.items()}
    masked[units[0].layer][units[0].channel] = -float("inf")
    assert units[1] == sf.localize(masked, k=1)[0]


def test_memorized_examples_first_order_against_exact():
    model, data = _trained()
    x, y, g = data
    units = [("c1", 1), ("tok", 0), ("c3", 2)]
    found = sf.memorized_examples(model, data, units)
    first = first_order_effects(model, data, units)
    for m, u in zip(found, units):
        with intervene(model, [u], "zero"), torch.no_grad():
            wrong = model(x).argmax(1) != y
        with torch.no_grad():
            right = model(x).argmax(1) == y
        assert torch.equal(m.exact, (right & wrong).nonzero().squeeze(1))
        j = units.index(u)
        assert torch.equal(m.flagged, first.predicted_flip[:, j].nonzero().squeeze(1))
        assert set(m.confirmed.tolist()) == set(m.flagged.tolist()) & set(m.exact.tolist())
        if len(m.flagged):
            assert m.precision == len(m.confirmed) / len(m.flagged)
        if len(m.exact):
            assert m.recall == len(m.confirmed) / len(m.exact)
        assert sum(m.exact_groups) == len(m.exact)
    assert any(len(m.exact) for m in found) and any(len(m.flagged) for m in found)  # not vacuous


def test_margin_validates_its_inputs():
    with pytest.raises(ValueError, match=r"logits must be a \[B, K\] tensor with K >= 2"):
        sf.margin(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \[4\]"):
        sf.margin(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert sf.margin(logits, torch.tensor([1])).item() == 1.0
    assert sf.margin(logits, torch.tensor([0])).item() == -2.0


def test_flip_scale_multiplies_the_effect_in_the_flip_prediction_only():
    model, (x, y, g) = _trained()
    plain = sf.ablation_scores(model, (x, y, g), num_groups=4)
    scaled = sf.ablation_scores(model, (x, y, g), num_groups=4, flip_scale=2.5)
    effects = first_order_effects(model, (x, y, g), [("c1", c) for c in range(6)])
    flips = (effects.correct.unsqueeze(1) & (effects.value.unsqueeze(1) + 2.5 * effects.effect < 0)).double()
    want = torch.stack([flips[g == k].mean(0) for k in range(4)])
    assert torch.allclose(scaled.flip_rate["c1"], want)
    assert torch.equal(scaled.effect["c1"], plain.effect["c1"])
    assert (scaled.flip_rate["c1"] >= plain.flip_rate["c1"]).all()  # a larger effect flips at least as many
    with pytest.raises(ValueError, match="flip_scale must be a number > 0"):
        sf.ablation_scores(model, (x, y, g), num_groups=4, flip_scale=0)
