"""spurfast.train.dfr: the logistic regression's optimality, balanced subsamples, the mapping back
from standardised features, and DFR on a model (a copy; the user's model untouched)."""
import copy
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spurfast.data import SynthWaterbirds
from spurfast.metrics import evaluate
from spurfast.models import SmallCNN
from spurfast.train.dfr import dfr, fit_dfr, fit_logistic_regression, last_layer_features

# the module, not spurfast.train.dfr the function that shadows it as an attribute of spurfast.train
dfr_module = importlib.import_module("spurfast.train.dfr")

pytestmark = pytest.mark.usefixtures("one_thread")


def _objective(weight, bias, x, y, C):
    """sklearn's objective, 0.5 ||W||^2 + C sum_i CE_i, in float64."""
    return 0.5 * weight.square().sum() + C * F.cross_entropy(x @ weight.t() + bias, y, reduction="sum")


@pytest.mark.parametrize("num_classes,C", [(2, 1.0), (3, 0.1), (2, 10.0)])
def test_logistic_regression_is_the_minimiser(num_classes, C):
    gen = torch.Generator().manual_seed(num_classes)
    x = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (60,), generator=gen)
    weight, bias = fit_logistic_regression(x, y, num_classes, C=C)
    assert weight.shape == (num_classes, 5) and bias.shape == (num_classes,) and weight.dtype == torch.float64
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    value = _objective(w, b, x, y, C)
    gw, gb = torch.autograd.grad(value, (w, b))
    # the objective is strictly convex in W and the (unpenalised) logit differences: a zero
    # gradient means the minimiser
    scale = float(value.detach())
    assert gw.abs().max() < 1e-6 * max(1.0, scale) and gb.abs().max() < 1e-6 * max(1.0, scale)
    for _ in range(5):  # and nearby points are worse
        dw = 1e-3 * torch.randn(weight.shape, generator=gen, dtype=torch.float64)
        assert _objective(weight + dw, bias, x, y, C) > value


def test_logistic_regression_regularisation_shrinks_weights():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=gen)
    y = (x[:, 0] > 0).long()
    strong, _ = fit_logistic_regression(x, y, 2, C=0.01)
    weak, _ = fit_logistic_regression(x, y, 2, C=100.0)
    assert strong.norm() < weak.norm()


def test_logistic_regression_rejects_bad_inputs():
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="features"):
        fit_logistic_regression(x[0], y, 2)
    with pytest.raises(ValueError, match="labels"):
        fit_logistic_regression(x, y.float(), 2)
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        fit_logistic_regression(x, y + 1, 2)
    with pytest.raises(ValueError, match="C must be"):
        fit_logistic_regression(x, y, 2, C=0)
    with pytest.raises(ValueError, match="num_classes"):
        fit_logistic_regression(x, y, 1)


def test_fit_dfr_uses_balanced_subsamples(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    groups = torch.tensor([0] * 30 + [1] * 5 + [2] * 8 + [3] * 20)
    labels = groups // 2
    features = torch.randn(groups.numel(), 4, generator=gen)
    seen = []
    real_fit = dfr_module.fit_logistic_regression

    def spy(x, y, num_classes, C):
        seen.append(x.clone())
        return real_fit(x, y, num_classes, C=C)

    monkeypatch.setattr(dfr_module, "fit_logistic_regression", spy)
    weight, bias = fit_dfr(features, labels, groups, 2, n_subsamples=4, seed=1)
    assert len(seen) == 4 and all(x.shape == (4 * 5, 4) for x in seen)  # 5 = the smallest group's count
    # all 5 samples of group 1 are in every subsample; the larger groups are subsampled
    # differently each time
    assert not all(torch.equal(seen[0], x) for x in seen[1:])
    seen.clear()
    again = fit_dfr(features, labels, groups, 2, n_subsamples=4, seed=1)
    assert torch.equal(again[0], weight) and torch.equal(again[1], bias)  # deterministic in seed
    seen.clear()
    other = fit_dfr(features, labels, groups, 2, n_subsamples=4, seed=2)
    assert not torch.equal(other[0], weight)


def test_fit_dfr_maps_standardised_weights_back_to_raw_features():
    # Balanced groups, one subsample = the whole set: the result must be the logistic regression
    # of the standardised features, expressed on the raw ones.
    gen = torch.Generator().manual_seed(3)
    groups = torch.arange(40) % 4
    labels = groups // 2
    features = torch.randn(40, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1],
                                                                                      dtype=torch.float64) + 5
    features[:, 2] = 1.5  # a constant feature keeps scale 1
    weight, bias = fit_dfr(features, labels, groups, 2, n_subsamples=1)
    mean, std = features.mean(0), features.std(0, unbiased=False)
    std[2] = 1.0
    w_std, b_std = fit_logistic_regression((features - mean) / std, labels, 2)
    torch.testing.assert_close(features @ weight.t() + bias, ((features - mean) / std) @ w_std.t() + b_std,
                               rtol=1e-6, atol=1e-6)


