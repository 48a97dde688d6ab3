"""spurfast.masks: Mask builders, algebra and files; the masked forward (shared weights, gradients,
restoration, BatchNorm policy) against torch.func.functional_call with masked parameters."""
import copy
import doctest

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import spurfast as sf
import spurfast.masks as masks_module
from spurfast.attribution import localize, magnitude
from spurfast.masks import BN_MODES, Mask, masked, masked_call
from spurfast.models import MLP, SmallCNN


def small_cnn(seed=0, channels_last=False):
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=3, width=4)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def masked_params(model, mask):
    """The reference masked parameters: selected entries replaced by 0, built from element masks."""
    out = {}
    for name, p in model.named_parameters():
        if name in mask:
            out[name] = p * ~mask.element_mask(name, p)
        else:
            out[name] = p
    return out


def state_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, saved_state, saved_params):
    assert [id(p) for p in model.parameters()] == saved_params
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved_state[k]), k
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, type(m).__name__
        leftovers = [a for a in vars(m) if a in m._parameters or a in m._buffers]
        assert not leftovers, (type(m).__name__, leftovers)


# ---------------------------------------------------------------------- construction
def test_constructor_validates_names_dtypes_and_shapes():
    ok = Mask({"w": torch.tensor([True, False])}, {"w": (2, 3)})
    assert ok.is_rows("w") and ok.count() == 3 and ok.covered() == 6
    with pytest.raises(ValueError, match="bool tensor"):
        Mask({"w": torch.tensor([1, 0])}, {"w": (2, 3)})
    with pytest.raises(ValueError, match=r"entries\['w'\] has shape \[3\]"):
        Mask({"w": torch.zeros(3, dtype=torch.bool)}, {"w": (2, 3)})
    with pytest.raises(ValueError, match="without a shape: \\['w'\\]"):
        Mask({"w": torch.zeros(2, dtype=torch.bool)}, {})
    with pytest.raises(ValueError, match="without an entry: \\['v'\\]"):
        Mask({}, {"v": (2,)})


def test_entries_are_private_copies():
    rows = torch.tensor([True, False])
    mask = Mask({"w": rows}, {"w": (2, 2)})
    rows[1] = True
    assert mask.count() == 2


def test_from_dict_is_strict_about_names_and_shapes():
    model = nn.Sequential(nn.Linear(3, 2))
    mask = Mask.from_dict(model, {"0.weight": torch.tensor([[True, False, False], [False, False, True]])})
    assert not mask.is_rows("0.weight") and mask.count() == 2
    with pytest.raises(ValueError, match="'0.wieght' is not a parameter"):
        Mask.from_dict(model, {"0.wieght": torch.tensor([True, False])})
    with pytest.raises(ValueError, match=r"expected \[2\] \(rows\) or \[2, 3\]"):
        Mask.from_dict(model, {"0.weight": torch.ones(3, dtype=torch.bool)})


def test_from_units_takes_localize_units_and_selects_rows_and_bias():
    torch.manual_seed(0)
    model = MLP(in_features=6, hidden=(5, 4), num_classes=2)
    units = localize(magnitude(model), k=3)
    mask = Mask.from_units(model, units)
    assert all(isinstance(u, sf.Unit) for u in units)
    assert sorted(mask.units()) == sorted((u.layer, u.channel) for u in units)
    for u in units:
        assert mask.rows(f"{u.layer}.weight")[u.channel] and mask.rows(f"{u.layer}.bias")[u.channel]
    no_bias = Mask.from_units(model, units, bias=False)
    assert all(n.endswith(".weight") for n in no_bias.entries)
    assert mask.count() == no_bias.count() + len(units)
    assert len(Mask.from_units(model, [])) == 0


@pytest.mark.parametrize("units, message", [
    ([("fc9", 0)], "'fc9' is not a module"),
    ([("fc1", 5)], "channel 5 out of range"),
    ([("fc1", 1.0)], "channel must be an int"),
    ([("relu1", 0)], "'relu1' is not a module of the model with a weight"),
    (("fc1", 0), "sequence of \\(layer, channel\\) pairs"),
])
def test_from_units_rejects_bad_units(units, message):
    model = MLP(in_features=6, hidden=(5, 4), num_classes=2)
    with pytest.raises(ValueError, match=message):
        Mask.from_units(model, units)


