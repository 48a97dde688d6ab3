"""NeuronStats on a torch.compile'd model: the user's layer names and the eager statistics."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spurfast as sf


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 10), nn.GELU(), nn.Linear(10, 3),
    ).eval()


def _run(model, steps=3):
    stats = sf.NeuronStats(model, num_groups=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        with stats.record(torch.arange(8) % 2):
            F.cross_entropy(model(x), y).backward()
    tables = {f"{t}[{n}]": v.clone() for t in ("last_grad_sq", "grad_sq_sum", "group_grad", "act_mean",
                                                "ablation_sum") for n, v in getattr(stats, t).items()}
    return stats, tables


@pytest.mark.parametrize("compile_backend", ["eager", "inductor"])
def test_compiled_model_gives_the_eager_statistics_under_the_users_names(compile_backend, has_ext):
    torch._dynamo.reset()
    eager_model = _model()
    stats, want = _run(eager_model)
    compiled_model = _model()
    compiled = torch.compile(compiled_model, backend=compile_backend)
    compiled_stats, got = _run(compiled)
    assert compiled_stats.layer_names == stats.layer_names == ["0", "5", "7"]
    assert set(got) == set(want)
    for key, table in got.items():  # inductor may reorder float32 sums in the untracked ops between layers
        torch.testing.assert_close(table, want[key], rtol=1e-4, atol=1e-6, msg=key)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):  # the step's .grad is the eager one
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    assert all("forward" not in vars(m) for m in compiled_model.modules())  # nothing left behind


def test_a_compiled_submodule_keeps_its_name(has_ext):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    model[0] = torch.compile(model[0], backend="eager")
    stats = sf.NeuronStats(model, num_groups=1, layers=["0", "2"])
    assert stats.layer_names == ["0", "2"]
    with stats.record(torch.zeros(3, dtype=torch.long)):
        model(torch.randn(3, 4)).sum().backward()
    assert stats.last_grad_sq["0"].shape == (3, 5)
