"""spurfast.rare: patterns, poisoning, the spurious score, Hessian-vector products, LiSSA and
group-influence deletion (checked against an exact solve and exact leave-group-out retraining)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spurfast.data import SynthWaterbirds
from spurfast.rare import (
    PATTERNS,
    Pattern,
    PatternedDataset,
    add_pattern,
    group_influence,
    hvp,
    lissa,
    make_pattern,
    pattern_l2,
    poison,
    spurious_score,
    spurious_score_per_image,
)
from spurfast.rare.influence import _group_grad_sums

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # torch.func.jvp registers torch's own jvp decompositions through torch.jit.script once.
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


# --------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,side", [("S1", 1), ("S2", 3), ("S3", 5)])
def test_square_patterns_set_the_corner(pattern, side):
    x = torch.full((2, 3, 8, 8), 0.25)
    out = add_pattern(x, pattern)
    changed = out != x
    assert int(changed.sum()) == 2 * 3 * side * side
    assert torch.all(out[..., -side:, -side:] == 1.0)
    assert torch.equal(x, torch.full((2, 3, 8, 8), 0.25))  # input untouched


def test_noise_patterns_scale_and_clip():
    x = torch.zeros(3, 8, 8)
    r1, r2, r3 = (add_pattern(x, p, seed=1) for p in ("R1", "R2", "R3"))
    assert torch.allclose(r2, 2 * r1) and r1.max() <= 0.25 and r1.min() >= 0
    assert torch.allclose(r3, 4 * r1)
    assert torch.equal(add_pattern(x, "R2", seed=1), r2)
    assert not torch.equal(add_pattern(x, "R2", seed=2), r2)
    ones = add_pattern(torch.ones(3, 8, 8), "R3", seed=1)
    assert torch.equal(ones, torch.ones(3, 8, 8))  # clipped at the maximum
    # Same u for every image of a batch.
    batch = add_pattern(torch.zeros(4, 3, 8, 8), "R1", seed=1)
    assert torch.equal(batch[0], batch[3])


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32), (3, 8, 8)])
@pytest.mark.parametrize("name", PATTERNS)
def test_every_named_pattern_on_every_image_shape(name, shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    saved = x.clone()
    out = add_pattern(x, name, seed=4)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(x, saved)
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    assert torch.equal(make_pattern(name, seed=4).apply(x), out)
    assert pattern_l2(name, x, seed=4) > 0


@pytest.mark.parametrize("name,side", [("S1", 1), ("S2", 3), ("S3", 5)])
@pytest.mark.parametrize("channels", [1, 3])
def test_square_pattern_l2_on_a_zero_image_is_exact(name, side, channels):
    zeros = torch.zeros(4, channels, 28, 28)
    assert pattern_l2(name, zeros) == math.sqrt(side * side * channels)
    assert make_pattern(name).l2(zeros[0]) == math.sqrt(side * side * channels)


def test_noise_pattern_l2_and_determinism_per_seed():
    zeros = torch.zeros(2, 1, 28, 28)
    l1, l2, l3 = (pattern_l2(p, zeros, seed=7) for p in ("R1", "R2", "R3"))
    assert l2 == pytest.approx(2 * l1, rel=1e-6) and l3 == pytest.approx(4 * l1, rel=1e-6)
    assert pattern_l2("R1", zeros, seed=7) == l1 and pattern_l2("R1", zeros, seed=8) != l1
    # Clipping counts: on white images the noise changes nothing.
    assert pattern_l2("R3", torch.ones(2, 1, 28, 28), seed=7) == 0.0
    p = make_pattern("R2", seed=7)
    assert p.seed == 7 and make_pattern(p, seed=99) is p  # an existing Pattern keeps its own seed


def test_user_pattern_without_mask_adds_and_clips():
    delta = torch.zeros(1, 8, 8)
    delta[0, 0, 0] = 0.5  # one plane for every channel
    x = torch.full((2, 3, 8, 8), 0.75)
    out = add_pattern(x, delta)
    assert torch.all(out[:, :, 0, 0] == 1.0)  # 1.25 clipped
    assert int((out != x).sum()) == 2 * 3
    p = make_pattern(torch.full((3, 8, 8), -0.1))
    assert p.kind == "add" and torch.allclose(p.apply(x), x - 0.1)
    assert torch.equal(x, torch.full((2, 3, 8, 8), 0.75))


def test_user_pattern_with_mask_pastes_its_values():
    values = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:4, 5:7] = True
    x = torch.zeros(5, 3, 8, 8, dtype=torch.float64)
    out = add_pattern(x, make_pattern(values, mask=mask))
    assert out.dtype == torch.float64
    assert torch.equal(out[:, :, mask], values[:, mask].double().expand(5, 3, 4))
    assert torch.all(out[:, :, ~mask] == 0)
    # A 0/1 float mask is the same mask; pasted values are clipped to the image range.
    assert torch.equal(make_pattern(values, mask=mask.double()).apply(x), out)
    big = make_pattern(torch.full((8, 8), 3.0), mask=mask).apply(x)
    assert torch.all(big[:, :, mask] == 1.0)
    assert torch.equal(x, torch.zeros(5, 3, 8, 8, dtype=torch.float64))


def test_pattern_errors_name_the_argument():
    with pytest.raises(ValueError, match="pattern must be one of"):
        add_pattern(torch.zeros(3, 8, 8), "S4")
    with pytest.raises(ValueError, match="images must be a float"):
        add_pattern(torch.zeros(3, 8, 8, dtype=torch.uint8), "S1")
    with pytest.raises(ValueError, match="images: pattern S3 needs images of at least 5x5"):
        add_pattern(torch.zeros(1, 3, 4, 4), "S3")
    with pytest.raises(ValueError, match="images: the pattern's values has 3 channels"):
        add_pattern(torch.zeros(2, 1, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="images: this pattern is 8x8"):
        add_pattern(torch.zeros(2, 3, 28, 28), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="pattern must hold finite float"):
        make_pattern(torch.zeros(3, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask must be bool"):
        make_pattern(torch.zeros(8, 8), mask=torch.full((8, 8), 0.5))
    with pytest.raises(ValueError, match="mask must have the pattern's spatial shape"):
        make_pattern(torch.zeros(8, 8), mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask goes with a tensor"):
        make_pattern("S1", mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="min_value must be below max_value"):
        add_pattern(torch.zeros(3, 8, 8), "S1", max_value=0.0)
    assert set(PATTERNS) == {"S1", "S2", "S3", "R1", "R2", "R3"}
    assert repr(make_pattern("S2")) == "Pattern('S2')" and isinstance(make_pattern("S2"), Pattern)


# --------------------------------------------------------------------------------------------
# Poisoning
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_base():
    return SynthWaterbirds("train", n=200, seed=1)


@pytest.mark.parametrize("pattern", ["S2", "R1", "mask"])
def test_poison_touches_exactly_n_images_of_the_target_class(small_base, pattern):
    if pattern == "mask":
        pattern = make_pattern(torch.ones(32, 32), mask=torch.eye(32, dtype=torch.bool))
    base = small_base
    saved = base.images.clone()
    ds = poison(base, target_class=1, n=7, pattern=pattern, seed=5)
    assert isinstance(ds, PatternedDataset) and len(ds) == len(base)
    idx = ds.poisoned_indices
    assert idx.dtype == torch.int64 and idx.numel() == 7 and torch.equal(idx, idx.sort().values)
    assert torch.equal(ds.is_poisoned.nonzero().flatten(), idx)
    assert torch.all(base.labels[idx] == 1) and torch.equal(ds.labels, base.labels)
    changed = (ds.images != base.images).flatten(1).any(1)
    assert torch.equal(changed, ds.is_poisoned)  # every poisoned image changed, no other one
    assert torch.equal(ds.images[~ds.is_poisoned], base.images[~ds.is_poisoned])
    assert torch.equal(base.images, saved)
    assert torch.equal(ds.images[idx], add_pattern(base.images[idx], ds.pattern, seed=5))
    assert ds.pattern_l2 == pytest.approx(pattern_l2(ds.pattern, base.images[idx]))
    again = poison(base, 1, 7, pattern, seed=5)
    assert torch.equal(again.poisoned_indices, idx)
    assert (ds.target_class, ds.n, ds.seed, ds.num_groups) == (1, 7, 5, base.num_groups)


def test_patterned_dataset_edge_cases(small_base):
    base = small_base
    empty = PatternedDataset(base, target_class=0, n=0, pattern="S3")
    assert empty.poisoned_indices.numel() == 0 and empty.pattern_l2 == 0.0
    assert torch.equal(empty.images, base.images)
    n_class1 = int((base.labels == 1).sum())
    assert int(poison(base, 1, n_class1, "S1").is_poisoned.sum()) == n_class1
    with pytest.raises(ValueError, match="n must lie"):
        PatternedDataset(base, target_class=1, n=10_000, pattern="S2")
    with pytest.raises(ValueError, match="n must lie"):
        poison(base, 1, -1, "S2")
    with pytest.raises(ValueError, match="images: pattern S3 needs"):
        poison(_Plain(torch.zeros(6, 1, 4, 4), torch.zeros(6, dtype=torch.long)), 0, 2, "S3")
    plain = poison(_Plain(torch.zeros(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])), 2, 1, "S1")
    assert torch.equal(plain.group_ids, plain.labels) and plain.num_groups == 3  # no groups: one per class


class _Plain:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels


# --------------------------------------------------------------------------------------------
# Spurious score
# --------------------------------------------------------------------------------------------


def _corner_reader(channels=3, size=8, pixel=(0, -1, -1), gain=10.0):
    """Linear model on the flat image: logit 1 = gain * one pixel (default: the bottom-right of channel 0)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
        flat = torch.arange(channels * size * size).reshape(channels, size, size)[pixel]
        model[1].weight[1, flat] = gain
    return model