# ---------------------------------------------------------------------- magnitude
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.013, 0.5, 1.0])
def test_smallest_magnitude_is_global_and_exact_in_count(fraction):
    model = small_cnn()
    mask = Mask.smallest_magnitude(model, fraction)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert list(mask.entries) == [f"{n}.weight" for n in names]
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    assert mask.count() == int(fraction * total + 0.5)
    params = dict(model.named_parameters())
    chosen = torch.cat([params[n].detach().abs()[mask.entries[n]] for n in mask.entries])
    rest = torch.cat([params[n].detach().abs()[~mask.entries[n]] for n in mask.entries])
    if chosen.numel() and rest.numel():
        assert chosen.max() <= rest.min()


def test_smallest_magnitude_breaks_ties_by_parameter_then_position_and_takes_params():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.5], [0.5, 2.0]]))
        model[1].weight.copy_(torch.tensor([[0.5, 3.0], [0.1, 4.0]]))
    mask = Mask.smallest_magnitude(model, 3 / 8)  # 0.1, then two of the three 0.5s
    assert mask.entries["1.weight"].tolist() == [[False, False], [True, False]]
    assert mask.entries["0.weight"].tolist() == [[False, True], [True, False]]
    only = Mask.smallest_magnitude(model, 0.5, params=["1.weight"])
    assert list(only.entries) == ["1.weight"] and only.entries["1.weight"].tolist() == [[True, False], [True, False]]
    with pytest.raises(ValueError, match="'2.weight' is not a parameter"):
        Mask.smallest_magnitude(model, 0.1, params=["2.weight"])
    with pytest.raises(ValueError, match="fraction must be a number in \\[0, 1\\]"):
        Mask.smallest_magnitude(model, 1.5)


# ---------------------------------------------------------------------- gradient channels
def _recorded_stats(model, x, y, g, num_groups=2):
    stats = sf.NeuronStats(model, num_groups=num_groups, loss_reduction="sum", track_ablation=False, backend="torch")
    with stats.record(g):
        F.cross_entropy(model(x), y, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return stats


def _reference_channel_norms(model, x, y, g, group):
    """Per layer, ||d L / d W[c]|| of the summed loss over the chosen samples, by plain autograd."""
    keep = torch.ones_like(g, dtype=torch.bool) if group is None else g == group
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    weights = [model.get_submodule(n).weight for n in layers]
    loss = F.cross_entropy(model(x[keep]), y[keep], reduction="sum")
    grads = torch.autograd.grad(loss, weights)
    return layers, [gr.double().flatten(1).norm(dim=1) for gr in grads]


@pytest.mark.parametrize("group", [None, 0, 1])
def test_top_gradient_channels_matches_autograd_norms(group):
    torch.manual_seed(1)
    model = MLP(in_features=5, hidden=(7, 6), num_classes=3).double()
    x, y, g = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,)), torch.arange(12) % 2
    stats = _recorded_stats(model, x, y, g)
    mask = Mask.top_gradient_channels(stats, 0.25, group=group)
    layers, norms = _reference_channel_norms(model, x, y, g, group)
    flat = torch.cat(norms)
    k = int(0.25 * flat.numel() + 0.5)
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    got = torch.cat([mask.rows(f"{n}.weight") for n in layers])
    assert torch.equal(got, expected)
    assert all(torch.equal(mask.rows(f"{n}.bias"), mask.rows(f"{n}.weight")) for n in layers)


def test_top_gradient_channels_grad_sq_statistic_and_validation():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x, y, g = torch.randn(8, 4), torch.randint(0, 2, (8,)), torch.arange(8) % 2
    stats = _recorded_stats(model, x, y, g)
    mask = Mask.top_gradient_channels(stats, 0.5, statistic="grad_sq", bias=False, layers=["0"])
    per_sample = torch.stack([  # [B, C] ||d l_n / d W[c]||^2, one backward per sample
        torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), model[0].weight)[0].square().sum(1)
        for i in range(8)
    ])
    expected = torch.zeros(6, dtype=torch.bool)
    expected[torch.sort(per_sample.sum(0), descending=True, stable=True).indices[:3]] = True
    assert list(mask.entries) == ["0.weight"] and torch.equal(mask.rows("0.weight"), expected)
    with pytest.raises(ValueError, match="group must be None or an int in \\[0, 2\\)"):
        Mask.top_gradient_channels(stats, 0.5, group=2)
    with pytest.raises(ValueError, match="statistic must be one of"):
        Mask.top_gradient_channels(stats, 0.5, statistic="norm")
    with pytest.raises(ValueError, match="recorded no sample"):
        Mask.top_gradient_channels(sf.NeuronStats(model, num_groups=2, backend="torch"), 0.5)
    no_group_grad = sf.NeuronStats(model, num_groups=2, track_group_grad=False, backend="torch")
    with pytest.raises(ValueError, match="does not keep for layers"):
        Mask.top_gradient_channels(no_group_grad, 0.5)
    with pytest.raises(TypeError, match="stats must be a NeuronStats"):
        Mask.top_gradient_channels({}, 0.5)


