"""Deferred per-group weight-gradient sums (spurfast.ops.group_grad) and their use in NeuronStats."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spurfast as sf
from spurfast.ops.group_grad import DeferredGroupGrad, accumulate_group_grad, accumulate_group_grad_reference

CONV_CASES = [  # (x shape, weight shape, stride, padding, dilation, groups)
    ((5, 3, 7, 6), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((4, 4, 9, 8), (6, 2, 3, 2), (2, 1), (1, 0), (1, 2), 2),
    ((5, 3, 1, 2), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),  # rows past the 1-row map: only the live taps get sums
    ((5, 4, 4, 4), (256, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1),  # wide, 4x4 map: im2col + addmm_ into the sums
    ((5, 3, 1, 3), (256, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),  # wide, live taps only: im2col into a strided slice
]


def _linear_rows(n, d=7, c=5, dtype=torch.float64):
    return torch.randn(n, d, dtype=dtype), torch.randn(n, c, dtype=dtype)


def _conv_rows(n, case, dtype=torch.float64):
    x_shape, w_shape, stride, padding, dilation, groups = case
    x = torch.randn((n,) + x_shape[1:], dtype=dtype)
    out = F.conv2d(x, torch.randn(w_shape, dtype=dtype), None, stride, padding, dilation, groups)
    return x, torch.randn_like(out)


@pytest.mark.parametrize("kind", ["linear", "conv0", "conv1", "conv2", "conv3", "conv4"])
def test_accumulate_matches_per_sample_reference(kind):
    torch.manual_seed(0)
    if kind == "linear":
        x, g = _linear_rows(11)
        shape, conv_args = (3, 5, 7), None
    else:
        case = CONV_CASES[int(kind[-1])]
        x, g = _conv_rows(6, case)
        shape, conv_args = (3,) + case[1], case[2:]
    ids = torch.tensor([0, 2, 2, 0, 2, 0, 0, 2, 0, 2, 0][: x.shape[0]])  # group 1 empty
    start = torch.randn(shape, dtype=torch.float64)
    got, want = start.clone(), start.clone()
    accumulate_group_grad(got, x, g, ids, conv_args)
    accumulate_group_grad_reference(want, x, g, ids, conv_args)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], start[1])


def test_wide_small_map_flush_takes_im2col_in_chunks(monkeypatch):
    """The im2col flush of a wide layer on a small map, with chunks of 2 samples, equals the
    per-sample reference; the rule that picks it is the one the docstring states."""
    import spurfast.ops.group_grad as group_grad_module

    torch.manual_seed(4)
    case = CONV_CASES[3]
    x, g = _conv_rows(7, case)
    conv_args = case[2:]
    assert group_grad_module._im2col_pays(torch.empty(case[1], dtype=torch.float64), g, conv_args)
    assert not group_grad_module._im2col_pays(torch.empty(128, 4, 3, 3, dtype=torch.float64), g, conv_args)
    g8 = torch.randn(2, 256, 8, 8, dtype=torch.float64)  # an 8x8 map: oneDNN
    assert not group_grad_module._im2col_pays(torch.empty(case[1], dtype=torch.float64), g8, conv_args)
    chunks = []  # samples per im2col call
    unfold = F.unfold
    monkeypatch.setattr(F, "unfold", lambda x, *a, **k: (chunks.append(x.shape[0]), unfold(x, *a, **k))[1])
    monkeypatch.setattr(group_grad_module, "_PATCH_CHUNK_ELEMENTS", 2 * 16 * 36)  # 2 samples of 16 x 36
    ids = torch.tensor([0, 1, 1, 0, 1, 1, 1])
    got = torch.randn((2,) + case[1], dtype=torch.float64)
    want = got.clone()
    accumulate_group_grad(got, x, g, ids, conv_args)
    accumulate_group_grad_reference(want, x, g, ids, conv_args)
    assert chunks == [2, 2, 2, 1]  # group 0's 2 rows, then group 1's 5
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("workspace_bytes", [0, 1, 4000, 10**7])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_deferred_sums_equal_committed_batches_only(kind, workspace_bytes):
    """Random batches, some rolled back; the workspace fills and flushes mid-stream (or not at all)."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    if kind == "linear":
        shape, conv_args, make = (3, 5, 7), None, _linear_rows
    else:
        case = CONV_CASES[0]
        shape, conv_args, make = (3,) + case[1], case[2:], lambda n: _conv_rows(n, case)
    out = torch.zeros(shape, dtype=torch.float64)
    want = torch.zeros(shape, dtype=torch.float64)
    deferred = DeferredGroupGrad(out, conv_args, workspace_bytes)
    for step in range(12):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        x, g = make(n)
        ids = torch.randint(0, 3, (n,), generator=gen)
        scale = float(n)
        deferred.stage(x, g, ids, scale)
        x.add_(1.0), g.mul_(-3.0)  # the caller reuses its buffers: the workspace holds copies
        if step % 4 == 3:
            deferred.rollback()
            continue
        deferred.commit()
        x.sub_(1.0), g.div_(-3.0)
        accumulate_group_grad_reference(want, x, g * scale, ids, conv_args)
    torch.testing.assert_close(deferred.flushed(), want, rtol=1e-12, atol=1e-12)
    assert deferred.pending_rows == 0


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))


def _small_map_cnn():
    # 2x2 and 1x1 maps: the Gram path, whose group sums are deferred
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8, 4))


