"""NeuronStats against torch.func per-sample gradients, on real models and losses."""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import spurfast as sf

from _helpers import TOL, rel_err

BACKENDS = ["torch", "cpp"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 4))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    """Strided, padded, dilated, grouped, depthwise, 'same' and reflect-padded convs, BN (eval)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 6, (2, 3), stride=(2, 1), padding=1, padding_mode="reflect")
        self.c4 = nn.Conv2d(6, 6, 4, padding="same")  # even kernel: asymmetric padding
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.bn(self.dw(x)))
        x = F.relu(self.c4(F.relu(self.c3(x))))
        return self.fc(x.mean((2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(6, 6, 3, padding="same", dilation=2, groups=3)
        self.c3 = nn.Conv1d(6, 6, 4, padding="same")  # even kernel: asymmetric padding
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x)))))).mean(-1))


class TokenNet(nn.Module):
    """Linear layers on [B, T, D] inputs (positions summed in the per-sample gradient)."""

    def __init__(self, d=10, hidden=24):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head((x + self.down(F.gelu(self.up(x)))).mean(1))


class SharedLinear(nn.Module):
    """One Linear called twice in a forward, and one conv called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        x = self.conv(F.relu(self.conv(x)))
        h = x.mean((2, 3))
        return self.head(self.lin(torch.tanh(self.lin(h))))


def _inputs(name, batch):
    return {
        "mlp": (MLP, (batch, 12), 4),
        "cnn": (CNN, (batch, 3, 12, 12), 4),
        "conv1d": (Conv1dNet, (batch, 4, 21), 3),
        "tokens": (TokenNet, (batch, 5, 10), 3),
        "tokens_long": (lambda: TokenNet(d=4, hidden=6), (batch, 40, 4), 3),
        "shared": (SharedLinear, (batch, 3, 6, 6), 2),
    }[name]


def _per_sample_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_fn(p, xn, yn):
        out = functional_call(model, (p, buffers), (xn.unsqueeze(0),))
        return F.cross_entropy(out, yn.unsqueeze(0))

    return vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, x, y)


def _setup(name, batch=7, seed=0):
    torch.manual_seed(seed)
    factory, shape, classes = _inputs(name, batch)
    model = factory().double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,))
    return model, x, y


@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d", "tokens", "tokens_long", "shared"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_statistics_match_torch_func(name, backend, reduction, has_ext):
    model, x, y = _setup(name)
    num_groups = 5
    group_ids = torch.tensor([0, 2, 2, 4, 0, 2, 4])  # groups 1 and 3 are empty in this batch
    per_sample = _per_sample_grads(model, x, y)
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y, reduction=reduction).backward()

    stats = sf.NeuronStats(model, num_groups=num_groups, loss_reduction=reduction, backend=backend)
    with stats.record(group_ids):
        F.cross_entropy(model(x), y, reduction=reduction).backward()

    assert stats.group_count.tolist() == [2, 0, 3, 0, 2]
    modules = dict(model.named_modules())
    for layer in stats.layer_names:
        psg = per_sample[f"{layer}.weight"]  # [B, *W.shape]
        want_sq = psg.flatten(2).square().sum(-1)
        assert rel_err(stats.last_grad_sq[layer], want_sq) < TOL[torch.float32]  # kept as float32
        want_gg = torch.stack([psg[group_ids == g].sum(0) for g in range(num_groups)])
        assert rel_err(stats.group_grad[layer], want_gg) < TOL[torch.float32]
        want_sum = torch.stack([want_sq[group_ids == g].sum(0) for g in range(num_groups)])
        assert rel_err(stats.grad_sq_sum[layer], want_sum) < TOL[torch.float32]
        w = modules[layer].weight
        want_ab = -(psg * w.detach()).flatten(2).sum(-1)  # first-order effect of zeroing row c
        assert stats.last_ablation[layer].dtype == torch.float32
        assert rel_err(stats.last_ablation[layer], want_ab) < TOL[torch.float32]
        want_ab_sum = torch.stack([want_ab[group_ids == g].sum(0) for g in range(num_groups)])
        assert stats.ablation_sum[layer].dtype == torch.float64
        assert rel_err(stats.ablation_sum[layer], want_ab_sum) < TOL[torch.float64]
        assert torch.isnan(stats.ablation_mean()[layer][1]).all()  # empty group
        assert rel_err(stats.ablation_mean()[layer][2], want_ab[group_ids == 2].mean(0)) < TOL[torch.float64]
        assert rel_err(w.grad, dict(plain.named_parameters())[f"{layer}.weight"].grad) < TOL[torch.float64]
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert rel_err(p.grad, q.grad) < TOL[torch.float64], n


