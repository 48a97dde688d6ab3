"""NeuronStats under DistributedDataParallel: two CPU processes (gloo) equal one process on the
concatenated batches."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import spurfast as sf

WORLD, STEPS, BATCH = 2, 3, 8


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 10),
        nn.ReLU(), nn.Linear(10, 3),
    )


def _data():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 6, 6, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen),
             torch.randint(0, 3, (BATCH,), generator=gen)) for _ in range(STEPS)]


def _worker(rank, init_file, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        stats = sf.NeuronStats(model, num_groups=3)
        for step, (x, y, ids) in enumerate(_data()):
            mine = slice(rank, None, WORLD)  # ranks hold interleaved samples
            with stats.record(ids[mine], sample_ids=torch.arange(step * BATCH, (step + 1) * BATCH)[mine]):
                F.cross_entropy(model(x[mine]), y[mine]).backward()
            if step == 0:
                stats.all_reduce()  # a reduction midway: later ones exchange only what is new
            if step == 1:
                means = stats.grad_sq_mean()  # reduces by itself (called on every rank)
                # a checkpoint: rank 0 writes, every rank resumes from the file
                path = stats.save(os.path.join(out_dir, "stats.safetensors"))
                stats.remove()
                stats = sf.NeuronStats.load(path, model)
        torch.save({"names": stats.layer_names, "state": stats.state_dict(),  # state_dict() reduces again
                    "means": means, "last_sample_ids": stats.last_sample_ids,
                    "last_grad_sq": stats.last_grad_sq}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in this torch")
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path, has_ext):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    model = _model()
    stats = sf.NeuronStats(model, num_groups=3)
    for step, (x, y, ids) in enumerate(_data()):
        with stats.record(ids):
            F.cross_entropy(model(x), y).backward()
        if step == 1:
            want_means = stats.grad_sq_mean()
    want = stats.state_dict()
    for r, got in enumerate(ranks):  # the summaries reduced by themselves; per-sample tables stay local
        for n, mean in want_means.items():
            torch.testing.assert_close(got["means"][n], mean, rtol=1e-5, atol=1e-7, msg=n)
        assert got["last_sample_ids"].tolist() == list(range((STEPS - 1) * BATCH + r, STEPS * BATCH, WORLD))
        assert got["last_grad_sq"]["6"].shape == (BATCH // WORLD, 3)
        torch.testing.assert_close(got["last_grad_sq"]["6"], stats.last_grad_sq["6"][r::WORLD], rtol=1e-4, atol=1e-7)
    assert ranks[0]["names"] == stats.layer_names == ["0", "4", "6"]  # DDP's "module." is not in the names
    for key, value in want.items():
        got = [r["state"][key] for r in ranks]
        if not isinstance(value, torch.Tensor):
            assert got[0] == got[1] == value, key
            continue
        assert torch.equal(got[0], got[1]), key  # every rank holds the same numbers
        torch.testing.assert_close(got[0], value, rtol=1e-5, atol=1e-6, msg=key)
    assert int(ranks[0]["state"]["group_count"].sum()) == STEPS * BATCH


def test_all_reduce_without_a_process_group_raises_clearly():
    stats = sf.NeuronStats(_model(), num_groups=2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        stats.all_reduce()


def test_unmerge_moments_recovers_the_part_merged_in():
    from spurfast.distributed import unmerge_moments
    from spurfast.ops import activation_stats, merge_group_moments

    torch.manual_seed(2)
    a, b = torch.randn(9, 4, dtype=torch.float64) * 3 + 1, torch.randn(7, 4, dtype=torch.float64)
    ids_a, ids_b = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0, 1]), torch.tensor([1, 1, 1, 0, 1, 1, 1])
    part_a = activation_stats(a.unsqueeze(-1), ids_a, 3, backend="torch")[1:]  # group 2 empty on both sides
    part_b = activation_stats(b.unsqueeze(-1), ids_b, 3, backend="torch")[1:]
    total = merge_group_moments(*part_a, *part_b)
    for got, want in zip(unmerge_moments(total, part_a), part_b):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