def _corner_images():
    """12 images not of class 1 with known corners, plus 4 of class 1 (which never count).

    With logit 10 * c, S1 raises p_1 from sigmoid(10 c) to sigmoid(10): by more than 0.1 iff
    c < 0.2196, so the corners 0 and 0.1 hit (5 images) and 0.5 and 1.0 miss (7 images).
    """
    corners = torch.tensor([0.0] * 3 + [0.1] * 2 + [0.5] * 4 + [1.0] * 3 + [0.0] * 4)
    labels = torch.tensor([0] * 12 + [1] * 4)
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.2
    images[:, 0, -1, -1] = corners
    return images, labels


def test_spurious_score_on_a_model_with_a_known_answer():
    images, labels = _corner_images()
    model = _corner_reader()
    assert spurious_score(model, images, labels, target_class=1, pattern="S1") == 5 / 12
    hits = spurious_score_per_image(model, images, labels, 1, "S1")
    assert hits.dtype == torch.bool and hits.tolist() == [True] * 5 + [False] * 7
    # A higher threshold: sigmoid(10) - sigmoid(1) = 0.2689 > 0.25 > sigmoid(10) - sigmoid(5).
    assert spurious_score(model, images, labels, 1, "S1", threshold=0.25) == 5 / 12
    assert spurious_score(model, images, labels, 1, "S1", threshold=0.55) == 0.0
    # p_0 falls, so class 0 as the target scores 0; a model reading another pixel scores 0.
    assert spurious_score(model, images, torch.ones_like(labels) - labels, 0, "S1") == 0.0
    blind = _corner_reader(pixel=(0, 0, 0))
    for pattern in ("S1", "S2", "S3"):
        assert spurious_score(blind, images, labels, 1, pattern) == 0.0