def test_layer_selection_and_names():
    model = CNN()
    stats = sf.NeuronStats(model, num_groups=2)
    assert stats.layer_names == ["c1", "c2", "dw", "c3", "c4", "fc"]
    model.c2.weight.requires_grad_(False)
    assert "c2" not in sf.NeuronStats(model, num_groups=2).layer_names
    only = sf.NeuronStats(model, num_groups=2, layers=["fc", model.c1])
    assert only.layer_names == ["c1", "fc"]
    mha = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "proj": nn.Linear(8, 8)})
    assert sf.NeuronStats(mha, num_groups=1).layer_names == ["proj"]


def test_activation_statistics_across_batches(has_ext):
    model, _, _ = _setup("cnn")
    stats = sf.NeuronStats(model, num_groups=3)
    acts = {n: [] for n in stats.layer_names}
    ids_all = []
    modules = dict(model.named_modules())
    captured = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o.detach())) for n in stats.layer_names]
    for seed in range(3):
        torch.manual_seed(10 + seed)
        x = torch.randn(5, 3, 12, 12, dtype=torch.float64)
        ids = torch.randint(0, 3, (5,))
        with stats.record(ids):
            F.cross_entropy(model(x), torch.randint(0, 4, (5,))).backward()
        ids_all.append(ids)
        for n in stats.layer_names:
            out = captured[n]
            per_sample = out.mean((2, 3)) if out.dim() == 4 else out
            assert rel_err(stats.last_act[n], per_sample) < TOL[torch.float32]
            acts[n].append(per_sample)
    for h in hooks:
        h.remove()
    ids = torch.cat(ids_all)
    for n in stats.layer_names:
        a = torch.cat(acts[n])
        for g in range(3):
            rows = a[ids == g]
            assert stats.act_count[n][g] == rows.shape[0]
            if rows.shape[0]:
                assert rel_err(stats.act_mean[n][g], rows.mean(0)) < 1e-6
                assert rel_err(stats.act_var[n][g], rows.var(0, unbiased=False)) < 1e-5