# ---------------------------------------------------------------------- algebra and files
def test_algebra_mixes_row_and_element_entries():
    shapes = {"w": (3, 2), "b": (3,)}
    a = Mask({"w": torch.tensor([True, False, False]), "b": torch.tensor([True, False, True])}, shapes)
    b = Mask({"w": torch.tensor([[False, True], [False, False], [True, True]])}, {"w": (3, 2)})
    union, inter = a | b, a & b
    assert union.element_mask("w").tolist() == [[True, True], [False, False], [True, True]]
    assert inter.element_mask("w").tolist() == [[False, True], [False, False], [False, False]]
    assert inter.entries["b"].tolist() == [False, False, False]  # not in b: nothing selected there
    assert (a | a).is_rows("w") and not union.is_rows("w")
    b_covering_b = b | Mask({"b": torch.zeros(3, dtype=torch.bool)}, {"b": (3,)})  # same selection, covers "b" too
    assert ~(a | b) == (~a.to_elements()) & ~b_covering_b  # De Morgan, within the covered parameters
    assert (~a).count() == a.covered() - a.count()
    assert a.to_elements() == a and a != b
    with pytest.raises(ValueError, match="'w' has shape"):
        a | Mask({"w": torch.zeros(4, dtype=torch.bool)}, {"w": (4, 2)})


def test_save_and_load_round_trip(tmp_path):
    model = small_cnn()
    mask = Mask.from_units(model, [("features.conv2", 3), ("classifier", 1)]) | Mask.smallest_magnitude(model, 0.02)
    path = mask.save(tmp_path / "mask.safetensors")
    loaded = Mask.load(path, model)
    assert loaded == mask and list(loaded.entries) == list(mask.entries)
    assert all(loaded.is_rows(n) == mask.is_rows(n) for n in mask.entries)
    with pytest.raises(ValueError, match="is not a parameter"):
        Mask.load(path, MLP(in_features=4, hidden=(3,), num_classes=2))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a spurfast mask"):
        Mask.load(tmp_path / "other.safetensors")