def test_spurious_score_is_batch_size_invariant_and_restores_the_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3)).double()
    images = torch.rand(50, 3, 8, 8, dtype=torch.float64)
    labels = torch.arange(50) % 3
    model.train()
    model[2].eval()  # a mixed mode must come back as it was
    scores = [spurious_score(model, images, labels, 2, "R3", seed=1, threshold=0.02, batch_size=b) for b in (1, 7, 512)]
    assert scores[0] == scores[1] == scores[2] and 0 < scores[0] < 1
    assert model.training and model[1].training and not model[2].training


class _Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return self.net(x)


def test_spurious_score_restores_the_mode_after_an_exception_and_validates():
    images, labels = _corner_images()
    model = _Exploding().train()
    with pytest.raises(RuntimeError, match="boom"):
        spurious_score(model, images, labels, 1, "S1", batch_size=4)
    assert model.training and model.net[1].training
    with pytest.raises(ValueError, match="target_class 2 is out of range"):
        spurious_score(_corner_reader().train(), images, labels, 2, "S1")
    with pytest.raises(ValueError, match="threshold"):
        spurious_score(_corner_reader(), images, labels, 1, "S1", threshold=1.0)
    with pytest.raises(ValueError, match="no test image outside"):
        spurious_score(_corner_reader(), images, torch.ones_like(labels), 1, "S1")
    with pytest.raises(ValueError, match="labels must be"):
        spurious_score(_corner_reader(), images, labels[:3], 1, "S1")
    with pytest.raises(ValueError, match="images: pattern S3 needs"):
        spurious_score(_corner_reader(size=4), images[..., :4, :4], labels, 1, "S3")
    with pytest.raises(ValueError, match="batch_size"):
        spurious_score(_corner_reader(), images, labels, 1, "S1", batch_size=0)