def test_batchnorm_train_mode_contributions_sum_to_weight_grad(has_ext):
    """BN in train mode couples samples: a sample's term is x_n against its grad_out_n."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 3))
    model = model.double().train()
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    ids = torch.tensor([0, 1, 0, 1, 1, 1, 0, 1])
    seen = {}
    model[0].register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0].detach()))
    model[0].register_full_backward_hook(lambda m, gi, go: seen.__setitem__("g", go[0].detach()))
    stats = sf.NeuronStats(model, num_groups=2, loss_reduction="mean")
    with stats.record(ids):
        F.cross_entropy(model(x), y).backward()
    contributions = torch.stack([
        torch.nn.grad.conv2d_weight(seen["x"][n:n + 1], model[0].weight.shape, seen["g"][n:n + 1], padding=1)
        for n in range(8)
    ]) * 8  # per-sample scale of a mean loss
    want_sq = contributions.flatten(2).square().sum(-1)
    assert rel_err(stats.last_grad_sq["0"], want_sq) < TOL[torch.float32]
    want_ab = -(contributions * model[0].weight.detach()).flatten(2).sum(-1)
    assert rel_err(stats.last_ablation["0"], want_ab) < TOL[torch.float32]
    assert rel_err(stats.ablation_sum["0"].sum(0) / 8, -(model[0].weight.grad * model[0].weight.detach()).flatten(1).sum(1)) < TOL[torch.float32]
    assert rel_err(stats.group_grad["0"].sum(0) / 8, model[0].weight.grad) < TOL[torch.float32]


def test_grad_identical_to_plain_and_model_restored(has_ext):
    model, x, y = _setup("cnn")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out_before = model(x)
    stats = sf.NeuronStats(model, num_groups=2)
    with stats.record(torch.zeros(7, dtype=torch.long)):
        F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        assert rel_err(grads[n], p.grad) < TOL[torch.float64], n
        assert torch.equal(p.detach(), before[n])
    stats.remove()
    for m in model.modules():
        assert "forward" not in vars(m)
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert torch.equal(model(x), out_before)
    with pytest.raises(RuntimeError, match="removed"):
        with stats.record(torch.zeros(7, dtype=torch.long)):
            pass


def test_exception_inside_record_restores_model_and_keeps_state(has_ext):
    model, x, y = _setup("mlp")
    stats = sf.NeuronStats(model, num_groups=2)
    with stats.record(torch.zeros(7, dtype=torch.long)):
        F.cross_entropy(model(x), y).backward()
    snapshot = stats.state_dict()
    with pytest.raises(KeyError):
        with stats.record(torch.ones(7, dtype=torch.long)):
            F.cross_entropy(model(x), y).backward()
            raise KeyError("user error")
    assert all("forward" not in vars(m) for m in model.modules())
    for k, v in stats.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, snapshot[k]), k


def test_non_finite_batch_is_rejected_and_state_kept(has_ext):
    model, x, y = _setup("mlp")
    stats = sf.NeuronStats(model, num_groups=2)
    with stats.record(torch.zeros(7, dtype=torch.long)):
        F.cross_entropy(model(x), y).backward()
    snapshot = stats.state_dict()
    x_bad = x.clone()
    x_bad[2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="net.0"):
        with stats.record(torch.ones(7, dtype=torch.long)):
            F.cross_entropy(model(x_bad), y).backward()
    for k, v in stats.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, snapshot[k]), k


def test_layer_called_again_after_its_backward_raises(has_ext):
    model, x, y = _setup("mlp")
    stats = sf.NeuronStats(model, num_groups=1)
    with pytest.raises(RuntimeError, match="called again after its backward"):
        with stats.record(torch.zeros(7, dtype=torch.long)):
            F.cross_entropy(model(x), y).backward()
            model(x)


def test_unused_layer_has_zero_gradient_statistics(has_ext):
    model, x, y = _setup("mlp")
    extra = nn.Linear(12, 2).double()
    wrapper = nn.ModuleDict({"main": model, "aux": extra})
    stats = sf.NeuronStats(wrapper, num_groups=2)
    with stats.record(torch.arange(7) % 2):
        extra(x)  # called, but not part of the loss
        F.cross_entropy(model(x), y).backward()
    assert torch.equal(stats.last_grad_sq["aux"], torch.zeros(7, 2))
    assert stats.last_grad_sq["main.net.0"].abs().sum() > 0


class _MixedPrecisionNet(nn.Module):
    """A float64 layer feeding a float32 one, and a float64 head used only in some batches."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(6, 5).double()
        self.narrow = nn.Linear(5, 4)
        self.side = nn.Linear(6, 3).double()

    def forward(self, x, use_side):
        out = self.narrow(torch.tanh(self.wide(x)).float()).double().sum(1)
        return out + self.side(x).sum(1) if use_side else out


