"""spurfast.attribution.interventions: what each mode writes, bit-exact restoration, seeding, validation."""
import math

import pytest
import torch
import torch.nn as nn

from spurfast import attribution as I
from spurfast.attribution import Unit, unstructured_threshold


def model_and_reference(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3, groups=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3),
    )
    reference = {k: v + 1.0 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    return model, reference


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_exact(model, saved):
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
        # bit-exact also for signed zeros / NaN payloads
        assert torch.equal(v.view(torch.int32) if v.dtype == torch.float32 else v,
                           saved[k].view(torch.int32) if v.dtype == torch.float32 else saved[k]), k


UNITS = [("3", 4), ("0", 1), ("3", 0), ("7", 2)]


def kwargs_for(mode, reference, model):
    if mode in ("random_init", "random_noise"):
        return {"sigma": 0.05}
    if mode in ("rewind", "layer_rewind"):
        return {"reference": reference}
    if mode == "unstructured":
        return {"masks": unstructured_threshold(model, 20.0)}
    return {}


@pytest.mark.parametrize("mode", I.MODES)
@pytest.mark.parametrize("bias", [False, True])
def test_every_mode_changes_weights_and_restores_bit_exactly(mode, bias):
    model, reference = model_and_reference()
    saved = snapshot(model)
    units = None if mode == "unstructured" else UNITS
    with I.intervene(model, units, mode, bias=bias, **kwargs_for(mode, reference, model)) as handle:
        assert handle.active
        changed = snapshot(model)
        assert any(not torch.equal(changed[k], saved[k]) for k in saved)
        assert torch.equal(changed["9.weight"], saved["9.weight"])  # untouched layer
        assert torch.equal(changed["1.running_mean"], saved["1.running_mean"])
    assert not handle.active
    assert_bit_exact(model, saved)


@pytest.mark.parametrize("mode", I.MODES)
def test_restores_after_exception(mode):
    model, reference = model_and_reference()
    saved = snapshot(model)
    units = None if mode == "unstructured" else UNITS
    with pytest.raises(KeyError):
        with I.intervene(model, units, mode, **kwargs_for(mode, reference, model)):
            raise KeyError("boom")
    assert_bit_exact(model, saved)


def test_what_each_mode_writes():
    model, reference = model_and_reference()
    w0, w3 = model[0].weight.detach().clone(), model[3].weight.detach().clone()
    b3 = model[3].bias.detach().clone()
    units = [("3", 4), ("0", 1), ("3", 0)]

    with I.intervene(model, units, "zero"):
        assert (model[3].weight[[0, 4]] == 0).all() and (model[0].weight[1] == 0).all()
        assert torch.equal(model[3].weight[1:4], w3[1:4]) and torch.equal(model[3].bias, b3)

    # draws: CPU generator, layers in module order ("0" then "3"), channels ascending
    gen = torch.Generator().manual_seed(7)
    draw0 = torch.randn((1,) + w0.shape[1:], generator=gen) * 0.1
    draw3 = torch.randn((2,) + w3.shape[1:], generator=gen) * 0.1
    with I.intervene(model, units, "random_init", sigma=0.1, seed=7):
        assert torch.equal(model[0].weight[1:2], draw0)
        assert torch.equal(model[3].weight[[0, 4]], draw3)
    with I.intervene(model, units, "random_noise", sigma=0.1, seed=7):
        assert torch.equal(model[0].weight[1:2], w0[1:2] + draw0)
        assert torch.equal(model[3].weight[[0, 4]], w3[[0, 4]] + draw3)
        assert torch.equal(model[3].weight[1], w3[1])

    with I.intervene(model, units, "rewind", reference=reference, bias=True):
        assert torch.equal(model[3].weight[[0, 4]], reference["3.weight"][[0, 4]])
        assert torch.equal(model[3].bias[[0, 4]], reference["3.bias"][[0, 4]])
        assert torch.equal(model[3].bias[1:4], b3[1:4])
    with I.intervene(model, [("3", 2)], "layer_rewind", reference=reference):
        assert torch.equal(model[3].weight, reference["3.weight"]) and torch.equal(model[3].bias, b3)
        assert torch.equal(model[0].weight, w0)

    masks = unstructured_threshold(model, 10.0)
    assert masks["0"].sum() > 0
    with I.intervene(model, mode="unstructured", masks=masks):
        assert (model[0].weight[masks["0"]] == 0).all()
        assert torch.equal(model[0].weight[~masks["0"]], w0[~masks["0"]])
    with I.intervene(model, mode="unstructured", masks=masks, sigma=0.01, seed=1):
        assert model[0].weight[masks["0"]].abs().max() < 0.1 < w0[masks["0"]].abs().min() * 10
        assert (model[0].weight[masks["0"]] != 0).all()
        assert torch.equal(model[0].weight[~masks["0"]], w0[~masks["0"]])


def test_sigma_init_is_default_init_std():
    model, _ = model_and_reference()
    fan_in = 6 * 3 * 3
    assert I.init_sigma(model[3].weight) == pytest.approx(1 / math.sqrt(3 * fan_in))
    # the default init U(-b, b), b = 1/sqrt(fan_in), has that std
    assert model[3].weight.std().item() == pytest.approx(I.init_sigma(model[3].weight), rel=0.3)
    big = nn.Linear(400, 300)
    with I.intervene(big, [("", c) for c in range(300)], "random_init", sigma="init"):
        assert big.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 400), rel=0.02)