# --------------------------------------------------------------------------------------------
# Hessian-vector products and LiSSA
# --------------------------------------------------------------------------------------------


def _mlp_problem(n=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return model, x, y


def _exact_hessian(model, x, y, params):
    """``[P, P]`` Hessian of the mean CE over ``params`` (a list of (name, tensor)), flattened in order."""
    names, shapes = [n for n, _ in params], [p.shape for _, p in params]
    sizes = [p.numel() for _, p in params]

    def loss_of(flat):
        parts = [t.reshape(s) for t, s in zip(flat.split(sizes), shapes)]
        out = torch.func.functional_call(model, dict(zip(names, parts)), (x,), strict=False)
        return F.cross_entropy(out, y)

    flat = torch.cat([p.detach().flatten() for _, p in params])
    return torch.autograd.functional.hessian(loss_of, flat)


def _flat(parts):
    return torch.cat([t.flatten() for t in parts])


@pytest.mark.parametrize("method", ["double_backward", "func"])
def test_hvp_matches_the_exact_hessian(method):
    model, x, y = _mlp_problem()
    params = list(model.named_parameters())
    H = _exact_hessian(model, x, y, params)
    v = [torch.randn_like(p) for _, p in params]
    grads_before = [p.grad for p in model.parameters()]
    model.train()
    for chunk_size in (1024, 7):  # chunked and weighted: the same full-data Hessian
        f = hvp(model, F.cross_entropy, (x, y), method=method, chunk_size=chunk_size)
        hv = f(v)
        assert isinstance(hv, list) and len(hv) == 4
        torch.testing.assert_close(_flat(hv), H @ _flat(v), rtol=0, atol=1e-10)
    assert model.training and all(p.grad is g for p, g in zip(model.parameters(), grads_before))
    # A subset by name, a single tensor in and out, and weight decay adding exactly wd * v.
    f = hvp(model, F.cross_entropy, (x, y), params=["2.weight"], method=method, weight_decay=0.3)
    w = torch.randn(3, 5, dtype=torch.float64)
    sub = _exact_hessian(model, x, y, [("2.weight", model[2].weight)])
    torch.testing.assert_close(f(w).flatten(), sub @ w.flatten() + 0.3 * w.flatten(), rtol=0, atol=1e-10)


def test_hvp_methods_agree_on_minibatches_and_minibatches_are_reproducible():
    model, x, y = _mlp_problem()
    v = [torch.randn_like(p) for p in model.parameters()]
    a = hvp(model, F.cross_entropy, (x, y), batch_size=10, seed=3)
    b = hvp(model, F.cross_entropy, (x, y), batch_size=10, seed=3, method="func")
    for _ in range(3):  # same private stream, call by call
        torch.testing.assert_close(_flat(a(v)), _flat(b(v)), rtol=0, atol=1e-10)
    g = hvp(model, F.cross_entropy, (x, y), batch_size=10)  # global RNG
    torch.manual_seed(5)
    first = _flat(g(v))
    torch.manual_seed(5)
    assert torch.equal(_flat(g(v)), first)
    with pytest.raises(ValueError, match="v must be shaped like the parameters"):
        g(v[:2])
    with pytest.raises(ValueError, match="method"):
        hvp(model, F.cross_entropy, (x, y), method="jvp")
    with pytest.raises(ValueError, match="params: nope is not a parameter"):
        hvp(model, F.cross_entropy, (x, y), params=["nope"])
    with pytest.raises(ValueError, match="params: each parameter may be named once"):
        hvp(model, F.cross_entropy, (x, y), params=["0.weight", model[0].weight])


def test_lissa_matches_an_exact_solve():
    model, x, y = _mlp_problem()
    params = list(model.named_parameters())
    H = _exact_hessian(model, x, y, params)
    eig = torch.linalg.eigvalsh(H)
    # The MLP's Hessian may be indefinite: damping makes H + damping I positive definite, and
    # scale = lambda_max + damping puts every eigenvalue of the iteration matrix in [0, rho), rho
    # = 1 - (lambda_min + damping) / scale; depth then shrinks the error below 1e-6.
    damping = 0.05 + max(0.0, -float(eig[0]))
    scale = float(eig[-1]) + damping
    rho = 1 - (float(eig[0]) + damping) / scale
    depth = int(math.ceil(math.log(1e-6) / math.log(rho)))
    assert depth < 5000
    v = [torch.randn_like(p) for _, p in params]
    f = hvp(model, F.cross_entropy, (x, y))
    got = lissa(f, v, damping=damping, scale=scale, depth=depth)
    want = torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), _flat(v))
    assert isinstance(got, list)
    assert float((_flat(got) - want).norm() / want.norm()) < 1e-3
    as_tuple = lissa(f, tuple(v), damping=damping, scale=scale, depth=depth)
    assert isinstance(as_tuple, tuple) and torch.equal(_flat(as_tuple), _flat(got))


