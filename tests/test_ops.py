"""Op level: cpp kernels vs plain-torch references vs torch.func per-sample gradients."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.func import grad, vmap

import spurfast
from spurfast.ops import (
    ablation_stats,
    ablation_stats_reference,
    activation_stats,
    activation_stats_reference,
    conv_grad_stats,
    conv_grad_stats_reference,
    linear_grad_stats,
    linear_grad_stats_reference,
    merge_group_moments,
)
from spurfast.ops._common import choose_method, interpreting, live_window, triton_importable

from _helpers import TOL, rel_err


def _func_linear(x, grad_out):
    """Per-sample dW via torch.func: d/dW <g_n, x_n W^T> for each sample."""

    def inner(w, xn, gn):
        return (gn * (xn @ w.T)).sum()

    w = torch.zeros(grad_out.shape[-1], x.shape[-1], dtype=x.dtype)
    return vmap(grad(inner), in_dims=(None, 0, 0))(w, x, grad_out)


def _func_conv(x, grad_out, weight_shape, stride, padding, dilation, groups):
    conv = F.conv1d if len(weight_shape) == 3 else F.conv2d

    def inner(w, xn, gn):
        return (gn * conv(xn.unsqueeze(0), w, None, stride, padding, dilation, groups)[0]).sum()

    w = torch.zeros(weight_shape, dtype=x.dtype)
    return vmap(grad(inner), in_dims=(None, 0, 0))(w, x, grad_out)


def _expected(per_sample, group_ids, num_groups):
    grad_sq = per_sample.flatten(2).square().sum(-1)
    group_grad = torch.stack([per_sample[group_ids == g].sum(0) for g in range(num_groups)])
    return grad_sq, group_grad


LINEAR_SHAPES = [  # (B, T, D, C): T=None means a [B, D] input
    (7, None, 13, 5),
    (6, 1, 4, 9),
    (5, 3, 11, 6),
    (4, 17, 6, 3),
    (3, 2, 40, 33),
]


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("method", ["direct", "gram"])
def test_linear_matches_torch_func(shape, method, has_ext):
    b, t, d, c = shape
    torch.manual_seed(0)
    x = torch.randn((b, d) if t is None else (b, t, d), dtype=torch.float64)
    g = torch.randn(x.shape[:-1] + (c,), dtype=torch.float64)
    group_ids = torch.tensor([0, 2, 2, 4, 0, 2, 4][:b])  # groups 1 and 3 empty
    per_sample = _func_linear(x, g)
    want_sq, want_gg = _expected(per_sample, group_ids, 5)
    for backend in ("torch", "cpp"):
        grad_sq, group_grad = linear_grad_stats(x, g, group_ids, 5, backend=backend, method=method)
        assert grad_sq.shape == (b, c) and group_grad.shape == (5, c, d)
        assert grad_sq.dtype == torch.float64
        assert rel_err(grad_sq, want_sq) < TOL[torch.float64]
        assert rel_err(group_grad, want_gg) < TOL[torch.float64]
        assert group_grad[1].abs().max() == 0 and group_grad[3].abs().max() == 0


CONV_CASES = [  # (in_ch, out_ch, spatial, kernel, stride, padding, dilation, groups)
    (3, 4, (9, 9), (3, 3), 1, 1, 1, 1),
    (4, 6, (10, 11), (3, 2), (2, 1), (1, 0), 1, 2),
    (4, 4, (12, 12), (3, 3), 1, 2, 2, 4),  # depthwise, dilated
    (2, 6, (7, 7), (1, 1), 2, 0, 1, 1),
    (6, 3, (5, 5), (5, 5), 1, 2, 1, 3),
    (3, 5, (20,), (5,), 2, 2, 1, 1),  # Conv1d
    (4, 4, (16,), (3,), 1, 2, 2, 2),  # Conv1d, dilated, grouped
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("method", ["direct", "gram"])
def test_conv_matches_torch_func(case, method, has_ext):
    cin, cout, spatial, kernel, stride, padding, dilation, groups = case
    torch.manual_seed(1)
    b = 5
    weight_shape = (cout, cin // groups) + kernel
    x = torch.randn((b, cin) + spatial, dtype=torch.float64)
    conv = F.conv1d if len(spatial) == 1 else F.conv2d
    out = conv(x, torch.zeros(weight_shape, dtype=torch.float64), None, stride, padding, dilation, groups)
    g = torch.randn_like(out)
    group_ids = torch.tensor([1, 0, 1, 1, 2])
    want_sq, want_gg = _expected(_func_conv(x, g, weight_shape, stride, padding, dilation, groups), group_ids, 3)
    for backend in ("torch", "cpp"):
        grad_sq, group_grad = conv_grad_stats(
            x, g, weight_shape, stride, padding, dilation, groups, group_ids, 3, backend=backend, method=method
        )
        assert group_grad.shape == (3,) + weight_shape
        assert rel_err(grad_sq, want_sq) < TOL[torch.float64]
        assert rel_err(group_grad, want_gg) < TOL[torch.float64]


WIDE_SMALL_MAP_CASES = [  # (in_ch, out_ch, spatial, kernel, stride, padding, dilation): the im2col weight gradient
    (6, 256, (4, 4), (3, 3), 1, 1, 1),   # 4x4 map
    (5, 256, (4, 4), (3, 3), 2, 1, 1),   # stride 2: 2x2 map
    (3, 260, (3, 5), (2, 3), 1, (0, 1), (1, 2)),  # uneven kernel, padding and dilation; 2x1 map
]


@pytest.mark.parametrize("case", WIDE_SMALL_MAP_CASES)
@pytest.mark.parametrize("num_groups", [1, 3])
def test_conv_gram_group_sums_on_wide_small_maps_match_torch_func(case, num_groups, has_ext):
    """At least 256 output channels and at most 16 positions: the C++ Gram path forms the group
    sums (and dW when there is one group) by im2col + GEMM instead of convolution_backward."""
    cin, cout, spatial, kernel, stride, padding, dilation = case
    torch.manual_seed(2)
    weight_shape = (cout, cin) + kernel
    x = torch.randn((5, cin) + spatial, dtype=torch.float64)
    g = torch.randn_like(F.conv2d(x, torch.zeros(weight_shape, dtype=torch.float64), None, stride, padding, dilation))
    assert g[0, 0].numel() <= 16
    group_ids = torch.tensor([1, 0, 1, 1, 2]) if num_groups == 3 else torch.zeros(5, dtype=torch.long)
    want_sq, want_gg = _expected(_func_conv(x, g, weight_shape, stride, padding, dilation, 1), group_ids, num_groups)
    grad_sq, group_grad = conv_grad_stats(
        x, g, weight_shape, stride, padding, dilation, 1, group_ids, num_groups, backend="cpp", method="gram"
    )
    assert rel_err(grad_sq, want_sq) < TOL[torch.float64]
    assert rel_err(group_grad, want_gg) < TOL[torch.float64]


def test_conv_im2col_weight_gradient_across_sample_chunks(has_ext):
    """60 samples of 128x9 patches at 16 positions fill more than one 2^20-element chunk:
    the chunks' GEMMs add up to the weight gradient, per group and over the batch."""
    torch.manual_seed(3)
    x = torch.randn(60, 128, 4, 4, dtype=torch.float64)
    g = torch.randn(60, 256, 4, 4, dtype=torch.float64)
    weight_shape = (256, 128, 3, 3)

    def weight_grad(rows):
        return torch.ops.aten.convolution_backward(
            g[rows], x[rows], x.new_empty(weight_shape), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [False, True, False])[1]

    everything = torch.arange(60)
    _, total = conv_grad_stats(x, g, weight_shape, 1, 1, 1, 1, torch.zeros(60, dtype=torch.long), 1,
                               backend="cpp", method="gram")
    assert rel_err(total[0], weight_grad(everything)) < TOL[torch.float64]
    group_ids = everything % 2
    _, per_group = conv_grad_stats(x, g, weight_shape, 1, 1, 1, 1, group_ids, 2, backend="cpp", method="gram")
    for gi in range(2):
        assert rel_err(per_group[gi], weight_grad(everything[group_ids == gi])) < TOL[torch.float64]