# ---------------------------------------------------------------------- masked forward
def _mask_for(model):
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    units = [(convs[0], 0), (convs[-2], 1), (convs[-1], 0)]
    return Mask.from_units(model, units) | Mask.smallest_magnitude(model, 0.1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_masked_forward_equals_functional_call_with_masked_weights(channels_last, mode, one_thread):
    model = small_cnn(channels_last=channels_last)
    getattr(model, mode)()
    reference = copy.deepcopy(model)
    mask = _mask_for(model)
    x = torch.randn(6, 3, 16, 16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    expected = functional_call(reference, masked_params(reference, mask), (x,))
    with masked(model, mask):
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(out, model(x))  # the mask did something


def test_dense_plus_masked_gradient_is_the_sum_of_both(one_thread):
    model = small_cnn()
    reference = copy.deepcopy(model)
    mask = _mask_for(model)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    loss = F.cross_entropy(model(x), y) + F.cross_entropy(masked_call(model, mask, x), y)
    loss.backward()
    params = dict(reference.named_parameters())
    dense = torch.autograd.grad(F.cross_entropy(functional_call(reference, params, (x,)), y), list(params.values()))
    masked_grads = torch.autograd.grad(
        F.cross_entropy(functional_call(reference, masked_params(reference, mask), (x,)), y), list(params.values())
    )
    for (name, p), d, m in zip(model.named_parameters(), dense, masked_grads):
        torch.testing.assert_close(p.grad, d + m, rtol=1e-5, atol=1e-7, msg=name)
        if name in mask:  # the masked branch sends nothing to the selected entries
            assert torch.all(m[mask.element_mask(name, p)] == 0)


def test_masked_branch_alone_gives_zero_gradient_to_selected_entries():
    model = MLP(in_features=6, hidden=(5,), num_classes=2)
    mask = Mask.from_units(model, [("fc1", 2)])
    with masked(model, mask):
        model(torch.randn(4, 6)).square().sum().backward()
    assert torch.all(model.fc1.weight.grad[2] == 0) and model.fc1.bias.grad[2] == 0
    assert model.fc1.weight.grad[[0, 1, 3, 4]].abs().sum() > 0


def test_several_forwards_and_backwards_in_one_block():
    model = MLP(in_features=6, hidden=(5,), num_classes=2)
    mask = Mask.from_units(model, [("fc1", 0)])
    x = torch.randn(4, 6)
    with masked(model, mask):
        model(x).sum().backward()
        first = model.fc1.weight.grad.clone()
        model(x).sum().backward()
        with torch.no_grad():
            assert not model(x).requires_grad
    torch.testing.assert_close(model.fc1.weight.grad, 2 * first)


def test_everything_is_restored_also_after_an_exception():
    model = small_cnn()
    model.train()
    saved_state, saved_params = state_snapshot(model), [id(p) for p in model.parameters()]
    mask = _mask_for(model)
    with masked(model, mask):
        assert [id(p) for p in model.parameters()] == saved_params  # same objects inside, too
        assert all(torch.equal(v, saved_state[k]) for k, v in model.state_dict().items())  # dense inside
        model(torch.randn(4, 3, 16, 16))
    assert_untouched(model, saved_state, saved_params)
    with pytest.raises(RuntimeError, match="boom"):
        with masked(model, mask):
            model(torch.randn(4, 3, 16, 16))
            raise RuntimeError("boom")
    assert_untouched(model, saved_state, saved_params)
    with pytest.raises(RuntimeError, match="Expected|channels|size"):  # fails inside the forward
        masked_call(model, mask, torch.randn(4, 5, 16, 16))
    assert_untouched(model, saved_state, saved_params)
    assert model.training and all(m.training for m in model.modules())


def test_masked_validates_before_touching_anything():
    model = small_cnn()
    saved_state, saved_params = state_snapshot(model), [id(p) for p in model.parameters()]
    bad = Mask({"features.conv9.weight": torch.zeros(4, dtype=torch.bool)}, {"features.conv9.weight": (4, 3, 3, 3)})
    with pytest.raises(ValueError, match="'features.conv9.weight' is not a parameter"):
        with masked(model, bad):
            pass
    wrong = Mask({"classifier.weight": torch.zeros(5, dtype=torch.bool)}, {"classifier.weight": (5, 16)})
    with pytest.raises(ValueError, match="'classifier.weight' is for shape \\[5, 16\\]"):
        masked_call(model, wrong, torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="bn must be one of"):
        masked_call(model, Mask.empty(), torch.randn(2, 3, 16, 16), bn="frozen")
    with pytest.raises(TypeError, match="mask must be a spurfast Mask"):
        masked_call(model, {"classifier.weight": torch.ones(3, dtype=torch.bool)}, torch.randn(2, 3, 16, 16))
    mask = _mask_for(model)
    with masked(model, mask):
        with pytest.raises(RuntimeError, match="do not nest"):
            with masked(model, mask):
                pass
    assert_untouched(model, saved_state, saved_params)


def _running(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_default_bn_policy_leaves_running_statistics_bit_identical(one_thread):
    model = small_cnn()
    model.train()
    mask = _mask_for(model)
    x = torch.randn(6, 3, 16, 16)
    before = _running(model)
    out = masked_call(model, mask, x)
    assert all(torch.equal(v, before[k]) for k, v in _running(model).items())
    # ... while normalising with the batch statistics, as a train-mode forward does
    reference = copy.deepcopy(model)
    torch.testing.assert_close(out, functional_call(reference, masked_params(reference, mask), (x,)))
    model(x)  # the dense branch updates them, once
    assert not torch.equal(_running(model)["features.bn1.running_mean"], before["features.bn1.running_mean"])
    assert int(_running(model)["features.bn1.num_batches_tracked"]) == int(before["features.bn1.num_batches_tracked"]) + 1


def test_other_bn_policies(one_thread):
    model = small_cnn()
    model.train()
    mask = _mask_for(model)
    x = torch.randn(6, 3, 16, 16)
    before = _running(model)
    running = masked_call(model, mask, x, bn="running")
    assert all(torch.equal(v, before[k]) for k, v in _running(model).items())
    assert model.training and all(m.training for m in model.modules())
    reference = copy.deepcopy(model).eval()
    torch.testing.assert_close(running, functional_call(reference, masked_params(reference, mask), (x,)))
    masked_call(model, mask, x, bn="update")
    assert int(_running(model)["features.bn1.num_batches_tracked"]) == int(before["features.bn1.num_batches_tracked"]) + 1
    model.eval()  # eval inside a default block: running statistics, as in eval mode
    with masked(model, mask):
        out = model(x)
    reference = copy.deepcopy(model)
    torch.testing.assert_close(out, functional_call(reference, masked_params(reference, mask), (x,)))
    assert set(BN_MODES) == {"batch", "running", "update"}


def test_masked_works_with_neuron_stats_recording():
    torch.manual_seed(3)
    model = MLP(in_features=6, hidden=(5,), num_classes=2)
    mask = Mask.from_units(model, [("fc1", 1)])
    stats = sf.NeuronStats(model, num_groups=1, backend="torch", track_ablation=False)
    with stats.record(torch.zeros(4, dtype=torch.long)):
        with masked(model, mask):
            F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 0, 1])).backward()
    assert torch.all(stats.last_grad_sq["fc1"][:, 1] == 0) and stats.last_grad_sq["fc1"][:, 0].sum() > 0