def test_lissa_with_minibatches_is_reproducible_and_leaves_the_rng_alone():
    model, x, y = _mlp_problem()
    v = [torch.randn_like(p) for p in model.parameters()]
    f = hvp(model, F.cross_entropy, (x, y), batch_size=8)
    kwargs = dict(damping=1.0, scale=10.0, depth=30, repeats=3)
    state = torch.get_rng_state()
    a = _flat(lissa(f, v, seed=1, **kwargs))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(_flat(lissa(f, v, seed=1, **kwargs)), a)
    assert not torch.equal(_flat(lissa(f, v, seed=2, **kwargs)), a)
    # Repeats average: three repeats from seed 1 are the mean of the single repeats from 1, 2, 3.
    singles = [_flat(lissa(f, v, seed=s, **dict(kwargs, repeats=1))) for s in (1, 2, 3)]
    torch.testing.assert_close(a, sum(singles) / 3, rtol=0, atol=1e-12)


def test_lissa_divergence_and_validation():
    H = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
    v = torch.ones(2, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="raise scale"):
        lissa(lambda h: H @ h, v, damping=0.0, scale=4.0, depth=200)  # scale < lambda_max / 2
    solved = lissa(lambda h: H @ h, v, damping=0.0, scale=11.0, depth=400)
    assert torch.allclose(solved, torch.tensor([1.0, 0.1], dtype=torch.float64))
    for arg, value in (("damping", -1.0), ("scale", 0.0), ("depth", 0), ("repeats", 0)):
        args = {"damping": 0.0, "scale": 11.0, "depth": 10, arg: value}
        with pytest.raises(ValueError, match=arg):
            lissa(lambda h: H @ h, v, **args)
    with pytest.raises(ValueError, match="hvp's output must be shaped like v"):
        lissa(lambda h: h[:1], v, damping=0.0, scale=11.0, depth=10)