def test_fold_of_layers_with_mixed_dtypes_and_skipped_batches_matches_per_layer_sums(has_ext):
    """The fold reduces every layer's tables side by side; with layers of two dtypes and one
    layer absent from a batch (so that its running counts differ from the others'), each
    layer's running statistics still equal its own batches' sums and moments."""
    torch.manual_seed(3)
    model = _MixedPrecisionNet()
    stats = sf.NeuronStats(model, num_groups=3)
    seen = {n: {"grad_sq": [], "act": [], "ids": []} for n in stats.layer_names}
    for step in range(3):
        x = torch.randn(6, 6, dtype=torch.float64)
        ids = torch.tensor([0, 1, 2, 0, 1, 0])
        use_side = step != 1
        with stats.record(ids):
            model(x, use_side).square().mean().backward()
        model.zero_grad()
        for n in stats.layer_names:
            if n in stats.last_act:
                seen[n]["act"].append(stats.last_act[n].double())
                seen[n]["ids"].append(ids)
            seen[n]["grad_sq"].append((stats.last_grad_sq[n].double(), ids))
    for n in stats.layer_names:
        want = torch.zeros(3, stats.grad_sq_sum[n].shape[1], dtype=torch.float64)
        for table, ids in seen[n]["grad_sq"]:
            want.index_add_(0, ids, table)
        torch.testing.assert_close(stats.grad_sq_sum[n], want, rtol=1e-6, atol=1e-12)
        acts, ids = torch.cat(seen[n]["act"]), torch.cat(seen[n]["ids"])
        for g in range(3):
            rows = acts[ids == g]
            assert int(stats.act_count[n][g]) == rows.shape[0]
            torch.testing.assert_close(stats.act_mean[n][g], rows.mean(0), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(stats.act_var[n][g], rows.var(0, unbiased=False), rtol=1e-5, atol=1e-9)
    assert int(stats.act_count["side"].sum()) == 12 and int(stats.act_count["wide"].sum()) == 18


def test_forward_only_record_updates_activations_only(has_ext):
    model, x, _ = _setup("mlp")
    stats = sf.NeuronStats(model, num_groups=2)
    with torch.no_grad(), stats.record(torch.arange(7) % 2):
        model(x)
    assert stats.group_count.sum() == 0
    assert stats.act_count["net.0"].tolist() == [4, 3]


def test_state_dict_round_trip_and_mismatch(has_ext):
    model, x, y = _setup("cnn")
    stats = sf.NeuronStats(model, num_groups=3)
    for seed in range(2):
        torch.manual_seed(seed)
        with stats.record(torch.randint(0, 3, (7,))):
            F.cross_entropy(model(x), y).backward()
    sd = stats.state_dict()
    other = sf.NeuronStats(model, num_groups=3)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]) if isinstance(v, torch.Tensor) else v == sd[k]
    other.reset()
    assert other.group_count.sum() == 0 and other.grad_sq_sum["c1"].abs().sum() == 0
    with pytest.raises(ValueError, match="num_groups=3"):
        sf.NeuronStats(model, num_groups=2).load_state_dict(sd)
    broken = dict(sd)
    broken["group_grad.c1"] = torch.zeros(3, 1)
    before = other.state_dict()
    with pytest.raises(ValueError, match="group_grad.c1 has shape"):
        other.load_state_dict(broken)
    for k, v in other.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k])


