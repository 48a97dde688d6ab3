"""NeuronStats under FSDP (sharded parameters): two CPU processes (gloo) equal one process on the
concatenated batches.

* FSDP2 (``fully_shard``): per layer, per block or the root only, ``reshard_after_forward`` True
  and False, the NeuronStats created after sharding (parameters are DTensors) or before. The
  statistics, reduced over ranks, equal one process; the sharded ``.grad`` (``full_tensor()``)
  and the parameters after SGD steps equal one process; the tied-weight check still sees ties.
* FSDP1 (``FullyShardedDataParallel``): the NeuronStats created before or after wrapping,
  ``use_orig_params`` True or False, under the user's names (no ``_fsdp_wrapped_module.``).
  Created after wrapping with ``use_orig_params=True``, the layers' weights are flat 1-D
  shards outside the forward; their shapes come from the layers' attributes.
"""
import datetime
import gc
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import spurfast as sf

WORLD, STEPS, BATCH, GROUPS, LR = 2, 2, 8, 3, 0.5
NAMES = ["0.0", "1.1", "2"]


def _fully_shard():
    """FSDP2's ``fully_shard`` (torch.distributed.fsdp from torch 2.6, _composable.fsdp in 2.4-2.5)."""
    if not dist.is_available():
        return None
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            return None
    return fully_shard


def _fsdp1():
    if not dist.is_available():
        return None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return FullyShardedDataParallel


# name -> settings. kind: fsdp2 / fsdp1; wrap: what gets its own FSDP unit; before: NeuronStats
# built on the model before it is sharded.
FSDP2_CONFIGS = {
    f"{wrap}-{'reshard' if reshard else 'keep'}": dict(kind="fsdp2", wrap=wrap, reshard=reshard)
    for wrap in ("root", "blocks", "layers") for reshard in (True, False)
}
FSDP2_CONFIGS["blocks-reshard-built-before"] = dict(kind="fsdp2", wrap="blocks", reshard=True, before=True)
FSDP2_CONFIGS["layers-reshard-torch-backend"] = dict(kind="fsdp2", wrap="layers", reshard=True, backend="torch")
FSDP1_CONFIGS = {
    "fsdp1-flat-built-before": dict(kind="fsdp1", orig=False, before=True),
    "fsdp1-orig-built-before": dict(kind="fsdp1", orig=True, before=True),
    "fsdp1-flat-built-after": dict(kind="fsdp1", orig=False, before=False),
}
FSDP1_ORIG_AFTER = {"fsdp1-orig-built-after": dict(kind="fsdp1", orig=True, before=False, wrap="root")}


def _model():
    torch.manual_seed(0)
    # Blocks end in a fresh tensor (no view as a block output, which FSDP2 warns about); the head
    # has 3 rows, sharded unevenly over 2 ranks.
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(24, 10), nn.ReLU()),
        nn.Linear(10, 3),
    )


def _data():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 6, 6, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen),
             torch.randint(0, GROUPS, (BATCH,), generator=gen)) for _ in range(STEPS)]


def _clean(name: str) -> str:
    """A name without FSDP1's wrapper components."""
    return ".".join(part for part in name.split(".") if part and part != "_fsdp_wrapped_module")


def _wrap(model, cfg):
    if cfg["kind"] == "fsdp2":
        fully_shard = _fully_shard()
        units = {"root": [], "blocks": [model[0], model[1]], "layers": [model[0][0], model[1][1], model[2]]}
        for unit in units[cfg["wrap"]] + [model]:
            fully_shard(unit, reshard_after_forward=cfg["reshard"])
        return model
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = None if cfg.get("wrap") == "root" else ModuleWrapPolicy({nn.Sequential})  # each block a unit
    return _fsdp1()(model, use_orig_params=cfg["orig"], device_id=torch.device("cpu"), auto_wrap_policy=policy)