def _run(model, batches, workspace, backend, fail_at=()):
    stats = sf.NeuronStats(model, num_groups=3, backend=backend, group_grad_workspace=workspace)
    for i, (x, y, ids) in enumerate(batches):
        if i in fail_at:
            with pytest.raises(RuntimeError, match="boom"):
                with stats.record(ids):
                    F.cross_entropy(model(x), y).backward()
                    raise RuntimeError("boom")
        else:
            with stats.record(ids):
                F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
    return stats


@pytest.mark.parametrize("build,shape", [(_mlp, (3, 2, 2)), (_small_map_cnn, (3, 2, 2))])
@pytest.mark.parametrize("workspace", [0.0, 1e-9, 0.25, 100.0])
def test_neuron_stats_group_grad_exact_with_deferral(build, shape, workspace, has_ext):
    torch.manual_seed(0)
    model = build().double()
    batches = [(torch.randn((n,) + shape, dtype=torch.float64), torch.randint(0, 4, (n,)), torch.randint(0, 3, (n,)))
               for n in (5, 7, 3, 6)]
    want = _run(model, batches, 0.0, "torch", fail_at=(2,))
    got = _run(model, batches, workspace, "cpp", fail_at=(2,))
    if workspace == 100.0:  # everything still pending before the first read
        assert sum(d.pending_rows for d in got._deferred.values()) > 0
    state = got.state_dict()  # reads through the flush
    assert sum(d.pending_rows for d in got._deferred.values()) == 0
    for name in want.layer_names:
        torch.testing.assert_close(state[f"group_grad.{name}"], want.group_grad[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.grad_sq_sum[name], want.grad_sq_sum[name], rtol=1e-9, atol=1e-12)


def _mlp_after_one_batch():
    """An MLP, a NeuronStats whose workspace never fills, and the batch it recorded once."""
    torch.manual_seed(0)
    model = _mlp()
    stats = sf.NeuronStats(model, num_groups=3, backend="cpp", group_grad_workspace=100.0)
    x, y, ids = torch.randn(6, 3, 2, 2), torch.randint(0, 4, (6,)), torch.arange(6) % 3
    with stats.record(ids):
        F.cross_entropy(model(x), y).backward()
    return model, stats, x, y, ids


def test_deferred_rows_of_a_non_finite_batch_are_dropped(has_ext):
    model, stats, x, y, ids = _mlp_after_one_batch()
    before = {n: t.clone() for n, t in stats.group_grad.items()}
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        with stats.record(ids):
            F.cross_entropy(model(bad), y).backward()
    for name, t in stats.group_grad.items():
        assert torch.equal(t, before[name])


def test_load_state_dict_discards_pending_rows(has_ext):
    model, stats, x, y, ids = _mlp_after_one_batch()
    empty = sf.NeuronStats(model, num_groups=3, backend="cpp").state_dict()
    with stats.record(ids):
        F.cross_entropy(model(x), y).backward()
    stats.load_state_dict(empty)
    assert all(float(t.abs().max()) == 0.0 for t in stats.group_grad.values())


def test_group_grad_workspace_is_validated():
    with pytest.raises(ValueError, match="group_grad_workspace"):
        sf.NeuronStats(_mlp(), num_groups=2, group_grad_workspace=-1)
    with pytest.raises(ValueError, match="group_grad_workspace"):
        sf.NeuronStats(_mlp(), num_groups=2, group_grad_workspace="big")


def test_nbytes_counts_the_tables_and_the_workspace(has_ext):
    torch.manual_seed(0)
    model = _mlp()
    stats = sf.NeuronStats(model, num_groups=3, backend="cpp", group_grad_workspace=0.5)
    group_grad_bytes = sum(t.numel() * 4 for t in stats.group_grad.values())
    before = stats.nbytes
    assert before > group_grad_bytes
    x, y, ids = torch.randn(6, 3, 2, 2), torch.randint(0, 4, (6,)), torch.arange(6) % 3
    with stats.record(ids):
        F.cross_entropy(model(x), y).backward()
    workspace = sum(d.workspace_nbytes for d in stats._deferred.values())
    assert workspace > 0 and stats.nbytes >= before + workspace


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(0, 5), (7, 1), (37, 1100), (5, 0)])
def test_group_row_sums_match_reference(shape, dtype, has_ext):
    torch.manual_seed(0)
    values = torch.randn(shape, dtype=dtype)
    ids = torch.randint(0, 3, (shape[0],))
    ids[:1] = 3  # group 3 holds row 0 only; group 4 stays empty
    got = sf.ops.group_row_sums(values, ids, 5, backend="cpp")
    want = sf.ops.group_row_sums_reference(values, ids, 5)
    assert got.dtype == torch.float64 and got.shape == (5, shape[1])
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-12)
    assert float(got[4].abs().sum()) == 0.0


def test_group_row_sums_reject_bad_input_before_writing(has_ext):
    values, ids = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="group_ids must lie in"):
        sf.ops.group_row_sums(values, ids, 3)
    with pytest.raises(RuntimeError, match="group_ids must lie in"):  # the kernel checks too
        sf.ops.group_row_sums(values, ids, 3, backend="cpp", check_inputs=False)
    with pytest.raises(ValueError, match="values must be 2-D"):
        sf.ops.group_row_sums(values[0], ids[:1], 3)