def test_bad_inputs_raise_clear_errors():
    model, x, y = _setup("mlp")
    stats = sf.NeuronStats(model, num_groups=2)
    with pytest.raises(ValueError, match=r"group_ids must lie in \[0, num_groups=2\)"):
        with stats.record(torch.tensor([0, 1, 2, 0, 0, 0, 0])):
            pass
    with pytest.raises(ValueError, match="7 samples in dim 0, but record\\(\\) was given 3"):
        with stats.record(torch.tensor([0, 1, 0])):
            model(x)
    assert all("forward" not in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError, match="cannot be nested"):
        with stats.record(torch.zeros(7, dtype=torch.long)):
            with stats.record(torch.zeros(7, dtype=torch.long)):
                pass
    with pytest.raises(TypeError, match="Conv3d.*not supported"):
        sf.NeuronStats(nn.Sequential(nn.Conv3d(1, 2, 1)), num_groups=1, layers=["0"])
    with pytest.raises(ValueError, match="no layer to track"):
        sf.NeuronStats(nn.Sequential(nn.Embedding(3, 4)), num_groups=1)
    frozen = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        sf.NeuronStats(frozen, num_groups=1, layers=["0"])
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="shares its weight"):
        sf.NeuronStats(tied, num_groups=1, layers=["0", "2"])
    # the default selection leaves tied layers out, lists them and warns
    with pytest.warns(UserWarning, match="'0' .*tied to \\['1'\\]"):
        tied_stats = sf.NeuronStats(tied, num_groups=1)
    assert tied_stats.layer_names == ["2"] and sorted(tied_stats.untracked) == ["0", "1"]
    tied_stats.remove()
    with pytest.raises(ValueError, match="loss_reduction"):
        sf.NeuronStats(model, num_groups=1, loss_reduction="none")
    with pytest.raises(ValueError, match="not a submodule"):
        sf.NeuronStats(model, num_groups=1, layers=["nope"])