def _full_grads(model, cfg):
    """{name: full gradient} (collectives: every rank calls it), or None where FSDP gives none
    (FSDP1's flat parameters, use_orig_params=False)."""
    if cfg["kind"] == "fsdp2":
        return {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if not cfg["orig"]:  # summon_full_params(with_grads=True) needs use_orig_params=True
        return None
    with _fsdp1().summon_full_params(model, with_grads=True):
        return {_clean(n): p.grad.detach().clone() for n, p in model.named_parameters()}


def _full_params(model, cfg):
    if cfg["kind"] == "fsdp2":
        return {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    with _fsdp1().summon_full_params(model):
        return {_clean(n): p.detach().clone() for n, p in model.named_parameters()}


def _train(rank, cfg, progress):
    """STEPS SGD steps on this rank's samples, recording each; a reduction midway."""
    backend = cfg.get("backend", "auto")
    model = _model()
    stats = sf.NeuronStats(model, GROUPS, backend=backend) if cfg.get("before") else None
    try:
        model = _wrap(model, cfg)
    except Exception as exc:  # FSDP on CPU/gloo is torch's part (older torch may lack it): skip there
        return {"unavailable": f"{type(exc).__name__}: {exc}"}
    out = {"param_types": sorted({type(p).__name__ for p in model.parameters()})}
    if stats is None:
        progress["phase"] = "construct"
        stats = sf.NeuronStats(model, GROUPS, backend=backend)
    progress["phase"] = "record"
    out["layer_names"] = stats.layer_names
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out["grads"] = []
    for step, (x, y, ids) in enumerate(_data()):
        mine = slice(rank, None, WORLD)  # ranks hold interleaved samples
        opt.zero_grad()
        with stats.record(ids[mine]):
            F.cross_entropy(model(x[mine]), y[mine]).backward()
        grads = _full_grads(model, cfg)
        if grads is None:  # flat parameters: the gradient from the (plain SGD) step it makes
            before = _full_params(model, cfg)
            opt.step()
            grads = {n: (p - after) / LR for (n, p), after in zip(before.items(), _full_params(model, cfg).values())}
        else:
            opt.step()
        out["grads"].append(grads)
        if step == 0:
            stats.all_reduce()
    out["means"] = stats.grad_sq_mean()  # reduces by itself
    out["state"] = stats.state_dict()
    out["last"] = {"last_grad_sq": stats.last_grad_sq, "last_act": stats.last_act,
                   "last_ablation": stats.last_ablation}
    out["params"] = _full_params(model, cfg)
    return out


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


def _tied_check():
    model = _Tied()
    try:
        _fully_shard()(model)
    except Exception as exc:
        return {"unavailable": f"{type(exc).__name__}: {exc}"}
    stats = sf.NeuronStats(model, GROUPS)
    try:
        sf.NeuronStats(model, GROUPS, layers=["a"])
        error = ""
    except ValueError as exc:
        error = str(exc)
    return {"param_types": sorted({type(p).__name__ for p in model.parameters()}), "layer_names": stats.layer_names,
            "untracked": stats.untracked, "explicit_error": error}


def _worker(rank, init_file, out_dir, configs, tolerate_errors):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name, cfg in configs.items():
            if cfg.get("kind") == "tied":
                result = _tied_check()
            elif tolerate_errors:
                progress = {}
                try:
                    result = _train(rank, cfg, progress)
                except Exception as exc:  # the failure under test: report it, run no more collectives
                    result = {"error": f"{type(exc).__name__}: {exc}", "phase": progress.get("phase"),
                              "traceback": traceback.format_exc()}
            else:
                result = _train(rank, cfg, {})
            torch.save(result, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
            del result
            # An FSDP model still alive at destroy_process_group() aborts the process on CPU/gloo
            # (plain torch, spurfast or not): collect each one before the next.
            gc.collect()
            if not tolerate_errors:
                dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def _spawn(tmp_path_factory, configs, tolerate_errors=False):
    from spurfast._extension import load_extension

    load_extension()  # built (or found missing) once here, not in both workers at once
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(out / "init"), str(out), configs, tolerate_errors), nprocs=WORLD, join=True)
    return {name: [torch.load(out / f"{name}.rank{r}.pt", weights_only=True) for r in range(WORLD)]
            for name in configs}


def _reference(backend="auto"):
    """One process on the concatenated batches."""
    model = _model()
    stats = sf.NeuronStats(model, GROUPS, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    grads = []
    for x, y, ids in _data():
        opt.zero_grad()
        with stats.record(ids):
            F.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return {"layer_names": stats.layer_names, "grads": grads, "means": stats.grad_sq_mean(),
            "state": stats.state_dict(), "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "last": {"last_grad_sq": stats.last_grad_sq, "last_act": stats.last_act,
                     "last_ablation": stats.last_ablation}}


_REFERENCES = {}


def _ref(backend):
    if backend not in _REFERENCES:
        _REFERENCES[backend] = _reference(backend)
    return _REFERENCES[backend]


def _skip_if_unavailable(ranks):
    if "unavailable" in ranks[0]:
        pytest.skip(f"this FSDP does not run on CPU with gloo in this torch: {ranks[0]['unavailable']}")


def _assert_equals_one_process(ranks, want):
    close = dict(rtol=1e-5, atol=1e-6)
    states = [r["state"] for r in ranks]  # under the user's names: no FSDP1 wrapper parts
    assert states[0]["layer_names"] == want["layer_names"] == NAMES
    for key, value in want["state"].items():
        if key == "layer_names":
            continue
        if not isinstance(value, torch.Tensor):
            assert states[0][key] == states[1][key] == value, key
            continue
        assert torch.equal(states[0][key], states[1][key]), key  # every rank holds the same numbers
        torch.testing.assert_close(states[0][key], value, **close, msg=key)
    assert int(states[0]["group_count"].sum()) == STEPS * BATCH
    for r, got in enumerate(ranks):
        means = got["means"]
        for n, mean in want["means"].items():
            torch.testing.assert_close(means[n], mean, **close, msg=n)
        for table, tensors in want["last"].items():  # the per-sample tables stay rank-local
            mine = got["last"][table]
            for n, t in tensors.items():
                torch.testing.assert_close(mine[n], t[r::WORLD], rtol=1e-4, atol=1e-6, msg=f"{table}[{n}]")
        for n, p in want["params"].items():  # after STEPS SGD steps on the sharded gradients
            torch.testing.assert_close(got["params"][n], p, **close, msg=n)
        for step, (mine, grads) in enumerate(zip(got["grads"], want["grads"])):
            assert set(mine) == set(grads)
            for n, g in grads.items():
                torch.testing.assert_close(mine[n], g, **close, msg=f"step {step}: {n}.grad")


needs_fully_shard = pytest.mark.skipif(_fully_shard() is None, reason="torch.distributed or FSDP2 fully_shard "
                                       "is not available in this torch")
needs_fsdp1 = pytest.mark.skipif(_fsdp1() is None or _fully_shard() is None,
                                 reason="torch.distributed or FullyShardedDataParallel is not available")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Every config that works, in one pair of processes (one process group)."""
    if _fully_shard() is None:
        pytest.skip("torch.distributed or FSDP2 fully_shard is not available in this torch")
    configs = dict(FSDP2_CONFIGS)
    configs["fsdp2-tied"] = dict(kind="tied")
    if _fsdp1() is not None:
        configs.update(FSDP1_CONFIGS)
    return _spawn(tmp_path_factory, configs)


@needs_fully_shard
@pytest.mark.parametrize("name", list(FSDP2_CONFIGS))
def test_fully_shard_equals_one_process_on_the_concatenated_batch(fsdp_runs, name):
    ranks = fsdp_runs[name]
    _skip_if_unavailable(ranks)
    assert ranks[0]["param_types"] == ["DTensor"]  # the parameters were sharded
    assert ranks[0]["layer_names"] == NAMES  # fully_shard keeps the user's names
    _assert_equals_one_process(ranks, _ref(FSDP2_CONFIGS[name].get("backend", "auto")))


@needs_fully_shard
def test_fully_shard_tied_weights_are_still_detected(fsdp_runs):
    _skip_if_unavailable(fsdp_runs["fsdp2-tied"])
    got = fsdp_runs["fsdp2-tied"][0]
    assert got["param_types"] == ["DTensor"]
    assert got["layer_names"] == ["head"]
    assert set(got["untracked"]) == {"a", "b"} and "tied" in got["untracked"]["a"]
    assert "shares its weight" in got["explicit_error"]


@needs_fsdp1
@pytest.mark.parametrize("name", list(FSDP1_CONFIGS))
def test_fsdp1_equals_one_process_on_the_concatenated_batch(fsdp_runs, name):
    ranks = fsdp_runs[name]
    _skip_if_unavailable(ranks)
    assert ranks[0]["layer_names"] == NAMES  # FSDP1's "_fsdp_wrapped_module." is not in the names
    _assert_equals_one_process(ranks, _ref("auto"))


@needs_fsdp1
def test_fsdp1_orig_params_built_after_wrapping(tmp_path_factory):
    # outside the forward each layer's weight is then a flat 1-D shard (shape [162], or [0] on a
    # rank holding none of it): the layers' shapes come from their own attributes instead
    ranks = _spawn(tmp_path_factory, FSDP1_ORIG_AFTER, tolerate_errors=True)["fsdp1-orig-built-after"]
    _skip_if_unavailable(ranks)
    assert not any(r.get("error") for r in ranks), [r.get("traceback") for r in ranks]
    assert ranks[0]["layer_names"] == NAMES
    _assert_equals_one_process(ranks, _ref("auto"))