STRING_PADDING_CASES = [  # (in_ch, out_ch, spatial, kernel, dilation, groups, padding)
    (3, 4, (6, 5), (3, 3), 1, 1, "same"),  # odd kernel: symmetric
    (3, 4, (6, 5), (4, 4), 1, 1, "same"),  # even kernel: extra row/column at the bottom/right
    (4, 6, (7, 6), (3, 2), (2, 1), 2, "same"),  # even total in one dim only, dilated, grouped
    (4, 4, (7, 6), (2, 3), (3, 2), 4, "same"),  # depthwise, odd total from an even kernel and dilation 3
    (3, 5, (6, 5), (2, 3), 1, 1, "valid"),
    (3, 5, (20,), (5,), 1, 1, "same"),  # Conv1d
    (3, 5, (20,), (4,), 1, 1, "same"),  # Conv1d, even kernel
    (4, 4, (16,), (2,), 3, 2, "same"),  # Conv1d, dilated, grouped, odd total
    (4, 4, (16,), (3,), 2, 2, "valid"),
]


@pytest.mark.parametrize("case", STRING_PADDING_CASES)
@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's own conv, computing the expected shape
def test_conv_string_padding_matches_torch_func(case):
    cin, cout, spatial, kernel, dilation, groups, padding = case
    torch.manual_seed(9)
    b = 4
    weight_shape = (cout, cin // groups) + kernel
    x = torch.randn((b, cin) + spatial, dtype=torch.float64)
    conv = F.conv1d if len(spatial) == 1 else F.conv2d
    out = conv(x, torch.zeros(weight_shape, dtype=torch.float64), None, 1, padding, dilation, groups)
    if padding == "same":
        assert out.shape[2:] == x.shape[2:]
    g = torch.randn_like(out)
    group_ids = torch.tensor([2, 0, 2, 2])  # group 1 empty
    want_sq, want_gg = _expected(_func_conv(x, g, weight_shape, 1, padding, dilation, groups), group_ids, 3)
    ref = conv_grad_stats_reference(x, g, weight_shape, 1, padding, dilation, groups, group_ids, 3)
    assert rel_err(ref[0], want_sq) < TOL[torch.float64] and rel_err(ref[1], want_gg) < TOL[torch.float64]
    for backend in ("torch", "cpp") if spurfast._extension.load_extension() is not None else ("torch",):
        for method in ("direct", "gram"):
            grad_sq, group_grad = conv_grad_stats(
                x, g, weight_shape, 1, padding, dilation, groups, group_ids, 3, backend=backend, method=method
            )
            assert group_grad.shape == (3,) + weight_shape
            assert rel_err(grad_sq, want_sq) < TOL[torch.float64]
            assert rel_err(group_grad, want_gg) < TOL[torch.float64]


@pytest.mark.parametrize("case", STRING_PADDING_CASES)
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_string_padding_on_triton_matches_torch_func(case, triton_interpreter):
    if not (interpreting() and triton_importable()):
        pytest.skip("runs the Triton kernels on CPU through the interpreter; test_triton.py covers CUDA")
    cin, cout, spatial, kernel, dilation, groups, padding = case
    torch.manual_seed(9)
    b = 4
    weight_shape = (cout, cin // groups) + kernel
    xf = torch.randn((b, cin) + spatial, dtype=torch.float64).float()  # Triton takes float32; same draws as above
    conv = F.conv1d if len(spatial) == 1 else F.conv2d
    out = conv(xf, torch.zeros(weight_shape), None, 1, padding, dilation, groups)
    gf = torch.randn_like(out.double()).float()
    group_ids = torch.tensor([2, 0, 2, 2])  # group 1 empty
    # The expectation is computed in float64 from the float32 inputs themselves.
    want_sq, want_gg = _expected(_func_conv(xf.double(), gf.double(), weight_shape, 1, padding, dilation, groups),
                                 group_ids, 3)
    for method in ("direct", "gram"):
        grad_sq, group_grad = conv_grad_stats(
            xf, gf, weight_shape, 1, padding, dilation, groups, group_ids, 3, backend="triton", method=method
        )
        assert rel_err(grad_sq, want_sq) < TOL[torch.float32]
        assert rel_err(group_grad, want_gg) < TOL[torch.float32]


def test_conv_bad_string_padding_raises_clearly():
    x, g, ids = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6), torch.zeros(2, dtype=torch.long)
    for op in (conv_grad_stats, conv_grad_stats_reference):
        with pytest.raises(ValueError, match="padding must be an int, a sequence of ints, 'same' or 'valid', got 'full'"):
            op(x, g, (4, 3, 3, 3), 1, "full", 1, 1, ids, 1)
        with pytest.raises(ValueError, match=r"padding='same' needs stride 1.*got stride=\(2, 2\)"):
            op(x, g, (4, 3, 3, 3), 2, "same", 1, 1, ids, 1)
        with pytest.raises(ValueError, match="needs x and grad_out of 4 dims"):
            op(x[0], g, (4, 3, 3, 3), 1, "same", 1, 1, ids, 1)


@pytest.mark.parametrize("shape", [(5, 7), (5, 1, 7), (5, 3, 7), (5, 2, 3, 7)])
def test_linear_reference_accepts_2d_and_nd_inputs(shape):
    torch.manual_seed(10)
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape[:-1] + (4,), dtype=torch.float64)
    ids = torch.tensor([1, 0, 1, 1, 0])
    want_sq, want_gg = _expected(_func_linear(x, g), ids, 3)
    grad_sq, group_grad = linear_grad_stats_reference(x, g, ids, 3)
    assert grad_sq.shape == (5, 4) and group_grad.shape == (3, 4, 7)
    assert rel_err(grad_sq, want_sq) < TOL[torch.float64]
    assert rel_err(group_grad, want_gg) < TOL[torch.float64]
    got = linear_grad_stats(x, g, ids, 3, backend="torch")
    assert torch.equal(got[0], grad_sq) and torch.equal(got[1], group_grad)