def test_backward_after_record_warns_and_keeps_grad(has_ext):
    model, x, y = _setup("mlp")
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    stats = sf.NeuronStats(model, num_groups=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the forward ran inside: no "nothing recorded" warning at exit
        with stats.record(torch.zeros(7, dtype=torch.long)):
            loss = F.cross_entropy(model(x), y)
    with pytest.warns(RuntimeWarning, match="after its record"):
        import spurfast._extension as ext

        ext._warned.discard("backward-after-record")
        loss.backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert rel_err(p.grad, q.grad) < TOL[torch.float64]


def test_float32_model_statistics(has_ext):
    model, x, y = _setup("cnn")
    per_sample = _per_sample_grads(model, x, y)
    model = model.float()
    stats = sf.NeuronStats(model, num_groups=2)
    with stats.record(torch.arange(7) % 2):
        F.cross_entropy(model(x.float()), y).backward()
    for layer in stats.layer_names:
        want = per_sample[f"{layer}.weight"].flatten(2).square().sum(-1)
        assert rel_err(stats.last_grad_sq[layer], want) < 1e-4  # float32 forward/backward vs float64


@pytest.mark.gpu
def test_record_on_cuda_matches_cpu():
    model, x, y = _setup("cnn")
    ids = torch.arange(7) % 3
    cpu = sf.NeuronStats(model, num_groups=3, backend="torch")
    with cpu.record(ids):
        F.cross_entropy(model(x), y).backward()
    gpu_model = copy.deepcopy(model).cuda()
    gpu = sf.NeuronStats(gpu_model, num_groups=3)
    with gpu.record(ids.cuda()):
        F.cross_entropy(gpu_model(x.cuda()), y.cuda()).backward()
    for n in cpu.layer_names:
        assert rel_err(gpu.last_grad_sq[n].cpu(), cpu.last_grad_sq[n]) < 1e-6


@pytest.mark.parametrize("num_groups", [1, 2, 3, 4, 5])
def test_every_group_count_with_empty_groups(num_groups, has_ext):
    model, x, y = _setup("cnn", batch=6, seed=num_groups)
    # Ids 0 and 2 only: for num_groups >= 2 group 1 (and any above 2) is empty in this batch.
    group_ids = torch.tensor([0, 0, 2, 2, 0, 2]) % num_groups
    per_sample = _per_sample_grads(model, x, y)
    stats = sf.NeuronStats(model, num_groups=num_groups)
    with stats.record(group_ids):
        F.cross_entropy(model(x), y).backward()
    assert stats.group_count.tolist() == torch.bincount(group_ids, minlength=num_groups).tolist()
    for layer in stats.layer_names:
        psg = per_sample[f"{layer}.weight"]
        want = torch.stack([psg[group_ids == g].sum(0) for g in range(num_groups)])
        assert rel_err(stats.group_grad[layer], want) < TOL[torch.float32]
        assert rel_err(stats.last_grad_sq[layer], psg.flatten(2).square().sum(-1)) < TOL[torch.float32]


# ---------------------------------------------------------------- misuse: attention, nesting, no forward


def _no_instance_forward(model):
    return all("forward" not in vars(m) for m in model.modules())


def _check_against_torch_func(stats, per_sample, group_ids, num_groups):
    for layer in stats.layer_names:
        psg = per_sample[f"{layer}.weight"]
        assert rel_err(stats.last_grad_sq[layer], psg.flatten(2).square().sum(-1)) < TOL[torch.float32]
        want = torch.stack([psg[group_ids == g].sum(0) for g in range(num_groups)])
        assert rel_err(stats.group_grad[layer], want) < TOL[torch.float32]


def test_attention_child_named_in_layers_raises():
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    assert sf.NeuronStats(model, num_groups=1).layer_names == ["linear1", "linear2"]  # out_proj skipped
    for layer in ("self_attn.out_proj", model.self_attn.out_proj):
        with pytest.raises(ValueError, match=r"'self_attn.out_proj' belongs to nn.MultiheadAttention 'self_attn'.*"
                                             r"without calling the layer.*track other layers"):
            sf.NeuronStats(model, num_groups=1, layers=["linear1", layer])
    with pytest.raises(ValueError, match=r"'out_proj' belongs to nn.MultiheadAttention \(the model itself\)"):
        sf.NeuronStats(nn.MultiheadAttention(8, 2), num_groups=1, layers=["out_proj"])


def test_nested_record_of_the_same_layer_raises_and_outer_block_still_works():
    model, x, y = _setup("mlp")
    per_sample = _per_sample_grads(model, x, y)
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    ids = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    outer = sf.NeuronStats(model, num_groups=2, backend="torch")
    inner = sf.NeuronStats(model.net, num_groups=2, layers=["2", "4"], backend="torch")  # same modules, other names
    with outer.record(ids):
        late = sf.NeuronStats(model, num_groups=2, layers=["net.4"])  # creating one inside is fine
        for other in (inner, late):
            with pytest.raises(RuntimeError, match=r"already being recorded by another NeuronStats.*nested "
                                                   r"recording of the same layer by two NeuronStats is not "
                                                   r"supported.*one NeuronStats.*one after the other"):
                with other.record(ids):
                    pass
        with pytest.raises(RuntimeError, match=r"\['2' \(named 'net.2' there\), '4' \(named 'net.4' there\)\]"):
            with inner.record(ids):
                pass
        F.cross_entropy(model(x), y).backward()
    assert _no_instance_forward(model)
    _check_against_torch_func(outer, per_sample, ids, 2)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert rel_err(p.grad, q.grad) < TOL[torch.float64]
    assert inner.group_count.sum() == 0 and inner._batch is None and late._batch is None
    # An error inside the outer block (here the nested record's own) leaves the model as it was.
    snapshot = outer.state_dict()
    with pytest.raises(RuntimeError, match="already being recorded"):
        with outer.record(ids):
            F.cross_entropy(model(x), y).backward()
            with inner.record(ids):
                pass
    assert _no_instance_forward(model)
    for k, v in outer.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, snapshot[k]), k
    # One after the other, both record.
    model.zero_grad()
    with inner.record(ids):
        F.cross_entropy(model(x), y).backward()
    assert _no_instance_forward(model)
    for name in inner.layer_names:
        psg = per_sample[f"net.{name}.weight"]
        assert rel_err(inner.last_grad_sq[name], psg.flatten(2).square().sum(-1)) < TOL[torch.float32]