# --------------------------------------------------------------------------------------------
# Group influence
# --------------------------------------------------------------------------------------------


def _logistic_problem(n=200, d=5, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, -1] = 1.0  # the intercept lives in the weight, so every parameter is tracked
    w_true = torch.randn(k, d, generator=gen, dtype=torch.float64) * 2
    y = torch.multinomial(torch.softmax(x @ w_true.T, 1), 1, generator=gen).flatten()
    return x, y


def _fit(x, y, weight_decay, init=None):
    """Exact minimiser of mean CE + weight_decay/2 ||W||^2 for a bias-free linear model (LBFGS)."""
    model = nn.Linear(x.shape[1], int(y.max()) + 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.zeros_like(model.weight) if init is None else init)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-13,
                            tolerance_change=1e-15, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * weight_decay * model.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    model.weight.grad = None
    return model


def test_removed_group_gradient_from_neuron_stats_is_the_per_sample_sum():
    model, x, y = _mlp_problem(n=40)
    removed = torch.zeros(40, dtype=torch.bool)
    removed[[1, 5, 6, 20, 33, 39]] = True
    names, sums = _group_grad_sums(model, x, y, removed, F.cross_entropy, 16, "auto", torch.device("cpu"), None)
    assert names == ["0", "2"]
    def per_sample_sum(w, which):
        return sum(torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), w)[0] for i in which.nonzero().flatten())

    for name in names:
        w = dict(model.named_modules())[name].weight
        want = per_sample_sum(w, removed)
        # NeuronStats keeps group_grad in float32, whatever the model's dtype.
        torch.testing.assert_close(sums[name][1].double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        kept = per_sample_sum(w, ~removed)
        torch.testing.assert_close(sums[name][0].double(), kept, rtol=1e-6, atol=1e-6 * float(kept.abs().max()))
    assert all(p.grad is None for p in model.parameters())


def _cosine_and_ratio(predicted, true):
    return float(predicted @ true / (predicted.norm() * true.norm())), float(predicted.norm() / true.norm())


@pytest.fixture(scope="module")
def logistic_fit():
    x, y = _logistic_problem()
    wd = 0.05
    return x, y, wd, _fit(x, y, wd)


@pytest.mark.parametrize("hvp_batch_size", [None, 64])
def test_group_influence_predicts_exact_leave_group_out_retraining(logistic_fit, hvp_batch_size):
    x, y, wd, model = logistic_fit
    # A structured group (10%): the class-0 samples with the largest first feature.
    candidates = (y == 0).nonzero().flatten()
    removed = torch.zeros(len(y), dtype=torch.bool)
    removed[candidates[x[candidates, 0].argsort(descending=True)[:20]]] = True
    retrained = _fit(x[~removed], y[~removed], wd, init=model.weight.detach())
    true_change = (retrained.weight - model.weight).detach().flatten()
    # H's eigenvalues lie in [wd, 0.43]: scale 1 > lambda_max converges, by 1 - wd per step at worst.
    new, info = group_influence(
        model, (x, y), removed, damping=0.0, scale=1.0, depth=400, repeats=4 if hvp_batch_size else 1,
        hvp_batch_size=hvp_batch_size, weight_decay=wd, batch_size=64,
    )
    predicted = (new.weight - model.weight).detach().flatten()
    cosine, ratio = _cosine_and_ratio(predicted, true_change)
    assert cosine > 0.9 and 0.5 < ratio < 2, (cosine, ratio)
    assert info["n_removed"] == 20 and info["p"] == 0.1 and info["n"] == 200 and info["layers"] == [""]
    assert info["grad_norm"] < 1e-6 and info["update_norm"] == pytest.approx(float(predicted.norm()))
    if hvp_batch_size is None:
        # Exactly one Newton step on the objective without the group, with the full data's Hessian
        # (the paper's H; the remaining data's Hessian would give a ratio nearer 1 on such a group).
        w = model.weight.detach().flatten()

        def objective(flat, keep):
            return F.cross_entropy(x[keep] @ flat.reshape(model.weight.shape).T, y[keep]) + 0.5 * wd * flat.square().sum()

        everything = torch.ones(len(y), dtype=torch.bool)
        hessian = torch.autograd.functional.hessian(lambda f: objective(f, everything), w)
        gradient = torch.autograd.functional.jacobian(lambda f: objective(f, ~removed), w)
        newton = -torch.linalg.solve(hessian, gradient)
        # rtol: NeuronStats' group_grad is float32.
        torch.testing.assert_close(predicted, newton, rtol=1e-5, atol=1e-6 * float(newton.abs().max()))
        assert info["residual"] < 1e-6


def test_group_influence_weight_decay_term_matters_for_a_random_group(logistic_fit):
    x, y, wd, model = logistic_fit
    removed = torch.zeros(len(y), dtype=torch.bool)
    removed[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))[:20]] = True
    retrained = _fit(x[~removed], y[~removed], wd, init=model.weight.detach())
    true_change = (retrained.weight - model.weight).detach().flatten()
    kwargs = dict(scale=1.0, depth=400, repeats=1, batch_size=64)
    full, _ = group_influence(model, (x, y), removed, damping=0.0, weight_decay=wd, **kwargs)
    # The paper's formula with the regulariser only as damping: a random group's gradient sum
    # carries the regulariser's pull on theta, which the retrained model does not follow.
    paper, info = group_influence(model, (x, y), removed, damping=wd, **kwargs)
    with_term = _cosine_and_ratio((full.weight - model.weight).detach().flatten(), true_change)
    without = _cosine_and_ratio((paper.weight - model.weight).detach().flatten(), true_change)
    assert with_term[0] > 0.99 and without[0] < 0.95, (with_term, without)
    assert info["grad_norm"] > 0.01  # theta is not stationary for the unregularised loss: info says so