def test_linear_reference_rejects_bad_shapes_clearly():
    x, g, ids = torch.randn(4, 5), torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x must have shape \[B, D\] or \[B, ..., D\], got \[5\]"):
        linear_grad_stats_reference(x[0], g, ids, 1)
    with pytest.raises(ValueError, match=r"grad_out must have shape \[B, D\] or \[B, ..., D\], got \[3\]"):
        linear_grad_stats_reference(x, g[0], ids, 1)
    with pytest.raises(ValueError, match="share leading dims, got \\[4, 5\\] and \\[3, 3\\]"):
        linear_grad_stats_reference(x, g[:3], ids, 1)
    with pytest.raises(ValueError, match="share leading dims"):
        linear_grad_stats_reference(torch.randn(4, 2, 5), torch.randn(4, 3, 3), ids, 1)
    with pytest.raises(ValueError, match=r"group_ids must have shape \[4\]"):
        linear_grad_stats_reference(x, g, ids[:3], 1)
    with pytest.raises(TypeError, match="grad_out must be float16/bfloat16/float32/float64"):
        linear_grad_stats_reference(x, g.long(), ids, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype, has_ext):
    torch.manual_seed(2)
    x = torch.randn(6, 5, 24).to(dtype)
    g = torch.randn(6, 5, 16).to(dtype)
    ids = torch.tensor([0, 1, 0, 1, 1, 0])
    want_sq, want_gg = linear_grad_stats_reference(x.double(), g.double(), ids, 2)
    for method in ("direct", "gram"):
        grad_sq, group_grad = linear_grad_stats(x, g, ids, 2, backend="cpp", method=method)
        assert grad_sq.dtype == torch.float32 and group_grad.dtype == torch.float32
        assert rel_err(grad_sq, want_sq) < TOL[dtype]
        assert rel_err(group_grad, want_gg) < TOL[dtype]
    xc = torch.randn(4, 3, 8, 8).to(dtype)
    gc = torch.randn(4, 6, 8, 8).to(dtype)
    want_sq, want_gg = conv_grad_stats_reference(xc.double(), gc.double(), (6, 3, 3, 3), 1, 1, 1, 1, ids[:4], 2)
    grad_sq, group_grad = conv_grad_stats(xc, gc, (6, 3, 3, 3), 1, 1, 1, 1, ids[:4], 2, backend="cpp")
    assert rel_err(grad_sq, want_sq) < TOL[dtype] and rel_err(group_grad, want_gg) < TOL[dtype]


