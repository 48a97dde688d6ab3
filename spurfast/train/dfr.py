"""Deep feature reweighting (DFR, Kirichenko, Izmailov and Wilson 2023): retrain only the last layer.

The feature extractor stays frozen; the final linear layer is refit by L2-regularised
multinomial logistic regression on the penultimate features of **group-balanced** held-out
data (a validation split with group labels), averaged over several balanced subsamples.
A reference point for group-robust methods: it uses the held-out set's group labels, which
ERM and the dense/masked framework do not.

* :func:`last_layer_features` -- ``(features [N, D], labels [N], group_ids [N])`` in eval mode.
* :func:`fit_logistic_regression` -- full-batch L-BFGS in float64, sklearn's objective
  ``0.5 * ||W||^2 + C * sum_i CE_i`` (the bias is not penalised).
* :func:`fit_dfr` -- features standardised with the held-out set's mean and std, then
  ``n_subsamples`` balanced subsamples (every group cut to the smallest group's count, drawn
  without replacement from a seeded generator), one fit each, weights averaged and mapped back
  to the raw features.
* :func:`dfr` -- all of it on a model: returns a copy whose classifier holds the new weights.

The setting is fixed and documented, not tuned: ``C = 1.0`` (sklearn's default) and 10
subsamples. The DFR paper tunes an L1 penalty's ``C`` on half of the validation set; we do
not (no choice here looks at any test number), and we use L2 so that the fit is smooth.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from spurfast.metrics import _as_batches
from spurfast.train.silent_majority import features_and_logits, find_classifier

__all__ = ["last_layer_features", "fit_logistic_regression", "fit_dfr", "dfr"]


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} of shape {list(t.shape)}"
    return type(t).__name__


@torch.no_grad()
def last_layer_features(
    model: nn.Module,
    data,
    *,
    classifier: Optional[Union[str, nn.Module]] = None,
    batch_size: int = 512,
    device: Union[str, torch.device, None] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features [N, D] float32, labels [N] int64, group_ids [N] int64)`` on the CPU: the
    classifier layer's input (:func:`~spurfast.train.silent_majority.features_and_logits`) for
    every sample of ``data``, in order, in eval mode (the modes are restored).

    ``data``: a dataset of ``(image, label, group_id)``, a DataLoader of such batches, or an
    ``(images, labels, group_ids)`` tuple, as for :func:`spurfast.metrics.evaluate`.

    Example:
        >>> from spurfast.data import SynthWaterbirds
        >>> from spurfast.models import SmallCNN
        >>> val = SynthWaterbirds("val", n=8)
        >>> features, labels, groups = last_layer_features(SmallCNN(width=4), val)
        >>> features.shape, torch.equal(groups, val.group_ids)
        (torch.Size([8, 16]), True)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _, module = find_classifier(model, classifier)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    feats, labels, groups = [], [], []
    try:
        for images, y, g in _as_batches(data, batch_size):
            f, _ = features_and_logits(model, images.to(device), module)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
            groups.append(torch.as_tensor(g).long().cpu())
    finally:
        for m, flag in modes.items():
            m.training = flag
    if not feats:
        raise ValueError("data is empty")
    return torch.cat(feats), torch.cat(labels), torch.cat(groups)


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    C: float = 1.0,
    max_iter: int = 500,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``argmin 0.5 * ||W||^2 + C * sum_i CE(W x_i + b, y_i)``.

    Full-batch L-BFGS (strong-Wolfe line search) in float64 from zero, with the gradient in
    closed form; deterministic. The objective is sklearn's ``LogisticRegression(C=C)`` one (bias
    unpenalised), divided by ``C * N`` for conditioning (the same minimiser); it stops when the
    largest gradient entry of that scaled objective is below 1e-9, or after ``max_iter`` iterations.

    Args:
        features: ``[N, D]`` floats. labels: ``[N]`` integers in ``[0, num_classes)``.
        num_classes: ``K``; C: inverse regularisation strength (> 0); max_iter: L-BFGS iterations.

    Returns:
        ``(weight [K, D], bias [K])``, float64.

    Example:
        >>> x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
        >>> w, b = fit_logistic_regression(x, torch.tensor([0, 0, 1, 1]), 2)
        >>> (x.double() @ w.t() + b).argmax(1).tolist()
        [0, 0, 1, 1]
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features must be a float tensor [N, D], got {_describe(features)}")
    n = features.shape[0]
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor [{n}], got {_describe(labels)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if n == 0 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be non-empty and lie in [0, {num_classes})")
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not (math.isfinite(C) and C > 0):
        raise ValueError(f"C must be a finite number > 0, got {C!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    x = features.detach().double().cpu()  # [N, D]
    y = labels.detach().long().cpu()
    targets = F.one_hot(y, num_classes).double()  # [N, K]
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    bias = torch.zeros(num_classes, dtype=torch.float64)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")
    penalty = 0.5 / (float(C) * n)

    @torch.no_grad()
    def closure():
        # The objective and its gradient in closed form: cheaper than autograd for one small GEMM.
        logits = x @ weight.t() + bias  # [N, K]
        log_probs = logits.log_softmax(dim=1)
        loss = -(targets * log_probs).sum() / n + penalty * weight.square().sum()
        residual = (log_probs.exp() - targets) / n  # [N, K] dLoss/dlogits
        weight.grad = residual.t() @ x + 2 * penalty * weight
        bias.grad = residual.sum(0)
        return loss

    optimizer.step(closure)
    return weight, bias


def fit_dfr(
    features: torch.Tensor,
    labels: torch.Tensor,
    group_ids: torch.Tensor,
    num_classes: int,
    *,
    C: float = 1.0,
    n_subsamples: int = 10,
    seed: int = 0,
    standardize: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DFR's last layer from held-out features: ``(weight [K, D], bias [K])`` float64 on raw features.

    Features are standardised with the mean and std of all of ``features`` (``standardize``; a
    constant feature keeps scale 1). Each of ``n_subsamples`` subsamples takes, from every group
    present, as many samples as the smallest group has (without replacement; subsample ``i``
    draws from ``torch.Generator().manual_seed(seed * 1_000_003 + i)``), and is fit by
    :func:`fit_logistic_regression` with ``C``; the weights and biases are averaged, then mapped
    back so that ``features @ weight.T + bias`` gives the averaged model's logits.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> labels = torch.arange(40) % 2
        >>> features = torch.randn(40, 3, generator=gen) + 3 * labels[:, None]
        >>> w, b = fit_dfr(features, labels, labels, 2, n_subsamples=3)
        >>> ((features.double() @ w.t() + b).argmax(1) == labels).float().mean().item()
        1.0
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"features must be a tensor [N, D], got {_describe(features)}")
    n = features.shape[0]
    for name, t in (("labels", labels), ("group_ids", group_ids)):
        if not isinstance(t, torch.Tensor) or t.shape != (n,) or t.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor [{n}], got {_describe(t)}")
    if isinstance(n_subsamples, bool) or not isinstance(n_subsamples, int) or n_subsamples < 1:
        raise ValueError(f"n_subsamples must be a positive int, got {n_subsamples!r}")
    if n == 0:
        raise ValueError("features is empty")
    x = features.detach().double().cpu()
    y, g = labels.long().cpu(), group_ids.long().cpu()
    if standardize:
        mean, std = x.mean(0), x.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
    else:
        mean, std = torch.zeros(x.shape[1], dtype=torch.float64), torch.ones(x.shape[1], dtype=torch.float64)
    z = (x - mean) / std  # [N, D]
    present = torch.unique(g)
    per_group = min(int((g == k).sum()) for k in present)
    weight_sum = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    bias_sum = torch.zeros(num_classes, dtype=torch.float64)
    for i in range(n_subsamples):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
        chosen = []
        for k in present.tolist():
            members = torch.nonzero(g == k).flatten()
            chosen.append(members[torch.randperm(members.numel(), generator=gen)[:per_group]])
        idx = torch.cat(chosen)
        w, b = fit_logistic_regression(z[idx], y[idx], num_classes, C=C)
        weight_sum += w
        bias_sum += b
    w_std, b_std = weight_sum / n_subsamples, bias_sum / n_subsamples
    weight = w_std / std  # [K, D], acting on raw features
    bias = b_std - weight @ mean
    return weight, bias


def dfr(
    model: nn.Module,
    data,
    *,
    num_classes: Optional[int] = None,
    classifier: Optional[Union[str, nn.Module]] = None,
    C: float = 1.0,
    n_subsamples: int = 10,
    seed: int = 0,
    standardize: bool = True,
    batch_size: int = 512,
    device: Union[str, torch.device, None] = None,
    inplace: bool = False,
) -> nn.Module:
    """DFR on ``model``: refit its classifier layer on the group-balanced held-out ``data``.

    Features come from :func:`last_layer_features` (eval mode), the new layer from
    :func:`fit_dfr` (``C``, ``n_subsamples``, ``seed``, ``standardize``). Returns a deep copy of
    ``model`` whose classifier (an ``nn.Linear`` with a bias, :func:`find_classifier`) holds the new
    weight and bias; ``model`` itself is left unchanged (its modes restored), unless
    ``inplace=True``, when ``model``'s classifier is overwritten and ``model`` is returned.

    Args:
        model: a trained classifier.
        data: held-out samples with group labels (e.g. a validation split), a dataset of
            ``(image, label, group_id)`` or an ``(images, labels, group_ids)`` tuple.
        num_classes: defaults to the classifier's ``out_features``.

    Example:
        >>> from spurfast.data import SynthWaterbirds
        >>> from spurfast.models import SmallCNN
        >>> model = SmallCNN(width=4)
        >>> retrained = dfr(model, SynthWaterbirds("val", n=40), n_subsamples=2)
        >>> retrained is not model, torch.equal(retrained.features.conv1.weight, model.features.conv1.weight)
        (True, True)
    """
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not (math.isfinite(C) and C > 0):
        raise ValueError(f"C must be a finite number > 0, got {C!r}")
    if isinstance(n_subsamples, bool) or not isinstance(n_subsamples, int) or n_subsamples < 1:
        raise ValueError(f"n_subsamples must be a positive int, got {n_subsamples!r}")
    name, module = find_classifier(model, classifier)
    if not isinstance(module, nn.Linear) or module.bias is None:
        raise ValueError(f"classifier {name!r} must be an nn.Linear with a bias, got {module!r}")
    if num_classes is None:
        num_classes = module.out_features
    if num_classes != module.out_features:
        raise ValueError(f"num_classes ({num_classes}) must equal the classifier's out_features "
                         f"({module.out_features})")
    features, labels, group_ids = last_layer_features(model, data, classifier=module, batch_size=batch_size,
                                                      device=device)
    if features.shape[1] != module.in_features:
        raise ValueError(f"the classifier's input has {features.shape[1]} features, its weight {module.in_features}")
    weight, bias = fit_dfr(features, labels, group_ids, num_classes, C=C, n_subsamples=n_subsamples, seed=seed,
                           standardize=standardize)
    target = model if inplace else copy.deepcopy(model)
    layer = target.get_submodule(name)
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        layer.bias.copy_(bias.to(layer.bias.dtype))
    return target