def test_seeds_reproduce_and_unit_order_does_not_matter():
    model, _ = model_and_reference()

    def drawn(units, seed):
        with I.intervene(model, units, "random_init", sigma=0.1, seed=seed):
            return model[0].weight.detach().clone(), model[3].weight.detach().clone()

    a = drawn(UNITS, 3)
    b = drawn(list(reversed(UNITS)) + [UNITS[0]], 3)  # other order, a duplicate
    c = drawn(UNITS, 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])


def test_function_form_and_idempotent_restore():
    model, _ = model_and_reference()
    saved = snapshot(model)
    handle = I.intervene(model, [("7", 0)], "zero")
    assert (model[7].weight[0] == 0).all()
    assert handle.changed == [("7.weight", 5)]
    handle.restore()
    handle.restore()
    assert_bit_exact(model, saved)


def test_validation_errors_change_nothing():
    model, reference = model_and_reference()
    saved = snapshot(model)
    cases = [
        (dict(units=UNITS, mode="melt"), "mode"),
        (dict(units=[("3", 5)], mode="zero"), "out of range"),
        (dict(units=[("0", -1)], mode="zero"), "out of range"),
        (dict(units=[("3", 0), ("conv9", 0)], mode="zero"), "unknown layer"),
        (dict(units=[("3", 1.5)], mode="zero"), "channel must be an int"),
        (dict(units=("3", 1), mode="zero"), "pairs"),
        (dict(units=[], mode="zero"), "empty"),
        (dict(units=UNITS, mode="random_init"), "sigma"),
        (dict(units=UNITS, mode="random_noise", sigma=-1.0), "sigma"),
        (dict(units=UNITS, mode="rewind"), "reference"),
        (dict(units=UNITS, mode="rewind", reference={"0.weight": torch.zeros(1)}), "reference"),
        (dict(units=UNITS, mode="unstructured"), "units"),
        (dict(mode="unstructured", masks={"3": torch.zeros(2, dtype=torch.bool)}), "masks"),
        (dict(mode="unstructured", masks={"zz": torch.zeros(2, dtype=torch.bool)}), "unknown layer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            I.intervene(model, **kwargs)
        assert_bit_exact(model, saved)


def test_random_units_like_matches_layer_distribution():
    model, _ = model_and_reference()
    units = [("3", 4), ("0", 1), ("3", 0)]
    seen = set()
    for seed in range(20):
        control = I.random_units_like(model, units, torch.Generator().manual_seed(seed))
        assert sorted(u.layer for u in control) == ["0", "3", "3"]
        assert not set(control) & {Unit(*u) for u in units}
        assert len(set(control)) == 3
        seen.update(control)
    assert len(seen) > 6  # really random
    again = I.random_units_like(model, units, torch.Generator().manual_seed(5))
    assert again == I.random_units_like(model, units, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="cannot draw"):
        I.random_units_like(model, [("9", 0), ("9", 1)], torch.Generator(), avoid=[("9", 2)])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    model, reference = model_and_reference()
    cuda_model = model_and_reference()[0].cuda()
    saved = snapshot(cuda_model)
    for mode in ("random_init", "random_noise", "rewind", "zero"):
        kwargs = kwargs_for(mode, reference, model)
        with I.intervene(model, UNITS, mode, seed=2, **kwargs):
            cpu_w = model[3].weight.detach().clone()
        with I.intervene(cuda_model, UNITS, mode, seed=2, **kwargs):
            assert torch.equal(cuda_model[3].weight.detach().cpu(), cpu_w)
        assert_bit_exact(cuda_model, saved)
