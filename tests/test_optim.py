"""spurfast.optim: the masked optimizers against torch.optim without a mask, the freeze /
update_only contract (frozen rows and all their state bit-identical, no weight decay), the
per-row bias-correction rule against torch.optim.Adam run on a row's own history, element
masks, strict mask validation, and state_dict round trips (also through safetensors checkpoints).

Tolerances: without a mask, max |ours - torch| / max |torch| over 100 steps <= 1e-6 in float32
and 1e-12 in float64 (the same operations in the same order; only rounding differs).
"""
import copy
import io

import pytest
import torch
import torch.nn as nn

from spurfast.optim import MaskedAdam, MaskedAdamW, MaskedSGD

from _helpers import rel_err

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
BACKENDS = ["auto", "torch"]


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 4, 5))
    return model.to(dtype)


def _random_grads(model, gen):
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


CASES = [
    (MaskedSGD, torch.optim.SGD, dict(lr=0.05)),
    (MaskedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    (MaskedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True)),
    (MaskedAdam, torch.optim.Adam, dict(lr=1e-2)),
    (MaskedAdam, torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True, maximize=True)),
    (MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (MaskedAdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1, amsgrad=True)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ours, theirs, kwargs", CASES, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_same_as_torch_without_a_mask(ours, theirs, kwargs, dtype, backend, one_thread):
    model, ref = _model(dtype), _model(dtype)
    opt = ours(model.named_parameters(), backend=backend, **kwargs)
    ref_opt = theirs(ref.parameters(), **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        _random_grads(model, gen)
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p.detach(), q.detach()) <= TOL[dtype]
        for key, value in ref_opt.state[q].items():
            if key == "step":
                assert opt.state[p]["step"].tolist() == [float(value)] * p.shape[0]
            elif isinstance(value, torch.Tensor):
                assert rel_err(opt.state[p][key], value) <= TOL[dtype]


def _snapshot(opt, p):
    state = opt.state[p]
    return [p.detach().clone()] + [state[k].clone() for k in sorted(state) if k != "active"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [
    lambda ps, b: MaskedAdamW(ps, lr=1e-2, weight_decay=0.5, amsgrad=True, backend=b),
    lambda ps, b: MaskedAdam(ps, lr=1e-2, weight_decay=0.5, backend=b),
    lambda ps, b: MaskedSGD(ps, lr=0.1, momentum=0.9, weight_decay=0.5, backend=b),
], ids=["adamw", "adam", "sgd"])
def test_frozen_rows_and_their_state_are_bit_identical(make, backend, one_thread):
    model = _model()
    opt = make(model.named_parameters(), backend)
    gen = torch.Generator().manual_seed(2)
    weight, bias = model[0].weight, model[0].bias
    for step in range(40):
        if step % 10 == 3:  # the mask changes every 10 steps
            rows = torch.rand(6, generator=gen) < 0.5
            opt.freeze({"0.weight": rows, "0.bias": ~rows, "1.weight": rows})
        _random_grads(model, gen)
        if step < 3:
            opt.step()
            continue
        before = {p: _snapshot(opt, p) for p in (weight, bias, model[1].weight)}
        opt.step()
        for p, sel in ((weight, rows), (bias, ~rows), (model[1].weight, rows)):
            for old, new in zip(before[p], _snapshot(opt, p)):
                assert torch.equal(old[sel], new[sel])  # frozen: parameter, state and step count
            if (~sel).any():
                assert not torch.equal(before[p][0][~sel], p.detach()[~sel])


def _row_history_reference(history, lr, betas, weight_decay, grads_of_row, start):
    """torch.optim.AdamW run on one row alone, stepping only where the row was active."""
    row = nn.Parameter(start.clone())
    opt = torch.optim.AdamW([row], lr=lr, betas=betas, weight_decay=weight_decay)
    for active, grad in zip(history, grads_of_row):
        if active:
            row.grad = grad.clone()
            opt.step()
    return row.detach(), opt.state[row]


@pytest.mark.parametrize("backend", BACKENDS)
def test_released_row_gets_the_bias_correction_of_its_own_updates(backend, one_thread):
    """Rows frozen for a while and then released continue as torch.optim.AdamW on their own
    history (the frozen steps left out): per-row step counts."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 6))
    start = weight.detach().clone()
    opt = MaskedAdamW([("w", weight)], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, backend=backend)
    gen = torch.Generator().manual_seed(3)
    history = {c: [] for c in range(4)}
    grads = {c: [] for c in range(4)}
    for step in range(30):
        frozen = torch.tensor([step < 20, 5 <= step < 12, step % 3 == 0, False])
        opt.freeze({"w": frozen}) if frozen.any() else opt.clear_mask()
        weight.grad = torch.randn(4, 6, generator=gen)
        opt.step()
        for c in range(4):
            history[c].append(not bool(frozen[c]))
            grads[c].append(weight.grad[c])
    for c in range(4):
        want, state = _row_history_reference(history[c], 1e-2, (0.9, 0.99), 0.1, grads[c], start[c])
        assert opt.state[weight]["step"][c].item() == float(state["step"]) == sum(history[c])
        assert rel_err(weight.detach()[c], want) <= 1e-6
        assert rel_err(opt.state[weight]["exp_avg"][c], state["exp_avg"]) <= 1e-6
        assert rel_err(opt.state[weight]["exp_avg_sq"][c], state["exp_avg_sq"]) <= 1e-6


def test_sgd_momentum_of_a_released_row_starts_from_its_first_gradient(one_thread):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 2))
    ref = nn.Parameter(weight.detach()[1].clone())
    opt = MaskedSGD([("w", weight)], lr=0.1, momentum=0.9, dampening=0.5)
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, dampening=0.5)
    opt.freeze({"w": torch.tensor([False, True, False])})
    for step in range(8):
        if step == 4:
            opt.clear_mask()
        weight.grad = torch.randn(3, 2)
        opt.step()
        if step >= 4:
            ref.grad = weight.grad[1].clone()
            ref_opt.step()
    assert rel_err(weight.detach()[1], ref.detach()) <= 1e-6
    assert rel_err(opt.state[weight]["momentum_buffer"][1], ref_opt.state[ref]["momentum_buffer"]) <= 1e-6


def test_update_only_freezes_everything_else_and_clear_mask_releases(one_thread):
    model = _model()
    opt = MaskedAdam(model.named_parameters(), lr=1e-2)
    rows = torch.tensor([True, False, True, False, False, False])
    opt.update_only({"0.weight": rows})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _random_grads(model, torch.Generator().manual_seed(4))
    opt.step()
    for name, p in model.named_parameters():
        if name == "0.weight":
            assert not torch.equal(p[rows], before[name][rows]) and torch.equal(p[~rows], before[name][~rows])
            assert opt.state[p]["step"].tolist() == rows.float().tolist()
        else:
            assert torch.equal(p, before[name])
            assert opt.state[p]["step"].sum().item() == 0
    assert opt.update_mask(model[3].weight).tolist() == [False] * 5
    opt.clear_mask()
    assert opt.update_mask(model[0].weight) is None
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_masks_from_spurfast_masks_model_keyword_and_tensor_keys(one_thread):
    masks = pytest.importorskip("spurfast.masks")
    model = _model()
    plain = MaskedSGD(model.parameters(), lr=0.1)  # no names: masks by name need model=
    mask = masks.Mask.from_units(model, [("0", 2), ("3", 4)])
    with pytest.raises(ValueError, match="not built from named_parameters"):
        plain.freeze(mask)
    plain.freeze(mask, model=model)
    assert plain.update_mask(model[0].weight).tolist() == [True, True, False, True, True, True]
    assert plain.update_mask(model[0].bias).tolist() == [True, True, False, True, True, True]
    plain.update_only({model[3].weight: torch.tensor([False, True, False, False, False])})
    assert plain.update_mask(model[3].weight).tolist() == [False, True, False, False, False]
    assert plain.update_mask(model[0].weight).tolist() == [False] * 6
    named = MaskedAdam(model.named_parameters())
    named.freeze(mask)
    assert named.update_mask(model[3].weight).tolist() == [True, True, True, True, False]


def test_mask_errors_name_the_entry_and_change_nothing():
    model = _model()
    opt = MaskedAdam(model.named_parameters(), lr=1e-2)
    opt.freeze({"0.weight": torch.tensor([True] + [False] * 5)})
    saved = copy.deepcopy(opt.state_dict())
    other = nn.Linear(2, 2)
    bad = [
        ({"0.weight": torch.ones(6, dtype=torch.bool), "nope": torch.ones(3, dtype=torch.bool)},
         ValueError, "'nope' is not a parameter name"),
        ({"0.weight": torch.ones(5, dtype=torch.bool)}, ValueError, r"'0.weight' has shape \[5\]; expected \[6\]"),
        ({"0.bias": torch.ones(6)}, ValueError, "'0.bias' must be a bool tensor"),
        ({other.weight: torch.ones(2, dtype=torch.bool)}, ValueError, "is not a parameter of this optimizer"),
        ({3: torch.ones(2, dtype=torch.bool)}, TypeError, "mask keys must be parameter names or tensors"),
        ([1, 2], TypeError, "mask must be a spurfast.masks.Mask or a dict"),
    ]
    for mask, error, message in bad:
        with pytest.raises(error, match=message):
            opt.freeze(mask)
        assert str(opt.state_dict()) == str(saved)
    masks = pytest.importorskip("spurfast.masks")
    wrong = masks.Mask({"3.weight": torch.ones(5, dtype=torch.bool)}, {"3.weight": (5, 7)})
    with pytest.raises(ValueError, match=r"'3.weight' is for shape \[5, 7\]"):
        opt.update_only(wrong)
    assert str(opt.state_dict()) == str(saved)


def test_element_masks_step_per_element_and_fused_backends_reject_them(has_ext, one_thread):
    model = _model()
    weight = model[3].weight
    elements = torch.rand(weight.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    with pytest.raises(ValueError, match="'3.weight' is an element mask.*backend='cpp'"):
        MaskedAdam(model.named_parameters(), backend="cpp").freeze({"3.weight": elements})
    opt = MaskedAdam(model.named_parameters(), lr=1e-2)
    ref_model = copy.deepcopy(model)
    ref = MaskedAdam(ref_model.named_parameters(), lr=1e-2, backend="torch")
    rows = torch.tensor([True, False, True, False, False])
    for o in (opt, ref):  # a row mask given in full shape is compressed to rows
        o.freeze({"3.weight": rows[:, None].expand(weight.shape).clone()})
    assert opt.update_mask(weight).shape == (5,)
    gen = torch.Generator().manual_seed(6)
    for step in range(10):
        if step == 3:
            for o in (opt, ref):
                o.freeze({"3.weight": elements})
        _random_grads(model, gen)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            q.grad = p.grad.clone()
        before = weight.detach().clone()
        opt.step()
        ref.step()
        if step >= 3:
            assert torch.equal(weight[elements], before[elements])
    assert opt.state[weight]["step"].shape == weight.shape
    want_steps = 3.0 * (~rows)[:, None].float() + 7.0 * (~elements).float()  # rows frozen first, then elements
    assert torch.equal(opt.state[weight]["step"], want_steps)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) <= 1e-6


def _train(model, opt, gen, steps, masks):
    for step in range(steps):
        if step in masks:
            mode, mask = masks[step]
            getattr(opt, mode)(mask) if mask is not None else opt.clear_mask()
        _random_grads(model, gen)
        opt.step()


@pytest.mark.parametrize("make", [
    lambda ps: MaskedAdamW(ps, lr=1e-2, amsgrad=True),
    lambda ps: MaskedSGD(ps, lr=0.05, momentum=0.9),
], ids=["adamw", "sgd"])
def test_state_dict_round_trip_mid_training_with_masks(make, one_thread):
    rows = torch.tensor([True, False, False, True, False, True])
    masks = {2: ("freeze", {"0.weight": rows}), 6: ("update_only", {"0.weight": ~rows, "3.bias": rows[:5]})}
    model = _model()
    opt = make(model.named_parameters())
    gen = torch.Generator().manual_seed(7)
    _train(model, opt, gen, 10, masks)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clone = _model(seed=1)
    clone.load_state_dict(saved["model"])
    clone_opt = make(clone.named_parameters())
    clone_opt.load_state_dict(saved["opt"])
    assert torch.equal(clone_opt.update_mask(clone[0].weight), opt.update_mask(model[0].weight))
    gen_a, gen_b = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    later = {3: ("freeze", {"3.weight": rows[:5]}), 7: ("clear_mask", None)}
    _train(model, opt, gen_a, 12, later)
    _train(clone, clone_opt, gen_b, 12, later)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, clone_opt.state[q][key])


def test_checkpoint_round_trip_through_safetensors(tmp_path, one_thread):
    from spurfast.train.checkpoints import load_checkpoint, save_checkpoint

    model = _model()
    opt = MaskedAdam(model.named_parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(9)
    _train(model, opt, gen, 5, {1: ("freeze", {"3.weight": torch.tensor([True, False, True, False, False])})})
    path = save_checkpoint(tmp_path / "ckpt.safetensors", model, opt, epoch=1)
    clone = _model(seed=2)
    clone_opt = MaskedAdam(clone.named_parameters(), lr=0.5)
    load_checkpoint(path, clone, clone_opt)
    assert clone_opt.param_groups[0]["lr"] == 1e-2
    assert clone_opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    for p, q in zip(model.parameters(), clone.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, clone_opt.state[q][key])


def test_loads_a_torch_adam_state_dict(one_thread):
    model, ref = _model(), _model()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(10)
    for _ in range(5):
        _random_grads(ref, gen)
        ref_opt.step()
    model.load_state_dict(ref.state_dict())
    opt = MaskedAdam(model.named_parameters(), lr=1e-2)
    opt.load_state_dict(ref_opt.state_dict())
    assert opt.state[model[0].weight]["step"].tolist() == [5.0] * 6
    for _ in range(5):
        _random_grads(model, gen)
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p.detach(), q.detach()) <= 1e-6


def test_load_state_dict_checks_before_changing_anything():
    model = _model()
    opt = MaskedAdam(model.named_parameters(), lr=1e-2)
    _random_grads(model, torch.Generator().manual_seed(11))
    opt.step()
    good = copy.deepcopy(opt.state_dict())
    before = str(opt.state_dict())
    bad_shape = copy.deepcopy(good)
    bad_shape["state"][0]["exp_avg"] = torch.zeros(3)
    bad_names = copy.deepcopy(good)
    bad_names["param_groups"][0]["param_names"][0] = "other"
    bad_size = copy.deepcopy(good)
    bad_size["param_groups"][0]["params"] = bad_size["param_groups"][0]["params"][:-1]
    for state_dict, message in ((bad_shape, r"\['exp_avg'\] has shape \[3\]"), (bad_names, "names parameter 0 'other'"),
                                (bad_size, "has 5 parameters, the optimizer's 6")):
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(state_dict)
        assert str(opt.state_dict()) == before


def test_bfloat16_parameters_keep_float32_state(has_ext, one_thread):
    model = _model(torch.bfloat16)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2)
    opt.freeze({"3.weight": torch.tensor([True, False, False, False, False])})
    frozen = model[3].weight[0].detach().clone()
    _random_grads(model, torch.Generator().manual_seed(12))
    opt.step()
    state = opt.state[model[3].weight]
    assert state["exp_avg"].dtype == torch.float32 and model[3].weight.dtype == torch.bfloat16
    assert torch.equal(model[3].weight[0], frozen)
    loaded = MaskedAdamW(model.named_parameters())
    loaded.load_state_dict(opt.state_dict())
    assert loaded.state[model[3].weight]["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(loaded.state[model[3].weight]["exp_avg_sq"], state["exp_avg_sq"])


def test_torch_api_compatibility(one_thread):
    model = _model()
    opt = MaskedSGD(model.named_parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(2, 3, 4, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    scheduler.step()
    assert isinstance(loss, torch.Tensor) and opt.param_groups[0]["lr"] == 0.05
    opt.add_param_group({"params": [("extra", nn.Parameter(torch.ones(3)))], "lr": 1.0})
    assert opt.param_groups[1]["param_names"] == ["extra"]
    with pytest.raises(ValueError, match="capturable=True is not supported"):
        MaskedAdam(model.parameters(), capturable=True)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        MaskedSGD(model.parameters(), differentiable=True)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        MaskedAdamW(model.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="complex and integer ones are not supported"):
        MaskedAdam([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="backend must be one of"):
        MaskedAdam(model.parameters(), backend="fast")
    sparse = nn.Parameter(torch.zeros(3, 2))
    sparse_opt = MaskedAdam([sparse])
    sparse.grad = torch.zeros(3, 2).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        sparse_opt.step()