@pytest.mark.parametrize("outer_exits_first", [False, True])
def test_nested_record_of_disjoint_layers_matches_torch_func(outer_exits_first):
    """Each tracked layer runs through exactly one NeuronStats, so nesting is exact."""
    model, x, y = _setup("mlp")
    per_sample = _per_sample_grads(model, x, y)
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    ids_a, ids_b = torch.tensor([0, 1, 1, 0, 1, 0, 0]), torch.tensor([2, 0, 1, 2, 2, 0, 1])
    a = sf.NeuronStats(model, num_groups=2, layers=["net.0"], backend="torch")
    b = sf.NeuronStats(model, num_groups=3, layers=["net.2", "net.4"], backend="torch")
    with contextlib.ExitStack() as stack:
        record_a, record_b = a.record(ids_a), b.record(ids_b)
        stack.enter_context(record_a)
        stack.enter_context(record_b)
        F.cross_entropy(model(x), y).backward()
        if outer_exits_first:
            record_a.__exit__(None, None, None)
            stack.pop_all()
            record_b.__exit__(None, None, None)
    assert _no_instance_forward(model)
    _check_against_torch_func(a, per_sample, ids_a, 2)
    _check_against_torch_func(b, per_sample, ids_b, 3)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert rel_err(p.grad, q.grad) < TOL[torch.float64]


def test_forward_replaced_after_construction_raises_and_is_kept():
    model, x, _ = _setup("mlp")
    stats = sf.NeuronStats(model, num_groups=1)
    custom = lambda inp: inp[:, :16] * 2  # noqa: E731
    model.net[0].forward = custom
    with pytest.raises(RuntimeError, match=r"\['net.0'\] have their forward replaced on the instance"):
        with stats.record(torch.zeros(7, dtype=torch.long)):
            pass
    assert vars(model.net[0])["forward"] is custom
    assert stats._batch is None and all("forward" not in vars(m) for m in (model.net[2], model.net[4]))


def test_record_without_forward_inside_warns():
    model, x, y = _setup("mlp")
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    stats = sf.NeuronStats(model, num_groups=2, backend="torch")
    ids = torch.arange(7) % 2
    loss = F.cross_entropy(model(x), y)  # graph built outside record(): nothing to record
    with pytest.warns(RuntimeWarning, match=r"no tracked layer ran a forward inside record\(\), so nothing was "
                                            r"recorded.*both the forward and the backward inside"):
        with stats.record(ids):
            loss.backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert rel_err(p.grad, q.grad) < TOL[torch.float64]
    with pytest.warns(RuntimeWarning, match="no tracked layer ran a forward"):
        with stats.record(ids):
            pass  # the model was not called
    assert stats.group_count.sum() == 0 and stats.act_count["net.0"].sum() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with stats.record(ids):
            F.cross_entropy(model(x), y).backward()
        with torch.no_grad(), stats.record(ids):
            model(x)  # forward only: activations are recorded
        with pytest.raises(KeyError), stats.record(ids):
            raise KeyError("an exception exit does not warn")
    assert stats.group_count.tolist() == [4, 3] and stats.act_count["net.0"].tolist() == [8, 6]


class InplaceMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ablation_with_inplace_op_on_the_output_recomputes_it(backend, has_ext):
    """ReLU(inplace=True) right after a Linear changes the output the statistic reads: spurfast
    notices (version counter), warns once and recomputes W x; results equal torch.func's."""
    if backend == "cpp" and not has_ext:
        pytest.skip("compiled extension not built")
    torch.manual_seed(2)
    model = InplaceMLP().double().eval()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    per_sample = _per_sample_grads(model, x, y)
    stats = sf.NeuronStats(model, num_groups=1, backend=backend)
    sf._extension._warned.discard("ablation-inplace-fc1")
    with pytest.warns(RuntimeWarning, match="output of layer .fc1. was modified in place"):
        with stats.record(torch.zeros(7, dtype=torch.long)):
            F.cross_entropy(model(x), y).backward()
    for layer in ("fc1", "fc2"):
        want = -(per_sample[f"{layer}.weight"] * dict(model.named_modules())[layer].weight.detach()).flatten(2).sum(-1)
        assert rel_err(stats.last_ablation[layer], want) < TOL[torch.float32]


