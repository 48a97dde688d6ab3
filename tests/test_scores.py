"""spurfast.attribution (scores, localize, influence) against direct plain-torch computations on small models."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from spurfast import attribution as S


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3),
    )


def toy_data(n=48, num_groups=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 7, 7, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    g = torch.arange(n) % num_groups
    return x, y, g


def trained_bn(model):
    """Give BatchNorm non-trivial running statistics, then go back to train mode."""
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, 7, 7) * 2 + 0.5)
    return model


WEIGHTED = ["0", "3", "7", "9"]  # tracked layers of small_cnn


def per_sample_weight_grads(model, x, y):
    """{layer: [N, *W.shape]} per-sample gradients of l_n in eval mode, via torch.func."""
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {name: grads[f"{name}.weight"] for name in WEIGHTED}


def test_magnitude_is_row_norm():
    model = small_cnn()
    scores = S.magnitude(model)
    assert scores.layer_names == WEIGHTED and scores.classifier == "9" and not scores.grouped
    for name in WEIGHTED:
        w = dict(model.named_modules())[name].weight.detach().double()
        torch.testing.assert_close(scores[name], w.flatten(1).norm(dim=1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_group_gradient_equals_per_group_backward_loop(backend):
    model = trained_bn(small_cnn())
    x, y, g = toy_data()
    hardest = 5
    for p in model.parameters():  # a user's gradient that must survive scoring
        p.grad = torch.full_like(p, 0.25)
    scores = S.group_gradient(model, (x, y, g), num_groups=4, hardest=hardest, batch_size=7, backend=backend)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())

    model.eval()
    with torch.no_grad():
        p_true = model(x).softmax(-1)[torch.arange(len(y)), y]
    for group in range(4):
        members = (g == group).nonzero().squeeze(1)
        expect_sel = members[p_true[members].argsort()[:hardest]].sort().values
        assert torch.equal(scores.extra["selected"][group], expect_sel)
        model.zero_grad()
        F.cross_entropy(model(x[expect_sel]), y[expect_sel]).backward()  # plain backward of L_g
        for name in WEIGHTED:
            w = dict(model.named_modules())[name].weight
            expected = w.grad.double().flatten(1).norm(dim=1)
            torch.testing.assert_close(scores[name][group], expected, rtol=1e-4, atol=1e-7)


def test_group_gradient_small_and_empty_groups():
    model = small_cnn()
    x, y, g = toy_data(n=12)
    g = torch.tensor([0] * 9 + [1] * 3)  # group 1 has fewer than `hardest`, groups 2, 3 empty
    scores = S.group_gradient(model, (x, y, g), num_groups=4, hardest=5)
    assert [len(scores.extra["selected"][k]) for k in range(4)] == [5, 3, 0, 0]
    assert scores["0"][2:].abs().max() == 0
    assert scores["0"][:2].abs().max() > 0
    with pytest.raises(ValueError, match="hardest"):
        S.group_gradient(model, (x, y, g), num_groups=4, hardest=0)
    with pytest.raises(ValueError, match="group ids"):
        S.group_gradient(model, (x, y, g), num_groups=1)


def test_group_profile_matches_per_sample_gradients():
    model = trained_bn(small_cnn())
    x, y, g = toy_data(n=40)
    profile = S.group_profile(model, (x, y, g), num_groups=4, batch_size=9)
    assert model.training
    per_sample = per_sample_weight_grads(model, x, y)
    assert profile.count.tolist() == [10, 10, 10, 10]
    modules = dict(model.named_modules())
    for name in WEIGHTED:
        sq = per_sample[name].double().flatten(2).square().sum(-1)  # [N, C]
        with torch.no_grad():
            acts = {}
            hook = modules[name].register_forward_hook(lambda m, i, o: acts.update(out=o))
            model(x)
            hook.remove()
        act = acts["out"].double()
        act = act.flatten(2).mean(-1) if act.dim() > 2 else act
        for group in range(4):
            rows = g == group
            torch.testing.assert_close(profile.grad_sq_mean[name][group], sq[rows].mean(0), rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(profile.grad_sq_var[name][group], sq[rows].var(0, unbiased=False),
                                       rtol=1e-3, atol=1e-8)
            torch.testing.assert_close(profile.act_mean[name][group], act[rows].mean(0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(profile.act_var[name][group], act[rows].var(0, unbiased=False),
                                       rtol=1e-4, atol=1e-6)


def test_contrasts_on_known_numbers():
    mean = S.NeuronScores({"a": torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]], dtype=torch.float64)}, "m")
    var = S.NeuronScores({"a": torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)}, "v")
    act = S.NeuronScores({"a": torch.tensor([[0.0, -1.0], [2.0, 1.0], [4.0, 1.0]], dtype=torch.float64)}, "m")
    profile = S.GroupProfile(mean, var, act, var, torch.tensor([2, 1, 1]))
    # minority = group 2; majority pools groups 0 (n=2) and 1 (n=1): mean 5/3, var 1 + 8/9
    d = S.grad_sq_contrast(profile, minority=2, kind="difference")["a"]
    torch.testing.assert_close(d, torch.tensor([5 - 5 / 3, 0.0], dtype=torch.float64))
    z = S.grad_sq_contrast(profile, minority=2)["a"]
    pooled_var = 1 + (2 * (1 - 5 / 3) ** 2 + (3 - 5 / 3) ** 2) / 3
    torch.testing.assert_close(z[0], torch.tensor((5 - 5 / 3) / math.sqrt((1 + pooled_var) / 2), dtype=torch.float64))
    r = S.grad_sq_contrast(profile, minority=[2], majority=[1], kind="log_ratio")["a"]
    torch.testing.assert_close(r, torch.log(torch.tensor([5 / 3, 1.0], dtype=torch.float64)))
    a = S.activation_contrast(profile, minority=[1, 2], majority=0, kind="difference")["a"]
    torch.testing.assert_close(a, torch.tensor([3.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="log_ratio"):
        S.activation_contrast(profile, minority=2, kind="log_ratio")
    with pytest.raises(ValueError, match="disjoint"):
        S.grad_sq_contrast(profile, minority=1, majority=[1, 2])
    with pytest.raises(ValueError, match="minority"):
        S.grad_sq_contrast(profile, minority=7)
    with pytest.raises(ValueError, match="kind"):
        S.grad_sq_contrast(profile, minority=1, kind="ratio!")


def test_unstructured_threshold():
    model = small_cnn()
    masks = S.unstructured_threshold(model, top_percent=10.0)
    assert list(masks) == ["0", "3", "7"]  # the final classifier "9" is excluded by default
    modules = dict(model.named_modules())
    all_w = torch.cat([modules[n].weight.detach().abs().flatten() for n in masks])
    kept = torch.cat([modules[n].weight.detach().abs()[masks[n]] for n in masks])
    dropped = torch.cat([modules[n].weight.detach().abs()[~masks[n]] for n in masks])
    assert kept.numel() == math.ceil(0.1 * all_w.numel())  # continuous weights: no ties
    assert kept.min() >= dropped.max()
    sub_a = S.unstructured_threshold(model, 10.0, subsample=0.5, seed=3)
    sub_b = S.unstructured_threshold(model, 10.0, subsample=0.5, seed=3)
    sub_c = S.unstructured_threshold(model, 10.0, subsample=0.5, seed=4)
    assert all(torch.equal(sub_a[n], sub_b[n]) for n in masks)
    assert not all(torch.equal(sub_a[n], sub_c[n]) for n in masks)
    assert all(not (sub_a[n] & ~masks[n]).any() for n in masks)  # a subset
    assert 0 < sum(int(m.sum()) for m in sub_a.values()) < kept.numel()
    assert list(S.unstructured_threshold(model, 10.0, exclude=())) == WEIGHTED
    with pytest.raises(ValueError, match="top_percent"):
        S.unstructured_threshold(model, 0.0)
    with pytest.raises(ValueError, match="subsample"):
        S.unstructured_threshold(model, 1.0, subsample=1.5)


def test_self_influence_tracin_sum_and_restoration():
    model = trained_bn(small_cnn())
    x, y, g = toy_data(n=20)
    ckpt_a = {k: v.clone() for k, v in model.state_dict().items()}
    model_b = trained_bn(small_cnn(seed=5))
    ckpt_b = {k: v.clone() for k, v in model_b.state_dict().items()}
    current = small_cnn(seed=9)
    current_state = {k: v.clone() for k, v in current.state_dict().items()}
    lrs = [0.1, 0.03]
    infl = S.self_influence(current, (x, y, g), [ckpt_a, ckpt_b], lrs, batch_size=6)
    units = [S.Unit("3", 2), S.Unit("0", 4), S.Unit("9", 0)]
    per_unit = S.self_influence(current, (x, y, g), [ckpt_a, ckpt_b], lrs, units=units, per_unit=True)
    assert all(torch.equal(v, current.state_dict()[k]) for k, v in current_state.items())
    assert current.training

    expect = torch.zeros(20, dtype=torch.float64)
    expect_units = torch.zeros(20, 3, dtype=torch.float64)
    for ckpt_model, lr in ((model, lrs[0]), (model_b, lrs[1])):
        grads = per_sample_weight_grads(ckpt_model, x, y)
        for name in WEIGHTED:
            sq = grads[name].double().flatten(2).square().sum(-1)  # [N, C]
            expect += lr * sq.sum(1)
            for j, u in enumerate(units):
                if u.layer == name:
                    expect_units[:, j] += lr * sq[:, u.channel]
    torch.testing.assert_close(infl, expect, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(per_unit, expect_units, rtol=1e-4, atol=1e-10)
    summed = S.self_influence(current, (x, y, g), [ckpt_a, ckpt_b], lrs, units=units)
    torch.testing.assert_close(summed, expect_units.sum(1), rtol=1e-4, atol=1e-10)

    top = S.top_samples(current, (x, y, g), units, k=4, checkpoints=[ckpt_a, ckpt_b], lrs=lrs)
    for j, u in enumerate(units):
        idx, vals = top[u]
        assert torch.equal(idx, expect_units[:, j].argsort(descending=True)[:4])
        assert (vals[:-1] >= vals[1:]).all()

    with pytest.raises(ValueError, match="lrs"):
        S.self_influence(current, (x, y, g), [ckpt_a, ckpt_b], [0.1])
    with pytest.raises(ValueError, match="units"):
        S.self_influence(current, (x, y, g), units=[("nope", 0)])
    with pytest.raises(ValueError, match="units"):
        S.self_influence(current, (x, y, g), units=[("3", 5)])


def test_self_influence_follows_dataset_order():
    model = small_cnn()
    x, y, g = toy_data(n=15)
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(0))
    a = S.self_influence(model, (x, y, g), batch_size=4)
    b = S.self_influence(model, (x[perm], y[perm], g[perm]), batch_size=4)
    torch.testing.assert_close(b, a[perm], rtol=1e-5, atol=1e-10)


def test_localize_ordering_and_exclusions():
    scores = S.NeuronScores(
        {
            "conv1": torch.tensor([0.1, 0.9, 0.5]),
            "layer1.0.bn1": torch.tensor([5.0]),
            "layer1.0.conv1": torch.tensor([0.5, 0.8]),
            "layer1.0.downsample.0": torch.tensor([7.0, 7.0]),
            "subnet": torch.tensor([0.3]),  # "bn" inside a word is not a BatchNorm name
            "fc": torch.tensor([9.0, 9.0]),
        },
        "test",
        classifier="fc",
    )
    units = S.localize(scores, k=4)
    assert units == [("conv1", 1), ("layer1.0.conv1", 1), ("conv1", 2), ("layer1.0.conv1", 0)]  # ties: module order
    assert isinstance(units[0], S.Unit)
    assert S.localize(scores, k=2, exclude=()) == [("fc", 0), ("fc", 1)]
    assert S.localize(scores, k=1, exclude=("bn", "downsample")) == [("fc", 0)]
    assert S.localize(scores, k=1, exclude=(S.CLASSIFIER, "downsample")) == [("layer1.0.bn1", 0)]
    # "conv1" names every layer with a dotted part starting with conv1
    assert S.localize(scores, k=1, exclude=S.DEFAULT_EXCLUDE + ("conv1",)) == [("subnet", 0)]
    assert S.localize(scores, k=1, exclude=S.DEFAULT_EXCLUDE + ("layer1.0.conv1",)) == [("conv1", 1)]
    assert S.localize(scores, k=1, exclude=S.DEFAULT_EXCLUDE + ("layer1",)) == [("conv1", 1)]
    assert ("subnet", 0) in S.localize(scores, k=6)
    assert S.localize(scores, k=1, per_layer=True) == [("conv1", 1), ("layer1.0.conv1", 1), ("subnet", 0)]
    with pytest.raises(ValueError, match="k=7 exceeds"):
        S.localize(scores, k=7)
    with pytest.raises(ValueError, match="k must"):
        S.localize(scores, k=0)
    with pytest.raises(ValueError, match="exclude"):
        S.localize(scores, k=1, exclude="bn")


def test_localize_grouped_and_plain_dict():
    grouped = S.NeuronScores({"a": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "b": torch.tensor([[0.5], [3.0]]),
                              "head": torch.tensor([[9.0], [9.0]])}, "g", classifier="head")
    assert S.localize(grouped, k=1, group=0) == [("a", 0)]
    assert S.localize(grouped, k=2, group=1) == [("b", 0), ("a", 1)]
    with pytest.raises(ValueError, match="group"):
        S.localize(grouped, k=1)
    with pytest.raises(ValueError, match="group"):
        S.localize(grouped, k=1, group=2)
    plain = {"a": torch.tensor([1.0, 3.0]), "last": torch.tensor([10.0])}  # last entry = classifier
    assert S.localize(plain, k=1) == [("a", 1)]
    with pytest.raises(ValueError, match="group"):
        S.localize(plain, k=1, group=0)
    with pytest.raises(ValueError, match="NaN"):
        S.localize({"a": torch.tensor([1.0, float("nan")]), "z": torch.tensor([0.0])}, k=1)


def test_auroc_matches_pairwise_count():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=gen).double()  # many ties
    positive = torch.rand(60, generator=gen) < 0.3
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert abs(S.auroc(scores, positive) - pairs.mean().item()) < 1e-12
    assert S.auroc(torch.tensor([1.0, 2.0]), torch.tensor([False, True])) == 1.0
    with pytest.raises(ValueError, match="both"):
        S.auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True]))



def test_average_ranks_count_smaller_and_half_the_ties():
    gen = torch.Generator().manual_seed(1)
    values = torch.randint(0, 5, (40,), generator=gen).double()  # many ties
    smaller = (values[None, :] < values[:, None]).double().sum(1)
    tied = (values[None, :] == values[:, None]).double().sum(1)  # includes itself
    assert torch.equal(S.average_ranks(values), smaller + (tied + 1) / 2)


def test_dataset_forms_agree():
    model = small_cnn()
    x, y, g = toy_data(n=16)

    class Attr:
        images, labels, group_ids = x, y, g

    class MapStyle(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return x[i], int(y[i]), int(g[i])

    ref = S.self_influence(model, (x, y, g))
    torch.testing.assert_close(S.self_influence(model, Attr()), ref)
    torch.testing.assert_close(S.self_influence(model, MapStyle()), ref)
    torch.testing.assert_close(S.self_influence(model, torch.utils.data.DataLoader(MapStyle(), batch_size=5)), ref)
    with pytest.raises(TypeError, match="dataset"):
        S.self_influence(model, 3)
