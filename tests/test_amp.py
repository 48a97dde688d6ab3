"""Mixed precision: NeuronStats under torch.autocast and with a scaled loss (GradScaler)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spurfast as sf

# bfloat16 keeps 8 bits of mantissa: each product is off by up to 2^-8 relative, and a
# per-sample statistic sums many of them, so the bf16 run is compared with the float32 run
# by the relative error of each whole table.
BF16_TOL = 3e-2


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 5),
    ).to(dtype)


def _batch(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, 8, 8, generator=gen).to(dtype)
    return x, torch.randint(0, 5, (12,), generator=gen), torch.arange(12) % 3


def _tables(stats):
    out = {}
    for table in ("last_grad_sq", "group_grad", "last_act", "last_ablation", "grad_sq_sum", "ablation_sum"):
        for name, t in getattr(stats, table).items():
            out[f"{table}[{name}]"] = t.double()
    return out


def _record(model, x, y, ids, *, autocast=False, loss_factor=1.0, **record_kwargs):
    stats = sf.NeuronStats(model, num_groups=3)
    with stats.record(ids, **record_kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        (loss * loss_factor).backward()
    tables = _tables(stats)
    stats.remove()
    return tables


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_autocast_bf16_matches_float32_within_tolerance(has_ext):
    model = _model()
    x, y, ids = _batch()
    want = _record(model, x, y, ids)
    model.zero_grad(set_to_none=True)
    got = _record(model, x, y, ids, autocast=True)
    assert set(got) == set(want)
    for key, table in got.items():
        assert table.shape == want[key].shape, key
        assert bool(torch.isfinite(table).all()), key
        assert _rel(table, want[key]) < BF16_TOL, (key, _rel(table, want[key]))
    stats = sf.NeuronStats(model, num_groups=3)
    with stats.record(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    # accumulated in float32 whatever the compute dtype; the weights' grads keep their dtype
    assert all(t.dtype == torch.float32 for t in stats.last_grad_sq.values())
    assert all(t.dtype == torch.float32 for t in stats.group_grad.values())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_a_scaled_loss_gives_the_unscaled_statistics():
    model = _model(torch.float64)
    x, y, ids = _batch(torch.float64)
    want = _record(model, x, y, ids)
    got = _record(model, x, y, ids, loss_factor=1024.0, loss_scale=1024.0)
    unscaled = _record(model, x, y, ids, loss_factor=1024.0)
    for key, table in got.items():
        torch.testing.assert_close(table, want[key], rtol=1e-12, atol=1e-300)
    assert _rel(unscaled["last_grad_sq[0]"], want["last_grad_sq[0]"]) > 1.0  # the scale is not lost silently


def _cpu_grad_scaler(init_scale):
    try:
        return torch.amp.GradScaler("cpu", init_scale=init_scale)
    except (AttributeError, TypeError, RuntimeError) as exc:  # torch.amp.GradScaler("cpu") came in torch 2.3
        pytest.skip(f"no CPU GradScaler in this torch: {exc!r}")


def test_grad_scaler_statistics_are_unscaled_and_an_overflow_is_dropped():
    model = _model()
    x, y, ids = _batch()
    want = _record(model, x, y, ids)
    scaler = _cpu_grad_scaler(2.0 ** 12)
    stats = sf.NeuronStats(model, num_groups=3)
    with stats.record(ids, loss_scale=scaler):
        scaler.scale(F.cross_entropy(model(x), y)).backward()
    for key, table in _tables(stats).items():
        torch.testing.assert_close(table, want[key], rtol=1e-5, atol=1e-7)
    before = {k: t.clone() for k, t in _tables(stats).items()}
    with pytest.warns(RuntimeWarning, match="overflowed"):
        with stats.record(ids, loss_scale=scaler):
            scaler.scale(F.cross_entropy(model(x), y) * float("inf")).backward()
    for key, table in _tables(stats).items():
        assert torch.equal(table, before[key]), key
    with pytest.raises(FloatingPointError):  # a plain number does not imply overflow steps are expected
        with stats.record(ids, loss_scale=2.0):
            (F.cross_entropy(model(x), y) * float("inf")).backward()


def test_a_scaler_and_a_factor_for_gradient_accumulation():
    model = _model()
    x, y, ids = _batch()
    want = _record(model, x, y, ids)
    scaler = _cpu_grad_scaler(2.0 ** 8)
    stats = sf.NeuronStats(model, num_groups=3)
    with stats.record(ids, loss_scale=(scaler, 0.25)):  # a trainer's loss / 4 accumulation steps, then scaled
        scaler.scale(F.cross_entropy(model(x), y) / 4).backward()
    for key, table in _tables(stats).items():
        torch.testing.assert_close(table, want[key], rtol=1e-5, atol=1e-7)
    with pytest.warns(RuntimeWarning, match="overflowed"):  # still the scaler's overflow handling
        with stats.record(ids, loss_scale=(scaler, 0.25)):
            scaler.scale(F.cross_entropy(model(x), y) * float("inf")).backward()
    with pytest.raises(ValueError, match="loss_scale must be"):
        with stats.record(ids, loss_scale=(scaler, 0.0)):
            pass


@pytest.mark.parametrize("bad", [0.0, -2.0, float("inf"), float("nan"), "2", True, torch.ones(2), (2.0, 0.5)])
def test_bad_loss_scale_is_rejected_before_anything_changes(bad):
    model = _model()
    x, y, ids = _batch()
    stats = sf.NeuronStats(model, num_groups=3)
    with pytest.raises(ValueError, match="loss_scale must be"):
        with stats.record(ids, loss_scale=bad):
            pass
    assert all("forward" not in vars(m) for m in model.modules())
    assert int(stats.group_count.sum()) == 0
    with stats.record(ids):  # still usable
        F.cross_entropy(model(x), y).backward()
    assert int(stats.group_count.sum()) == 12