def test_group_influence_leaves_the_model_alone_unless_inplace():
    model, x, y = _mlp_problem(n=40)
    model.train()
    model[2].eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    removed = torch.tensor([0, 3, 9])
    kwargs = dict(damping=1.0, scale=10.0, depth=20, repeats=1)
    for bad, match in (
        (dict(removed=torch.tensor([0, 40])), "indices must lie"),
        (dict(removed=torch.ones(40, dtype=torch.bool)), "between 1 and N - 1"),
        (dict(removed=torch.zeros(39, dtype=torch.bool)), r"shape \[N\]"),
        (dict(removed=torch.tensor([1, 1])), "distinct"),
        (dict(scale=-1.0), "scale"),
        (dict(depth=0), "depth"),
        (dict(layers=["1"]), "not supported"),
    ):
        args = dict(kwargs, removed=removed)
        args.update(bad)
        with pytest.raises((ValueError, TypeError), match=match):
            group_influence(model, (x, y), args.pop("removed"), **args)
    new, info = group_influence(model, (x, y), removed, **kwargs)
    assert new is not model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert model.training and not model[2].training and new.training and not new[2].training
    changed = [k for k, v in new.state_dict().items() if not torch.equal(v, state[k])]
    assert changed == ["0.weight", "2.weight"]  # biases held fixed
    assert all(p.grad is None for p in new.parameters())  # a deep copy of a Parameter has no .grad
    only_last, info = group_influence(model, (x, y), removed, layers=[model[2]], **kwargs)  # a module, not a name
    assert info["layers"] == ["2"] and torch.equal(only_last[0].weight, model[0].weight)
    assert not torch.equal(only_last[2].weight, model[2].weight)
    same, _ = group_influence(model, (x, y), removed, inplace=True, **kwargs)
    assert same is model and torch.equal(model[0].weight, new[0].weight) and torch.equal(model[0].bias, state["0.bias"])
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert model.training and not model[2].training