def test_group_grad_sums_to_weight_grad(has_ext):
    torch.manual_seed(3)
    layer = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    x = torch.randn(6, 3, 9, 9, dtype=torch.float64)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    ids = torch.tensor([3, 0, 0, 3, 1, 1])
    _, group_grad = conv_grad_stats(x, g, layer.weight.shape, 2, 1, 1, 1, ids, 4, backend="cpp")
    assert rel_err(group_grad.sum(0), layer.weight.grad) < TOL[torch.float64]


def test_cost_model_picks_gram_for_few_tokens_and_direct_for_many():
    assert choose_method(1, 512, 512) == "direct"
    assert choose_method(4, 768, 768) == "gram"
    assert choose_method(16, 512, 4608) == "gram"  # late ResNet stage on 32x32 inputs
    assert choose_method(1024, 64, 576) == "direct"  # first ResNet stage
    assert choose_method(197, 384, 384) == "direct"


@pytest.mark.parametrize("positions", [5, 1])  # 1: a Linear on one token (the mean is the output)
@pytest.mark.parametrize("channels_last", [False, True])
def test_activation_stats_matches_reference(channels_last, positions, has_ext):
    torch.manual_seed(4)
    shape = (9, positions, 6) if channels_last else (9, 6, positions)  # [B, P, C] or [B, C, P]
    y = torch.randn(shape, dtype=torch.float64)
    ids = torch.tensor([0, 2, 2, 0, 0, 2, 2, 2, 0])
    got = activation_stats(y, ids, 4, channel_dim=-1 if channels_last else 1, backend="cpp")
    want = activation_stats_reference(y, ids, 4, channels_last)
    act = y.mean(1) if channels_last else y.mean(2)
    assert torch.allclose(got[0], act) and torch.allclose(want[0], act)
    assert got[1].tolist() == [4, 0, 5, 0]
    for a, b in zip(got[1:], want[1:]):
        assert torch.allclose(a.double(), b.double())
    for gid in (0, 2):
        rows = act[ids == gid]
        assert torch.allclose(got[2][gid], rows.mean(0))
        assert torch.allclose(got[3][gid], ((rows - rows.mean(0)) ** 2).sum(0))


def test_merge_group_moments_equals_one_pass():
    torch.manual_seed(5)
    acts = torch.randn(30, 4, dtype=torch.float64) * 3 + 1
    ids = torch.randint(0, 3, (30,))
    ids[:3] = torch.tensor([0, 1, 2])
    state = activation_stats_reference(acts[:0].unsqueeze(-1), ids[:0], 3, False)[1:]
    for lo, hi in ((0, 7), (7, 8), (8, 30)):
        _, count, mean, m2 = activation_stats_reference(acts[lo:hi].unsqueeze(-1), ids[lo:hi], 3, False)
        state = merge_group_moments(*state, count, mean, m2)
    count, mean, m2 = state
    for g in range(3):
        rows = acts[ids == g]
        assert count[g] == rows.shape[0]
        assert torch.allclose(mean[g], rows.mean(0))
        assert torch.allclose(m2[g] / count[g], rows.var(0, unbiased=False))


def test_merge_group_moments_with_per_channel_counts_equals_per_layer_merges():
    """Two layers' channels side by side, each with its own counts ([G, C] counts), merge as
    each layer would alone (how NeuronStats folds every layer at once)."""
    torch.manual_seed(6)
    ids_a, ids_b = torch.randint(0, 3, (9,)), torch.randint(0, 3, (5,))
    first = [activation_stats_reference(torch.randn(n, c, 1, dtype=torch.float64), ids, 3, False)[1:]
             for n, c, ids in ((9, 2, ids_a), (4, 3, ids_a[:4]))]  # the second layer saw fewer samples
    batch = [activation_stats_reference(torch.randn(5, c, 1, dtype=torch.float64), ids_b, 3, False)[1:]
             for c in (2, 3)]
    alone = [merge_group_moments(*a, *b) for a, b in zip(first, batch)]
    widths = torch.tensor([2, 3])
    side = merge_group_moments(
        torch.stack([a[0] for a in first]).t().repeat_interleave(widths, dim=1), torch.cat([a[1] for a in first], 1),
        torch.cat([a[2] for a in first], 1),
        torch.stack([b[0] for b in batch]).t().repeat_interleave(widths, dim=1), torch.cat([b[1] for b in batch], 1),
        torch.cat([b[2] for b in batch], 1),
    )
    for i, (lo, hi) in enumerate(((0, 2), (2, 5))):
        assert torch.equal(side[0][:, lo], alone[i][0])
        torch.testing.assert_close(side[1][:, lo:hi], alone[i][1], rtol=0, atol=0)
        torch.testing.assert_close(side[2][:, lo:hi], alone[i][2], rtol=0, atol=0)


# ---------------------------------------------------------------- property tests


@given(
    b=st.integers(1, 6), t=st.integers(1, 5), d=st.integers(1, 9), c=st.integers(1, 7),
    num_groups=st.integers(1, 4), method=st.sampled_from(["direct", "gram"]), seed=st.integers(0, 2**16),
)
def test_property_linear_cpp_equals_torch(b, t, d, c, num_groups, method, seed):
    if spurfast._extension.load_extension() is None:
        pytest.skip("compiled extension not built")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    g = torch.randn(b, t, c, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, num_groups, (b,), generator=gen)
    got = linear_grad_stats(x, g, ids, num_groups, backend="cpp", method=method)
    want = linear_grad_stats(x, g, ids, num_groups, backend="torch")
    for a, w in zip(got, want):
        assert rel_err(a, w) < TOL[torch.float64]