def test_efficientnet_lite0_masked_forward(one_thread):
    pytest.importorskip("efficientnet_lite_pytorch",
                        reason='efficientnet-lite-pytorch not installed: pip install "spurfast[real]"')
    torch.manual_seed(0)
    from spurfast.models import efficientnet_lite0

    model = efficientnet_lite0(num_classes=2, pretrained=False)
    saved_state, saved_params = state_snapshot(model), [id(p) for p in model.parameters()]
    mask = Mask.smallest_magnitude(model, 0.01) | Mask.from_units(model, [("_conv_stem.conv", 3), ("_fc", 1)])
    x = torch.randn(2, 3, 64, 64)
    model.train()  # drop-connect draws: compare in eval mode, check the running statistics in train mode
    masked_call(model, mask, x)
    assert_untouched(model, saved_state, saved_params)
    model.eval()
    reference = copy.deepcopy(model)
    out = masked_call(model, mask, x)
    torch.testing.assert_close(out, functional_call(reference, masked_params(reference, mask), (x,)), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(out, model(x), rtol=1e-4, atol=1e-5)


def test_docstring_examples():
    result = doctest.testmod(masks_module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


class _ParentReadsWeights(nn.Module):
    """A forward that uses a child's weight through F.linear, and a weight tied to another layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.fc.weight  # tied

    def forward(self, x):
        h = F.linear(x, self.fc.weight, self.fc.bias).relu()
        return self.head(h)


def test_weights_read_by_a_parent_or_tied_are_masked_during_the_call_and_dense_between():
    torch.manual_seed(4)
    model = _ParentReadsWeights()
    mask = Mask.from_units(model, [("fc", 1)], bias=False)
    x = torch.randn(3, 4)
    expected = functional_call(model, masked_params(model, mask), (x,), tie_weights=True)
    with masked(model, mask):
        torch.testing.assert_close(model(x), expected)
        assert isinstance(model.fc.weight, nn.Parameter) and model.head.weight is model.fc.weight
        model(x).sum().backward()
        assert model.fc.weight.grad is not None and torch.all(model.fc.weight.grad[1] == 0)
    assert not any(a in vars(m) for m in model.modules() for a in ("weight", "bias"))


def test_a_method_other_than_forward_masks_each_submodule_during_its_call():
    model = small_cnn().eval()
    mask = Mask.from_units(model, [("features.conv4", 0), ("features.conv4", 5)])
    x = torch.randn(2, 3, 16, 16)
    with masked(model, mask):
        features = model.forward_features(x)  # [B, 16]: no root call, the convs mask themselves
    assert torch.equal(features[0, [0, 5]], features[1, [0, 5]])  # a zeroed conv channel is constant after BN
    reference = functional_call(model, masked_params(model, mask), (x,))
    torch.testing.assert_close(model.classifier(features), reference)