class _TwoFeatureModel(nn.Module):
    """Input [core, spurious] passed through as the features; a linear classifier on top."""

    def __init__(self):
        super().__init__()
        self.body = nn.Identity()
        self.classifier = nn.Linear(2, 2)

    def forward(self, x):
        return self.classifier(self.body(x))


def _spurious_toy(n_per_group, seed):
    """Groups 2y + a; the core feature is y + noise (weak), the spurious one is a (clean)."""
    gen = torch.Generator().manual_seed(seed)
    groups = torch.arange(4).repeat_interleave(n_per_group)
    y, a = groups // 2, groups % 2
    core = (2 * y - 1).double() + 0.8 * torch.randn(groups.numel(), generator=gen, dtype=torch.float64)
    spurious = (2 * a - 1).double() + 0.1 * torch.randn(groups.numel(), generator=gen, dtype=torch.float64)
    return torch.stack([core, spurious], 1).float(), y, groups


def test_dfr_fixes_a_classifier_that_uses_the_spurious_feature():
    model = _TwoFeatureModel()
    with torch.no_grad():  # the "ERM" classifier: reads the background only
        model.classifier.weight.copy_(torch.tensor([[0.0, -3.0], [0.0, 3.0]]))
        model.classifier.bias.zero_()
    val, test = _spurious_toy(50, 0), _spurious_toy(200, 1)
    before = evaluate(model, test, num_groups=4)
    snapshot = copy.deepcopy(model.state_dict())
    retrained = dfr(model, val, n_subsamples=3)
    after = evaluate(retrained, test, num_groups=4)
    assert before.worst_group_acc < 0.05 and after.worst_group_acc > 0.75
    w = retrained.classifier.weight.detach()
    assert (w[1, 0] - w[0, 0]).abs() > 3 * (w[1, 1] - w[0, 1]).abs()  # it now reads the core feature
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_dfr_on_a_cnn_changes_only_the_classifier_of_a_copy():
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    model.train()
    model.features.bn1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    val = SynthWaterbirds("val", seed=0, n=40)
    retrained = dfr(model, val, n_subsamples=2)
    assert retrained is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and not model.features.bn1.training and model.features.bn2.training
    changed = [k for k, v in retrained.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["classifier.weight", "classifier.bias"]
    assert all(not m._forward_pre_hooks for m in model.modules())
    features, labels, groups = last_layer_features(model, val)
    assert torch.equal(labels, val.labels) and torch.equal(groups, val.group_ids)
    inplace = dfr(model, val, n_subsamples=2, inplace=True)
    assert inplace is model and torch.equal(model.classifier.weight, retrained.classifier.weight)


def test_dfr_rejects_bad_arguments():
    val = SynthWaterbirds("val", seed=0, n=8)
    model = SmallCNN(width=4)
    model.classifier = nn.Linear(16, 2, bias=False)
    with pytest.raises(ValueError, match="with a bias"):
        dfr(model, val)
    with pytest.raises(ValueError, match="C must be"):
        dfr(SmallCNN(width=4), val, C=-1.0)
    with pytest.raises(ValueError, match="n_subsamples"):
        dfr(SmallCNN(width=4), val, n_subsamples=0)
    with pytest.raises(ValueError, match="num_classes"):
        dfr(SmallCNN(width=4), val, num_classes=3)
