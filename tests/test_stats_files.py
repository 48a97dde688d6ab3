"""NeuronStats options for large models and long runs: ``group_grad`` for chosen layers only,
``sample_ids`` beside the per-sample tables, and ``save``/``load`` through safetensors."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import spurfast as sf


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))


def _batches(steps=3, batch=8):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 6, 6, generator=gen), torch.randint(0, 3, (batch,), generator=gen),
             torch.randint(0, 2, (batch,), generator=gen)) for _ in range(steps)]


def _record(model, stats, batches):
    for x, y, ids in batches:
        with stats.record(ids):
            F.cross_entropy(model(x), y).backward()


# --------------------------------------------------------------------------- group_grad for chosen layers
def test_group_grad_for_chosen_layers_only_others_keep_every_other_statistic():
    model = _model()
    full = sf.NeuronStats(model, num_groups=2, backend="torch")
    _record(model, full, _batches())
    full_state = full.state_dict()
    full.remove()
    some = sf.NeuronStats(model, num_groups=2, backend="torch", track_group_grad=[model[5], "0"])
    assert some.group_grad_layers == ["0", "5"]  # module order, given as a module and a name
    _record(model, some, _batches())
    assert sorted(some.group_grad) == ["0", "5"]
    for n in ("0", "5"):
        torch.testing.assert_close(some.group_grad[n], full_state[f"group_grad.{n}"], rtol=1e-6, atol=1e-7)
    state = some.state_dict()
    assert "group_grad.3" not in state
    for key, value in state.items():  # every other table is the full one's
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, full_state[key], rtol=1e-6, atol=1e-7, msg=key)
    # memory: the unchosen layer's G x |W| table is not held
    fresh_full = sf.NeuronStats(model, num_groups=2).nbytes
    fresh_some = sf.NeuronStats(model, num_groups=2, track_group_grad=["0", "5"]).nbytes
    assert fresh_full - fresh_some == full_state["group_grad.3"].numel() * 4  # float32
    with pytest.raises(ValueError, match="does not keep for layers \\['3'\\]"):
        sf.Mask.top_gradient_channels(some, 0.5)
    assert sorted(sf.Mask.top_gradient_channels(some, 0.5, layers=["0", "5"]).entries) == ["0.bias", "0.weight", "5.bias", "5.weight"]


@pytest.mark.parametrize("bad, error, match", [
    (["nope"], ValueError, "track_group_grad: 'nope' is not one of the tracked layers"),
    ([nn.Linear(2, 2)], ValueError, "track_group_grad: Linear.*is not one of the tracked layers"),
    (3, TypeError, "track_group_grad must be a bool or a list"),
])
def test_bad_track_group_grad_is_named(bad, error, match):
    with pytest.raises(error, match=match):
        sf.NeuronStats(_model(), num_groups=2, track_group_grad=bad)


def test_track_group_grad_false_keeps_none_and_a_string_names_one():
    model = _model()
    assert sf.NeuronStats(model, num_groups=2, track_group_grad=False).group_grad_layers == []
    assert sf.NeuronStats(model, num_groups=2, track_group_grad="3").group_grad_layers == ["3"]


# --------------------------------------------------------------------------- sample_ids
def test_sample_ids_are_kept_beside_the_last_batch_and_validated():
    model = _model()
    stats = sf.NeuronStats(model, num_groups=2)
    assert stats.last_sample_ids is None
    x, y, ids = _batches(1)[0]
    index = torch.arange(100, 108, dtype=torch.int32)
    with stats.record(ids, sample_ids=index):
        F.cross_entropy(model(x), y).backward()
    index.add_(1)  # the kept ids are a copy
    assert stats.last_sample_ids.dtype == torch.int64
    assert stats.last_sample_ids.tolist() == list(range(100, 108))
    with stats.record(ids):  # a batch without ids clears them
        F.cross_entropy(model(x), y).backward()
    assert stats.last_sample_ids is None
    before = stats.state_dict()
    for bad in (torch.arange(7), torch.arange(8.0), [0] * 8, torch.ones(8, dtype=torch.bool)):
        with pytest.raises(ValueError, match="sample_ids must be an integer tensor of shape \\[8\\]"):
            with stats.record(ids, sample_ids=bad):
                F.cross_entropy(model(x), y).backward()
    assert int(stats.group_count.sum()) == int(before["group_count"].sum())  # nothing recorded or changed
    stats.reset()
    assert stats.last_sample_ids is None


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("options", [
    {},
    {"track_group_grad": ["5"], "track_activations": False, "track_ablation": False},
], ids=["all", "some"])
def test_save_load_round_trip_with_and_without_the_model(tmp_path, options):
    model = _model()
    stats = sf.NeuronStats(model, num_groups=2, loss_reduction="mean", **options)
    batches = _batches(4)
    _record(model, stats, batches[:2])
    path = stats.save(tmp_path / "sub" / "stats.safetensors")  # creates the folder
    assert path == str(tmp_path / "sub" / "stats.safetensors")
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".tmp")]
    saved = stats.state_dict()

    # without a model: the tables and summaries, read-only
    alone = sf.NeuronStats.load(path)
    assert alone.layer_names == stats.layer_names and alone.group_grad_layers == stats.group_grad_layers
    assert (alone.num_groups, alone.loss_reduction) == (2, "mean")
    for key, value in alone.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, saved[key]), key
        else:
            assert value == saved[key], key
    for n, mean in stats.grad_sq_mean().items():
        torch.testing.assert_close(alone.grad_sq_mean()[n], mean, rtol=0, atol=0)
    if stats.track_activations:
        torch.testing.assert_close(alone.act_var, stats.act_var, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="loaded without a model"):
        with alone.record(batches[0][2]):
            pass
    with pytest.raises(RuntimeError, match="reset\\(\\) on a NeuronStats loaded without a model"):
        alone.reset()

    # with the model: resume, and the result equals one uninterrupted run
    stats.remove()
    resumed = sf.NeuronStats.load(path, model)
    assert resumed.layer_names == alone.layer_names and resumed.group_grad_layers == alone.group_grad_layers
    _record(model, resumed, batches[2:])
    straight = sf.NeuronStats(model, num_groups=2, **options)
    _record(model, straight, batches)
    want = straight.state_dict()
    for key, value in resumed.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, want[key], rtol=1e-6, atol=1e-8, msg=key)


def test_load_with_a_different_model_fails_clearly(tmp_path):
    model = _model()
    stats = sf.NeuronStats(model, num_groups=2)
    _record(model, stats, _batches(1))
    path = stats.save(tmp_path / "s.safetensors")
    other = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(80, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="shape"):
        sf.NeuronStats.load(path, other)
    with pytest.raises(ValueError, match="not a submodule"):
        sf.NeuronStats.load(path, nn.Sequential(nn.Linear(3, 3)))


def test_bad_files_are_refused_before_anything_is_built(tmp_path):
    model = _model()
    stats = sf.NeuronStats(model, num_groups=2)
    _record(model, stats, _batches(1))
    good = stats.save(tmp_path / "good.safetensors")
    with pytest.raises(FileNotFoundError, match="no statistics file"):
        sf.NeuronStats.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        sf.NeuronStats.load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a spurfast NeuronStats file"):
        sf.NeuronStats.load(tmp_path / "plain.safetensors")
    tensors = load_file(good)
    from safetensors import safe_open

    with safe_open(good, framework="pt") as f:
        meta = json.loads(f.metadata()["spurfast.neuron_stats"])

    def write(name, tensors, meta):
        path = str(tmp_path / name)
        save_file(tensors, path, metadata={"spurfast.neuron_stats": json.dumps(meta)})
        return path

    with pytest.raises(ValueError, match="format 99"):
        sf.NeuronStats.load(write("future.safetensors", tensors, {**meta, "format": 99}))
    with pytest.raises(ValueError, match="metadata 'num_groups' must be a int"):
        sf.NeuronStats.load(write("groups.safetensors", tensors, {**meta, "num_groups": "2"}))
    short = {k: v for k, v in tensors.items() if k != "grad_sq_sum.3"}
    with pytest.raises(ValueError, match="missing \\['grad_sq_sum.3'\\]"):
        sf.NeuronStats.load(write("short.safetensors", short, meta))
    wrong = {**tensors, "act_mean.3": torch.zeros(2, 9, dtype=torch.float64)}
    with pytest.raises(ValueError, match="act_mean.3 has shape \\[2, 9\\], expected \\[2, 8\\]"):
        sf.NeuronStats.load(write("wrong.safetensors", wrong, meta))


# --------------------------------------------------------------------------- group_grad kept elsewhere
def test_group_grad_device_is_validated_and_cpu_gives_the_same_sums():
    model = _model()
    with pytest.raises(ValueError, match="group_grad_device must be a torch.device"):
        sf.NeuronStats(model, num_groups=2, group_grad_device="no-such-device")
    default = sf.NeuronStats(model, num_groups=2)
    _record(model, default, _batches())
    want = {n: t.clone() for n, t in default.group_grad.items()}
    default.remove()
    on_cpu = sf.NeuronStats(model, num_groups=2, group_grad_device="cpu")
    _record(model, on_cpu, _batches())
    assert on_cpu.group_grad_device == torch.device("cpu")
    for n, t in on_cpu.group_grad.items():
        assert t.device.type == "cpu"
        torch.testing.assert_close(t, want[n], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_group_grad_on_the_cpu_for_a_model_on_the_gpu():
    model = _model()
    reference = sf.NeuronStats(model, num_groups=2, backend="torch")
    _record(model, reference, _batches())
    want = {n: t.clone() for n, t in reference.group_grad.items()}
    reference.remove()
    model = model.cuda()
    stats = sf.NeuronStats(model, num_groups=2, group_grad_device="cpu")
    _record(model, stats, [(x.cuda(), y.cuda(), ids.cuda()) for x, y, ids in _batches()])
    for n, t in stats.group_grad.items():
        assert t.device.type == "cpu" and stats.grad_sq_sum[n].device.type == "cuda"
        torch.testing.assert_close(t, want[n], rtol=1e-4, atol=1e-5)  # TF32/cuBLAS order against CPU float32