@given(
    b=st.integers(1, 4), groups=st.integers(1, 3), cin_per=st.integers(1, 3), cout_per=st.integers(1, 3),
    h=st.integers(3, 9), w=st.integers(3, 9), kh=st.integers(1, 3), kw=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), method=st.sampled_from(["direct", "gram"]),
    seed=st.integers(0, 2**16),
)
def test_property_conv_cpp_equals_torch(b, groups, cin_per, cout_per, h, w, kh, kw, stride, padding, dilation, method, seed):
    if spurfast._extension.load_extension() is None:
        pytest.skip("compiled extension not built")
    if h + 2 * padding[0] < dilation[0] * (kh - 1) + 1 or w + 2 * padding[1] < dilation[1] * (kw - 1) + 1:
        return  # no output position
    gen = torch.Generator().manual_seed(seed)
    weight_shape = (cout_per * groups, cin_per, kh, kw)
    x = torch.randn(b, cin_per * groups, h, w, generator=gen, dtype=torch.float64)
    out = F.conv2d(x, torch.zeros(weight_shape, dtype=torch.float64), None, stride, padding, dilation, groups)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 3, (b,), generator=gen)
    got = conv_grad_stats(x, g, weight_shape, stride, padding, dilation, groups, ids, 3, backend="cpp", method=method)
    want = conv_grad_stats(x, g, weight_shape, stride, padding, dilation, groups, ids, 3, backend="torch")
    for a, w_ in zip(got, want):
        assert rel_err(a, w_) < TOL[torch.float64]


# ---------------------------------------------------------------- custom-op registration