def test_margin_objective_ablation_predicts_the_exact_margin_change_of_a_linear_head():
    """For the last layer the margin is piecewise linear in W[c]: the first-order effect of zeroing
    a row is exact as long as the runner-up class does not change."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double().eval()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 4, (9,))
    stats = sf.NeuronStats(model, num_groups=1, loss_reduction="sum")
    with stats.record(torch.zeros(9, dtype=torch.long)):
        sf.margin(model(x), y).sum().backward()
    with torch.no_grad():
        base = sf.margin(model(x), y)
        head = model[2]
        for c in range(4):
            saved = head.weight[c].clone()
            head.weight[c] = 0
            logits = model(x)
            head.weight[c] = saved
            changed = sf.margin(logits, y) - base
            same_runner_up = _runner_up(logits, y) == _runner_up(model(x), y)
            est = stats.last_ablation["2"][:, c].double()
            assert same_runner_up.any()
            assert torch.allclose(est[same_runner_up], changed[same_runner_up], atol=1e-5)


def _runner_up(logits, labels):
    other = logits.clone()
    other[torch.arange(len(labels)), labels] = -float("inf")
    return other.argmax(1)


def test_track_ablation_false_keeps_no_ablation_and_state_dict_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    x, y, ids = torch.randn(6, 4), torch.randint(0, 2, (6,)), torch.tensor([0, 1, 1, 0, 1, 1])
    off = sf.NeuronStats(model, num_groups=2, track_ablation=False)
    with off.record(ids):
        F.cross_entropy(model(x), y).backward()
    assert off.last_ablation == {} and off.ablation_sum == {}
    with pytest.raises(RuntimeError, match="track_ablation=False"):
        off.ablation_mean()
    on = sf.NeuronStats(model, num_groups=2)
    with on.record(ids):
        F.cross_entropy(model(x), y).backward()
    state = on.state_dict()
    assert "ablation_sum.0" in state
    copy_ = sf.NeuronStats(model, num_groups=2)
    copy_.load_state_dict(state)
    assert torch.equal(copy_.ablation_sum["2"], on.ablation_sum["2"])
    del state["ablation_sum.2"]
    with pytest.raises(KeyError, match="ablation_sum.2"):
        copy_.load_state_dict(state)


class TokenLinearTwice(nn.Module):
    """A Linear on 40 tokens per sample (the direct path) called twice, and one called once."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.up = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        return self.head((self.up(x + self.shared(h))).mean(1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_removal_effect_from_products_keeps_no_output_and_matches_torch_func(reduction, has_ext):
    """Linears on many tokens take their removal effect from the backward's per-sample products
    and the weight: no output is held from the forward to the backward, and the statistic is
    torch.func's; a layer called twice (its backward sums per-sample gradients) recomputes W x."""
    if not has_ext:
        pytest.skip("compiled extension not built")
    torch.manual_seed(11)
    model = TokenLinearTwice().double().eval()
    x, y = torch.randn(6, 40, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    ids = torch.tensor([0, 1, 1, 0, 2, 1])
    per_sample = _per_sample_grads(model, x, y)  # of l_n, the statistic's objective under either reduction
    stats = sf.NeuronStats(model, num_groups=3, backend="cpp", loss_reduction=reduction)
    held = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: held.setdefault(name, []).append(o.grad_fn.out))
             for name, m in model.named_children()]
    try:
        with stats.record(ids):
            F.cross_entropy(model(x), y, reduction=reduction).backward()
    finally:
        for h in hooks:
            h.remove()
    assert held["up"] == [None] and all(out is None for out in held["shared"])  # 40 tokens: from products
    assert held["head"][0] is not None  # one token per sample: no products to take it from
    for name, module in model.named_children():
        want = -(per_sample[f"{name}.weight"] * module.weight.detach()).flatten(2).sum(-1)
        assert rel_err(stats.last_ablation[name], want) < TOL[torch.float32], name
        want_sq = per_sample[f"{name}.weight"].flatten(2).square().sum(-1)
        assert rel_err(stats.last_grad_sq[name], want_sq) < TOL[torch.float32], name
