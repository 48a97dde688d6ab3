"""spurfast.losses: NT-Xent against a literal loop, its gradients and invariances, and the
dense/masked objective with its stop-gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from spurfast.losses import CONTRAST_ON, dense_masked_loss, nt_xent, nt_xent_reference

pytestmark = pytest.mark.usefixtures("one_thread")

# float32 against the float64 loop: the loss is a log-sum-exp of O(1/T) terms.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("batch,dim", [(1, 3), (2, 5), (7, 4), (16, 32)])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_nt_xent_matches_the_loop(batch, dim, temperature, dtype):
    gen = torch.Generator().manual_seed(batch * 100 + dim)
    a = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    expected = nt_xent_reference(a, b, temperature)
    actual = nt_xent(a, b, temperature)
    assert actual.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert abs(actual.double().item() - expected.item()) <= TOL[dtype] * max(1.0, abs(expected.item()))


def test_nt_xent_counts_2b_minus_2_negatives():
    # Orthogonal unit rows: every non-positive similarity is 0, so the loss is
    # -log(e^{1/T} / (e^{1/T} + (2B - 2))), which pins down how many negatives there are.
    for batch in (1, 2, 3, 5):
        a = torch.eye(8, dtype=torch.float64)[:batch]
        for temperature in (0.5, 1.0):
            expected = math.log1p((2 * batch - 2) * math.exp(-1 / temperature))
            assert nt_xent(a, a.clone(), temperature).item() == pytest.approx(expected, rel=1e-12)


def test_nt_xent_gradcheck():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: nt_xent(x, y, 0.5), (a, b))
    assert torch.autograd.gradgradcheck(lambda x, y: nt_xent(x, y, 0.7), (a, b))


def test_nt_xent_gradients_match_the_loop():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    ga, gb = torch.autograd.grad(nt_xent(a, b), (a, b))
    ra, rb = torch.autograd.grad(nt_xent_reference(a, b), (a, b))
    torch.testing.assert_close(ga, ra, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, rb, rtol=1e-10, atol=1e-12)


def test_nt_xent_invariances():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    base = nt_xent(a, b)
    scale = torch.rand(6, 1, generator=gen, dtype=torch.float64) * 10 + 0.1  # per-row positive scale
    assert nt_xent(a * scale, b * 3.0).item() == pytest.approx(base.item(), rel=1e-12)
    perm = torch.randperm(6, generator=gen)
    assert nt_xent(a[perm], b[perm]).item() == pytest.approx(base.item(), rel=1e-12)
    assert nt_xent(b, a).item() == pytest.approx(base.item(), rel=1e-12)  # symmetric
    rotation = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))[0]
    assert nt_xent(a @ rotation, b @ rotation).item() == pytest.approx(base.item(), rel=1e-10)
    # Permuting only one view breaks the pairs: a different (here larger) loss.
    assert nt_xent(a, b[perm.roll(1)]).item() != pytest.approx(base.item(), rel=1e-6)


def test_nt_xent_aligned_views_beat_random_ones():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(32, 16, generator=gen)
    assert nt_xent(a, a + 0.01 * torch.randn(32, 16, generator=gen)) < nt_xent(a, torch.randn(32, 16, generator=gen))


def test_nt_xent_zero_rows_are_finite():
    a = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64)
    loss = nt_xent(a, b)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()


def test_nt_xent_rejects_bad_inputs():
    a = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(a, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"a must be a non-empty 2-D"):
        nt_xent(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="b must be a non-empty"):
        nt_xent(a, torch.randn(0, 3)[:, :0].reshape(4, 0))
    with pytest.raises(ValueError, match="floating-point"):
        nt_xent(torch.ones(4, 3, dtype=torch.long), a)
    with pytest.raises(TypeError, match="b must be a torch.Tensor"):
        nt_xent(a, [[1.0] * 3] * 4)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="temperature"):
            nt_xent(a, a, temperature=bad)


def _branches(seed=0, batch=6, dim=5, classes=3):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, d, generator=gen, dtype=torch.float64, requires_grad=True)
               for d in (dim, dim, classes, classes)]
    labels = torch.randint(0, classes, (batch,), generator=gen)
    return (*tensors, labels)


@pytest.mark.parametrize("on", CONTRAST_ON)
def test_dense_masked_loss_is_the_written_objective(on):
    f_dense, f_masked, l_dense, l_masked, labels = _branches()
    parts = dense_masked_loss(l_dense, l_masked, labels, dense_features=f_dense, masked_features=f_masked,
                              on=on, ce_weight=0.2, temperature=0.5)
    z_dense, z_masked = {"features": (f_dense, f_masked), "logits": (l_dense, l_masked),
                         "softmax": (l_dense.softmax(1), l_masked.softmax(1))}[on]
    contrastive = nt_xent_reference(z_dense.detach(), z_masked) + nt_xent_reference(z_dense, z_masked.detach())
    ce = F.cross_entropy(l_dense, labels)
    assert parts.contrastive.item() == pytest.approx(contrastive.item(), rel=1e-10)
    assert parts.cross_entropy.item() == pytest.approx(ce.item(), rel=1e-12)
    assert parts.total.item() == pytest.approx(contrastive.item() + 0.2 * ce.item(), rel=1e-10)
    # The two stop-gradient terms together send the gradient of one NT-Xent without stop-gradient.
    inputs = (f_dense, f_masked, l_dense, l_masked)
    got = torch.autograd.grad(parts.total, inputs, allow_unused=True)
    expected = torch.autograd.grad(nt_xent(z_dense, z_masked) + 0.2 * ce, inputs, allow_unused=True)
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
        else:
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_dense_masked_loss_stop_gradients_split_the_flow():
    # Each term alone sends gradient to one branch only: the masked branch through the first
    # term, the dense branch through the second.
    f_dense, f_masked, l_dense, _, labels = _branches(1)
    parts = dense_masked_loss(l_dense, None, labels, dense_features=f_dense, masked_features=f_masked,
                              ce_weight=0.0)
    g_dense, g_masked = torch.autograd.grad(parts.total, (f_dense, f_masked))
    first = nt_xent(f_dense.detach(), f_masked)
    second = nt_xent(f_dense, f_masked.detach())
    torch.testing.assert_close(g_masked, torch.autograd.grad(first, f_masked)[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_dense, torch.autograd.grad(second, f_dense)[0], rtol=1e-12, atol=1e-14)
    # The cross-entropy reaches only the dense logits.
    parts = dense_masked_loss(l_dense, None, labels, dense_features=f_dense.detach(),
                              masked_features=f_masked.detach(), ce_weight=0.3)
    (g_logits,) = torch.autograd.grad(parts.total, (l_dense,))
    torch.testing.assert_close(g_logits, 0.3 * torch.autograd.grad(F.cross_entropy(l_dense, labels), l_dense)[0])


def test_dense_masked_loss_rejects_bad_inputs():
    f_dense, f_masked, l_dense, l_masked, labels = _branches()
    with pytest.raises(ValueError, match="on must be one of"):
        dense_masked_loss(l_dense, l_masked, labels, on="probabilities")
    with pytest.raises(ValueError, match="dense_features and masked_features"):
        dense_masked_loss(l_dense, l_masked, labels, dense_features=f_dense)
    with pytest.raises(ValueError, match="needs masked_logits"):
        dense_masked_loss(l_dense, None, labels, on="softmax")
    with pytest.raises(ValueError, match="masked_logits must have"):
        dense_masked_loss(l_dense, l_masked[:3], labels, on="logits")
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        dense_masked_loss(l_dense, l_masked, labels.double(), on="logits")
    with pytest.raises(ValueError, match="dense_logits must be a float tensor"):
        dense_masked_loss(l_dense[0], l_masked, labels, on="logits")
    with pytest.raises(ValueError, match="ce_weight"):
        dense_masked_loss(l_dense, l_masked, labels, on="logits", ce_weight=-1)
    with pytest.raises(ValueError, match="same shape"):
        dense_masked_loss(l_dense, None, labels, dense_features=f_dense, masked_features=f_masked[:, :2])