def test_opcheck(has_ext):
    torch.manual_seed(6)
    ids = torch.tensor([0, 1, 1, 0])
    x, g = torch.randn(4, 3, 5), torch.randn(4, 3, 6)
    for method in ("direct", "gram"):
        torch.library.opcheck(torch.ops.spurfast.linear_grad_stats.default, (x, g, ids, 2, method))
    xc, gc = torch.randn(4, 2, 6, 6), torch.randn(4, 4, 3, 3)
    for method in ("direct", "gram"):
        torch.library.opcheck(
            torch.ops.spurfast.conv2d_grad_stats.default, (xc, gc, [3, 3], [2, 2], [1, 1], [1, 1], 2, ids, 2, method)
        )
    torch.library.opcheck(torch.ops.spurfast.activation_stats.default, (torch.randn(4, 3, 7), ids, 2, False))
    torch.library.opcheck(torch.ops.spurfast.activation_stats.default, (torch.randn(4, 7, 3), ids, 2, True))
    torch.library.opcheck(torch.ops.spurfast.group_row_sums.default, (torch.randn(4, 7), ids, 3))


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    x, g = torch.randn(4, 5), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"group_ids must lie in \[0, num_groups=2\)"):
        linear_grad_stats(x, g, torch.tensor([0, 1, 2, 0]), 2, backend="torch")
    with pytest.raises(ValueError, match="group_ids must have shape \\[4\\]"):
        linear_grad_stats(x, g, torch.tensor([0, 1]), 2)
    with pytest.raises(TypeError, match="group_ids must be an integer tensor"):
        linear_grad_stats(x, g, torch.zeros(4), 2)
    with pytest.raises(ValueError, match="share leading dims"):
        linear_grad_stats(x, torch.randn(3, 3), torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(FloatingPointError, match="grad_out contains NaN"):
        linear_grad_stats(x, torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_grad_stats(x, g, torch.zeros(4, dtype=torch.long), 1, backend="cuda-magic")
    with pytest.raises(ValueError, match="method must be one of"):
        linear_grad_stats(x, g, torch.zeros(4, dtype=torch.long), 1, method="fast")
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        linear_grad_stats(x, g, torch.zeros(4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="shapes disagree"):
        conv_grad_stats(torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3), (4, 2, 3, 3), 1, 0, 1, 1, torch.zeros(2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="output positions"):
        conv_grad_stats(torch.randn(2, 3, 5, 5), torch.randn(2, 4, 4, 4), (4, 3, 3, 3), 1, 0, 1, 1, torch.zeros(2, dtype=torch.long), 1, backend="torch")
    with pytest.raises(TypeError, match="x must be float16/bfloat16/float32/float64"):
        linear_grad_stats(torch.ones(4, 5, dtype=torch.long), g, torch.zeros(4, dtype=torch.long), 1)


def test_cpp_kernel_rejects_mismatched_output_positions(has_ext):
    with pytest.raises(RuntimeError, match="output positions"):
        conv_grad_stats(torch.randn(2, 3, 5, 5), torch.randn(2, 4, 4, 4), (4, 3, 3, 3), 1, 0, 1, 1, torch.zeros(2, dtype=torch.long), 1, backend="cpp")


@pytest.mark.gpu
def test_cuda_tensors_match_cpu_reference():
    torch.manual_seed(7)
    x, g = torch.randn(8, 4, 32), torch.randn(8, 4, 16)
    ids = torch.randint(0, 3, (8,))
    want = linear_grad_stats_reference(x.double(), g.double(), ids, 3)
    got = linear_grad_stats(x.cuda(), g.cuda(), ids.cuda(), 3)
    for a, w in zip(got, want):
        assert rel_err(a.cpu(), w) < 1e-4


def test_multi_chunk_paths_match_reference(has_ext):
    """Shapes big enough that the cpp kernels split the batch into several chunks."""
    torch.manual_seed(8)
    ids = torch.tensor([1, 0, 1])
    # direct: one 2048x1024 per-sample product per chunk
    x, g = torch.randn(3, 2, 1024), torch.randn(3, 2, 2048)
    want = linear_grad_stats_reference(x.double(), g.double(), ids, 2)
    for a, w in zip(linear_grad_stats(x, g, ids, 2, backend="cpp", method="direct"), want):
        assert rel_err(a, w) < TOL[torch.float32]
    # gram: one 2048x2048 Gram matrix (and its product with grad_out) per chunk
    x, g = torch.randn(3, 2048, 16), torch.randn(3, 2048, 2048)
    want = linear_grad_stats_reference(x.double(), g.double(), ids, 2)
    for a, w in zip(linear_grad_stats(x, g, ids, 2, backend="cpp", method="gram"), want):
        assert rel_err(a, w) < TOL[torch.float32]
    # conv direct: one 512 x 4608 per-sample product per chunk
    xc, gc = torch.randn(3, 512, 4, 4), torch.randn(3, 512, 4, 4)
    want = conv_grad_stats_reference(xc.double(), gc.double(), (512, 512, 3, 3), 1, 1, 1, 1, ids, 2)
    for a, w in zip(conv_grad_stats(xc, gc, (512, 512, 3, 3), 1, 1, 1, 1, ids, 2, backend="cpp", method="direct"), want):
        assert rel_err(a, w) < TOL[torch.float32]


# ---------------------------------------------------------------- ablation statistic


@pytest.mark.parametrize("kind", ["linear", "tokens", "conv", "conv1d", "grouped"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_ablation_stats_matches_per_sample_grad_definition(kind, with_bias, has_ext):
    """-<dW_n[c], W[c]> from per-sample gradients equals the output-gradient form on every backend."""
    torch.manual_seed(11)
    dt = torch.float64
    if kind in ("linear", "tokens"):
        shape = (6, 9) if kind == "linear" else (6, 4, 9)
        x = torch.randn(shape, dtype=dt)
        w, b = torch.randn(5, 9, dtype=dt), torch.randn(5, dtype=dt)
        y = F.linear(x, w, b if with_bias else None)
        g = torch.randn_like(y)
        per_sample = linear_grad_stats(x, g, torch.arange(6), 6, backend="torch")[1]  # one group per sample
        channel_dim = -1
    else:
        groups = 3 if kind == "grouped" else 1
        if kind == "conv1d":
            x = torch.randn(6, 3, 11, dtype=dt)
            w = torch.randn(4, 3, 3, dtype=dt)
            y = F.conv1d(x, w, None, 2, 1)
            stride, padding = 2, 1
        else:
            x = torch.randn(6, 3, 7, 7, dtype=dt)
            w = torch.randn(6, 3 // groups, 3, 3, dtype=dt)
            stride, padding = 1, 1
            y = F.conv2d(x, w, None, stride, padding, 1, groups)
        b = torch.randn(w.shape[0], dtype=dt)
        if with_bias:
            y = y + b.view(1, -1, *([1] * (y.dim() - 2)))
        g = torch.randn_like(y)
        per_sample = conv_grad_stats(x, g, w.shape, stride, padding, 1, groups, torch.arange(6), 6, backend="torch")[1]
        channel_dim = 1
    want = ablation_stats_reference(per_sample, w)  # [B, C]
    backends = ["torch", "cpp"] if has_ext else ["torch"]
    for backend in backends:
        got = ablation_stats(y, g, b if with_bias else None, channel_dim=channel_dim, backend=backend)
        assert got.dtype == torch.float64
        assert rel_err(got, want) < TOL[torch.float64], backend
        got32 = ablation_stats(y.float(), g.float(), b.float() if with_bias else None, channel_dim=channel_dim, backend=backend)
        assert got32.dtype == torch.float32
        assert rel_err(got32.double(), want) < TOL[torch.float32], backend


def test_ablation_stats_rejects_bad_inputs_clearly():
    y = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match=r"grad_out must have the shape of y \[4, 3, 5\], got \[4, 3\]"):
        ablation_stats(y, torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \[3\] \(one entry per channel\), got \[5\]"):
        ablation_stats(y, torch.randn_like(y), torch.randn(5))
    with pytest.raises(ValueError, match="channel_dim must be 1 or -1, got 0"):
        ablation_stats(y, torch.randn_like(y), channel_dim=0)
    with pytest.raises(TypeError, match="grad_out must be float16/bfloat16/float32/float64"):
        ablation_stats(y, torch.ones(4, 3, 5, dtype=torch.int64))
    with pytest.raises(FloatingPointError, match="grad_out contains NaN or Inf"):
        ablation_stats(y, torch.full_like(y, float("nan")))


@given(
    b=st.integers(0, 5), c=st.integers(1, 9), p=st.integers(0, 7), channels_last=st.booleans(),
    with_bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_ablation_cpp_equals_torch(b, c, p, channels_last, with_bias, seed):
    if spurfast._extension.load_extension() is None:
        pytest.skip("compiled extension not built")
    gen = torch.Generator().manual_seed(seed)
    shape = (b, p, c) if channels_last else (b, c, p)
    y = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    bias = torch.randn(c, generator=gen, dtype=torch.float64) if with_bias else None
    dim = -1 if channels_last else 1
    got = ablation_stats(y, g, bias, channel_dim=dim, backend="cpp")
    want = ablation_stats(y, g, bias, channel_dim=dim, backend="torch")
    assert got.shape == want.shape == (b, c)
    assert got.numel() == 0 or rel_err(got, want) < TOL[torch.float64]


@pytest.mark.parametrize("method", ["direct", "gram"])
@pytest.mark.parametrize("kernel,padding,dilation,hw", [
    ((3, 3), (1, 1), (1, 1), (7, 6)),
    ((3, 2), (2, 0), (2, 1), (6, 9)),
    ((1, 1), (0, 0), (1, 1), (1, 1)),
    ((3, 3), (1, 1), (1, 1), (1, 1)),  # 1x1 maps, padded: only the centre tap sees data
])
def test_implicit_conv_path_matches_reference(kernel, padding, dilation, hw, method, has_ext):
    """Stride-1 convs with >= 16 input channels take the im2col-free paths (direct: a padded
    copy and one batched GEMM per tap; gram: the input's own Gram gathered over the taps);
    float64 against the per-sample definition."""
    torch.manual_seed(0)
    x = torch.randn(5, 16, *hw, dtype=torch.float64)
    weight_shape = (6, 16) + kernel
    grad_out = torch.randn_like(F.conv2d(x, torch.zeros(weight_shape, dtype=torch.float64), None, 1, padding, dilation))
    group_ids = torch.tensor([0, 2, 0, 2, 2])  # group 1 empty
    got = conv_grad_stats(x, grad_out, weight_shape, 1, padding, dilation, 1, group_ids, 3,
                                 backend="cpp", method=method)
    want = conv_grad_stats_reference(x, grad_out, weight_shape, 1, padding, dilation, 1, group_ids, 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert float(got[1][1].abs().max()) == 0.0


@pytest.mark.parametrize("method", ["direct", "gram"])
@pytest.mark.parametrize("kernel,stride,padding,dilation,hw", [
    ((3, 3), (2, 2), (1, 1), (1, 1), (8, 8)),  # ResNet's downsampling conv
    ((1, 1), (2, 2), (0, 0), (1, 1), (7, 7)),  # its 1x1 shortcut, odd size
    ((3, 2), (3, 2), (2, 0), (1, 1), (10, 7)),  # strides differ per dim, kernel wider than stride in one
    ((5, 5), (2, 3), (2, 1), (1, 1), (9, 11)),
    ((3, 3), (2, 2), (1, 1), (2, 1), (9, 9)),  # dilated and strided: the im2col path
])
def test_strided_implicit_conv_path_matches_reference(kernel, stride, padding, dilation, hw, method, has_ext):
    """Strided convs with >= 16 input channels and dilation 1 take the im2col-free path on
    phase images (one per stride offset); float64 against the per-sample definition."""
    torch.manual_seed(1)
    x = torch.randn(7, 16, *hw, dtype=torch.float64)
    weight_shape = (5, 16) + kernel
    zero_w = torch.zeros(weight_shape, dtype=torch.float64)
    grad_out = torch.randn_like(F.conv2d(x, zero_w, None, stride, padding, dilation))
    group_ids = torch.tensor([1, 0, 1, 1, 0, 2, 0])
    got = conv_grad_stats(x, grad_out, weight_shape, stride, padding, dilation, 1, group_ids, 3,
                          backend="cpp", method=method)
    want = conv_grad_stats_reference(x, grad_out, weight_shape, stride, padding, dilation, 1, group_ids, 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@given(
    size=st.integers(1, 6), kernel=st.integers(1, 5), stride=st.integers(1, 3), padding=st.integers(0, 4),
    dilation=st.integers(1, 3),
)
def test_live_window_keeps_exactly_the_taps_that_read_input(size, kernel, stride, padding, dilation):
    """Against brute force: a trimmed dim keeps every tap that reads the input at some output
    position, and the trimmed 1-D conv equals the full one."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        return
    live = [i for i in range(kernel)
            if any(0 <= o * stride + i * dilation - padding < size for o in range(out))]
    window = live_window((size,), (out,), (kernel,), (stride,), (padding,), (dilation,))
    if window is None:
        return
    (lo, hi), = window
    assert live and (lo, hi) == (live[0], live[-1] + 1) != (0, kernel)
    x, w = torch.randn(2, 3, size, dtype=torch.float64), torch.randn(4, 3, kernel, dtype=torch.float64)
    full = F.conv1d(x, w, None, stride, padding, dilation)
    trimmed = F.conv1d(x, w[:, :, lo:hi], None, stride, padding - lo * dilation, dilation)
    torch.testing.assert_close(trimmed, full, rtol=1e-12, atol=1e-12)


DEAD_TAP_CASES = [  # (B, Cin, Cout, spatial, kernel, stride, padding, dilation, groups): some taps read only padding
    (5, 16, 6, (1, 1), (3, 3), (1, 1), (1, 1), (1, 1), 1),  # a 3x3 conv on a 1x1 map: a Linear of one token
    (5, 16, 6, (2, 2), (3, 3), (2, 2), (1, 1), (1, 1), 1),  # ResNet's stride-2 conv on a 2x2 map: 2x2 taps live
    (4, 4, 6, (1, 5), (3, 3), (1, 1), (1, 1), (1, 1), 2),  # rows trimmed only, grouped
    (4, 3, 5, (2, 3), (3, 3), (1, 1), (2, 2), (2, 1), 1),  # dilated rows: the window keeps the centre
    (4, 3, 5, (2,), (5,), (1,), (2,), (1,), 1),  # Conv1d: the outer taps never reach the 2 positions
]


@pytest.mark.parametrize("case", DEAD_TAP_CASES)
@pytest.mark.parametrize("method", ["direct", "gram"])
def test_dead_tap_convs_match_torch_func(case, method, has_ext):
    """Convs whose padded kernel reaches past the input at every position run on the live
    window; float64 against torch.func, taps outside the window exactly zero."""
    b, cin, cout, spatial, kernel, stride, padding, dilation, groups = case
    assert live_window(spatial, _conv_out(spatial, kernel, stride, padding, dilation), kernel, stride, padding,
                       dilation) is not None
    torch.manual_seed(3)
    weight_shape = (cout, cin // groups) + kernel
    x = torch.randn((b, cin) + spatial, dtype=torch.float64)
    conv = F.conv1d if len(spatial) == 1 else F.conv2d
    g = torch.randn_like(conv(x, torch.zeros(weight_shape, dtype=torch.float64), None, stride, padding, dilation, groups))
    group_ids = torch.tensor([0, 2, 0, 2, 2][:b])  # group 1 empty
    want_sq, want_gg = _expected(_func_conv(x, g, weight_shape, stride, padding, dilation, groups), group_ids, 3)
    grad_sq, group_grad = conv_grad_stats(x, g, weight_shape, stride, padding, dilation, groups, group_ids, 3,
                                          backend="cpp", method=method)
    assert group_grad.shape == (3,) + weight_shape
    torch.testing.assert_close(grad_sq, want_sq, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(group_grad, want_gg, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", DEAD_TAP_CASES[:2])
def test_dead_tap_convs_on_triton_match_torch_func(case, triton_interpreter):
    if not (interpreting() and triton_importable()):
        pytest.skip("runs the Triton kernels on CPU through the interpreter; test_triton.py covers CUDA")
    b, cin, cout, spatial, kernel, stride, padding, dilation, groups = case
    torch.manual_seed(4)
    weight_shape = (cout, cin // groups) + kernel
    xf = torch.randn((b, cin) + spatial)
    gf = torch.randn_like(F.conv2d(xf, torch.zeros(weight_shape), None, stride, padding, dilation, groups))
    group_ids = torch.tensor([0, 2, 0, 2, 2][:b])
    want_sq, want_gg = _expected(
        _func_conv(xf.double(), gf.double(), weight_shape, stride, padding, dilation, groups), group_ids, 3)
    for method in ("direct", "gram"):
        grad_sq, group_grad = conv_grad_stats(xf, gf, weight_shape, stride, padding, dilation, groups, group_ids, 3,
                                              backend="triton", method=method)
        assert rel_err(grad_sq, want_sq) < TOL[torch.float32]
        assert rel_err(group_grad, want_gg) < TOL[torch.float32]


def _conv_out(spatial, kernel, stride, padding, dilation):
    return tuple((s + 2 * p - d * (k - 1) - 1) // st_ + 1
                 for s, k, st_, p, d in zip(spatial, kernel, stride, padding, dilation))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tokens", [1, 9])
def test_linear_grad_stats_with_ablation_matches_per_sample_definition(dtype, tokens, has_ext):
    """grad_sq and group_grad equal linear_grad_stats' direct path bit for bit; the removal
    effect is -<dW_n[c], W[c]> = -sum_t (W x_t)_c g_tc, from products, outputs and torch.func."""
    from spurfast.ops import linear_grad_stats_with_ablation, linear_grad_stats_with_ablation_reference
    torch.manual_seed(12)
    x, g = torch.randn(7, tokens, 5, dtype=dtype), torch.randn(7, tokens, 3, dtype=dtype)
    w = torch.randn(3, 5, dtype=dtype)
    ids = torch.tensor([0, 2, 2, 1, 0, 2, 0])
    want = linear_grad_stats_with_ablation_reference(x.double(), g.double(), w.double(), ids, 3)
    from_outputs = -((x.double() @ w.double().T) * g.double()).sum(1)
    assert rel_err(want[2], from_outputs) < TOL[torch.float64]
    backends = ["torch"] + (["cpp"] if has_ext else [])
    for backend in backends:
        got = linear_grad_stats_with_ablation(x, g, w, ids, 3, backend=backend)
        for a, b in zip(got, want):
            assert a.dtype == dtype and rel_err(a, b) < TOL[dtype], backend
    if has_ext:
        got = linear_grad_stats_with_ablation(x, g, w, ids, 3, backend="cpp")
        direct = linear_grad_stats(x, g, ids, 3, backend="cpp", method="direct")
        if tokens > 1:  # the same products, reduced in the same order
            assert torch.equal(got[0], direct[0]) and torch.equal(got[1], direct[1])


def test_linear_grad_stats_with_ablation_rejects_bad_inputs_clearly():
    from spurfast.ops import linear_grad_stats_with_ablation
    x, g, ids = torch.randn(4, 2, 5), torch.randn(4, 2, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight must be a tensor of shape \[3, 5\]"):
        linear_grad_stats_with_ablation(x, g, torch.randn(5, 3), ids, 1, backend="torch")
    with pytest.raises(ValueError, match="weight must be a tensor"):
        linear_grad_stats_with_ablation(x, g, None, ids, 1, backend="torch")
    with pytest.raises(ValueError, match="'cpp' \\(CPU\\) or 'torch' backend"):
        linear_grad_stats_with_ablation(x, g, torch.randn(3, 5), ids, 1, backend="triton")
