"""Triton kernels: run by the interpreter on CPU in CI (TRITON_INTERPRET=1, set in conftest
before Triton is imported), on CUDA at real sizes under the ``gpu`` marker."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum

import spurfast as sf
from spurfast.ops import (
    ablation_stats,
    activation_stats,
    activation_stats_reference,
    conv2d_grad_stats_reference,
    conv_grad_stats,
    linear_grad_stats,
    linear_grad_stats_reference,
)
from spurfast.ops._common import choose_method, interpreting

from _helpers import rel_err

triton = pytest.importorskip("triton")

if torch.cuda.is_available() and not interpreting():
    DEVICE = "cuda"
else:
    DEVICE = "cpu"
    if not interpreting():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before Triton is imported", allow_module_level=True)

LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


def _torch_error_linear(x, g, ids, num_groups, want):
    """Error of plain torch computing the same statistics in the input dtype."""
    per_sample = einsum(g, x, "b t c, b t d -> b c d")  # in x.dtype, as torch would
    grad_sq = per_sample.float().square().sum(-1)
    group_grad = torch.stack([per_sample[ids == k].float().sum(0) for k in range(num_groups)])
    return rel_err(grad_sq, want[0]), rel_err(group_grad, want[1])


LINEAR_SHAPES = [(5, 3, 20, 17), (4, 1, 9, 33), (3, 40, 8, 5), (6, 17, 70, 24), (2, 16, 16, 80)]


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("method", ["direct", "gram"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.usefixtures("triton_interpreter")
def test_linear_kernels_within_twice_torch_error(shape, method, dtype):
    b, t, d, c = shape
    torch.manual_seed(hash(shape) % 1000)
    x = torch.randn(b, t, d).to(dtype)
    g = torch.randn(b, t, c).to(dtype)
    ids = torch.tensor([2, 0, 2, 1, 0, 2])[:b]  # group 1 is empty when b < 4
    want = linear_grad_stats_reference(x.double(), g.double(), ids, 3)
    torch_err = _torch_error_linear(x, g, ids, 3, want)
    grad_sq, group_grad = linear_grad_stats(
        x.to(DEVICE), g.to(DEVICE), ids.to(DEVICE), 3, backend="triton", method=method
    )
    assert grad_sq.dtype == torch.float32 and group_grad.shape == (3, c, d)
    # At most 2x plain torch's error in the same dtype (floor: float32 rounding of the output).
    assert rel_err(grad_sq.cpu(), want[0]) <= 2 * torch_err[0] + 2e-6
    assert rel_err(group_grad.cpu(), want[1]) <= 2 * torch_err[1] + 2e-6


CONV_CASES = [  # (in_ch, out_ch, spatial, kernel, stride, padding, dilation, groups)
    (3, 4, (7, 6), (3, 3), (1, 2), (1, 0), (1, 1), 1),
    (4, 6, (8, 8), (3, 2), (2, 1), (1, 1), (2, 1), 2),
    (4, 4, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 4),  # depthwise
    (2, 70, (5, 5), (1, 1), (1, 1), (0, 0), (1, 1), 1),  # 1x1, two channel tiles
    (3, 5, (1, 20), (1, 5), (1, 2), (0, 2), (1, 1), 1),  # a Conv1d seen as 2-D
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("method", ["direct", "gram"])
@pytest.mark.usefixtures("triton_interpreter")
def test_conv_kernels_match_reference(case, method):
    cin, cout, spatial, kernel, stride, padding, dilation, groups = case
    torch.manual_seed(cout)
    x = torch.randn(4, cin, *spatial)
    weight_shape = (cout, cin // groups) + kernel
    out = F.conv2d(x, torch.zeros(weight_shape), None, stride, padding, dilation, groups)
    g = torch.randn_like(out)
    ids = torch.tensor([1, 0, 1, 1])
    want = conv2d_grad_stats_reference(x.double(), g.double(), kernel, stride, padding, dilation, groups, ids, 2)
    grad_sq, group_grad = conv_grad_stats(
        x.to(DEVICE), g.to(DEVICE), weight_shape, stride, padding, dilation, groups, ids.to(DEVICE), 2,
        backend="triton", method=method,
    )
    assert rel_err(grad_sq.cpu(), want[0]) < 2e-5
    assert rel_err(group_grad.cpu(), want[1]) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.usefixtures("triton_interpreter")
def test_conv_kernels_low_precision(dtype):
    torch.manual_seed(3)
    x = torch.randn(3, 4, 6, 6).to(dtype)
    g = torch.randn(3, 8, 6, 6).to(dtype)
    ids = torch.tensor([0, 1, 0])
    want = conv2d_grad_stats_reference(x.double(), g.double(), (3, 3), (1, 1), (1, 1), (1, 1), 1, ids, 2)
    for method in ("direct", "gram"):
        got = conv_grad_stats(x.to(DEVICE), g.to(DEVICE), (8, 4, 3, 3), 1, 1, 1, 1, ids.to(DEVICE), 2,
                              backend="triton", method=method)
        for a, w in zip(got, want):  # inputs exact in float32; float32 accumulation
            assert rel_err(a.cpu(), w) < 2e-5


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("triton_interpreter")
def test_activation_kernel_matches_reference(channels_last, dtype):
    torch.manual_seed(4)
    y = torch.randn(9, 70, 5).to(dtype)
    ids = torch.tensor([0, 2, 2, 0, 0, 2, 2, 2, 0])
    want = activation_stats_reference(y.double(), ids, 4, channels_last)
    got = activation_stats(y.to(DEVICE), ids.to(DEVICE), 4, channel_dim=-1 if channels_last else 1, backend="triton")
    assert got[1].cpu().tolist() == [4, 0, 5, 0]
    for a, w in zip(got, want):
        assert rel_err(a.cpu(), w) < 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.usefixtures("triton_interpreter")
def test_ablation_kernel_matches_reference(channels_last, with_bias, dtype):
    torch.manual_seed(6)
    y = torch.randn(5, 70, 90).to(dtype)
    g = torch.randn(5, 70, 90).to(dtype)
    bias = torch.randn(90 if channels_last else 70) if with_bias else None
    dim = -1 if channels_last else 1
    want = ablation_stats(y.double(), g.double(), None if bias is None else bias.double(), channel_dim=dim, backend="torch")
    got = ablation_stats(y.to(DEVICE), g.to(DEVICE), None if bias is None else bias.to(DEVICE), channel_dim=dim, backend="triton")
    assert got.dtype == torch.float32
    # inputs are exact in `dtype`; only float32 accumulation separates kernel and reference
    assert rel_err(got.cpu().double(), want) < 1e-5


@pytest.mark.usefixtures("triton_interpreter")
def test_neuron_stats_on_triton_backend_matches_torch_backend():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 16, 5),
    ).to(DEVICE)
    x = torch.randn(6, 3, 8, 8, device=DEVICE)
    y = torch.randint(0, 5, (6,), device=DEVICE)
    ids = torch.tensor([0, 1, 2, 0, 1, 0], device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        m = copy.deepcopy(model)
        stats = sf.NeuronStats(m, num_groups=3, backend=backend)
        with stats.record(ids):
            F.cross_entropy(m(x), y).backward()
        results[backend] = (stats, [p.grad for p in m.parameters()])
    ref, fast = results["torch"][0], results["triton"][0]
    for name in ref.layer_names:
        assert rel_err(fast.last_grad_sq[name].cpu(), ref.last_grad_sq[name].cpu()) < 2e-5
        assert rel_err(fast.group_grad[name].cpu(), ref.group_grad[name].cpu()) < 2e-5
        assert rel_err(fast.act_mean[name].cpu(), ref.act_mean[name].cpu()) < 2e-5
        assert rel_err(fast.last_ablation[name].cpu(), ref.last_ablation[name].cpu()) < 2e-5
    for a, b in zip(results["triton"][1], results["torch"][1]):
        assert rel_err(a.cpu(), b.cpu()) < 2e-5


def test_kernel_constexpr_annotations_are_objects_not_strings():
    # `from __future__ import annotations` makes them strings, which Triton 3.0's interpreter
    # does not take for constexpr: every argument then reaches the kernel as a tensor.
    from spurfast.ops._triton import ablation_stats as ablation_kernels
    from spurfast.ops._triton import activation_stats as act_kernels
    from spurfast.ops._triton import grad_stats as grad_kernels

    kernels = [v for m in (act_kernels, grad_kernels, ablation_kernels) for v in vars(m).values()
               if isinstance(v, (triton.runtime.JITFunction, triton.runtime.Autotuner))
               or type(v).__name__ == "InterpretedFunction"]
    assert len(kernels) >= 7
    for kernel in kernels:
        fn = kernel
        while hasattr(fn, "fn"):  # autotuner -> jit function -> python function
            fn = fn.fn
        assert not [a for a in fn.__annotations__.values() if isinstance(a, str)], fn.__name__


def test_triton_cost_model_prefers_gram_below_the_mma_width():
    assert choose_method(1, 512, 512, "triton") == "gram"
    assert choose_method(8, 256, 256, "triton") == "gram"
    assert choose_method(197, 768, 768, "triton") == "direct"  # ViT-B blocks
    assert choose_method(1024, 64, 576, "triton") == "direct"


def test_triton_backend_rejects_float64_clearly():
    with pytest.raises(ValueError, match="use backend='torch' for float64"):
        linear_grad_stats(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64),
                          torch.zeros(2, dtype=torch.long), 1, backend="triton")


@pytest.mark.gpu
def test_real_size_kernels_on_cuda():
    torch.manual_seed(6)
    ids = torch.randint(0, 4, (64,), device="cuda")
    x = torch.randn(64, 197, 384, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(64, 197, 1536, device="cuda", dtype=torch.bfloat16)
    want = linear_grad_stats_reference(x.double(), g.double(), ids, 4)
    for method in ("direct", "gram"):
        got = linear_grad_stats(x, g, ids, 4, backend="triton", method=method)
        for a, w in zip(got, want):
            assert rel_err(a, w) < 1e-2
    xc = torch.randn(64, 64, 32, 32, device="cuda")
    gc = torch.randn(64, 128, 16, 16, device="cuda")
    want = conv2d_grad_stats_reference(xc.double(), gc.double(), (3, 3), (2, 2), (1, 1), (1, 1), 1, ids, 4)
    got = conv_grad_stats(xc, gc, (128, 64, 3, 3), 2, 1, 1, 1, ids, 4, backend="triton")
    for a, w in zip(got, want):
        assert rel_err(a, w) < 1e-4
    torch.library.opcheck(torch.ops.spurfast.linear_grad_stats.default, (x[:4, :8], g[:4, :8], ids[:4], 4, "direct"))
