"""The methods a scoring pass is timed against, each as ``setup(model, x, y, group_ids,
backend) -> (step, check)``: ``step()`` runs one timed iteration (its per-sample norms
included) and leaves no gradient state behind; ``check()`` runs one iteration and returns
``{layer name: grad_sq [B, C]}`` (None for ``plain``).

Every method reports ``||d l_n / d W[c]||^2`` for the sample's own loss term ``l_n`` of a
mean-reduced cross-entropy, so per-sample gradients of the mean are multiplied by B.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from spurfast.bench.models import MissingDependency, import_optional, tracked_layers

NUM_GROUPS = 4
ALL_METHODS = ("spurfast", "spurfast_nogroup", "plain", "opacus", "func", "backpack", "backpack_fx")
# The package each peer needs, so that a missing one is reported as skipped before any work.
PEER_MODULES = {"opacus": "opacus", "backpack": "backpack", "backpack_fx": "backpack"}


def missing_peer(method: str) -> Optional[str]:
    """Why ``method`` cannot run here (its package is not importable), or None."""
    module = PEER_MODULES.get(method)
    if module is None:
        return None
    try:
        import_optional(module)
    except MissingDependency as exc:
        return str(exc)
    return None


def _row_sq_norms(per_sample_grad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """[B, C, ...] per-sample gradients -> [B, C] squared row norms, times scale**2."""
    grad_sq = per_sample_grad.flatten(2).float().square().sum(-1)
    return grad_sq * (scale * scale) if scale != 1.0 else grad_sq


def setup_plain(model, x, y, group_ids, backend):
    def step():
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def check():
        step()
        return None

    return step, check


def setup_spurfast(model, x, y, group_ids, backend, track_group_grad: bool = True):
    import spurfast

    stats = spurfast.NeuronStats(model, num_groups=NUM_GROUPS, backend=backend, track_group_grad=track_group_grad)
    expected = [n for n, _ in tracked_layers(model)]
    if stats.layer_names != expected:
        raise RuntimeError(f"spurfast tracks {stats.layer_names}, the benchmark expects {expected}")

    def step():
        with stats.record(group_ids):
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def check():
        step()
        return dict(stats.last_grad_sq)

    step.stats = stats  # the benchmark reports the statistics' own memory
    return step, check


def setup_spurfast_nogroup(model, x, y, group_ids, backend):
    """spurfast without ``group_grad`` (the per-group weight-gradient sums): grad_sq, activation
    statistics and the removal effect only."""
    return setup_spurfast(model, x, y, group_ids, backend, track_group_grad=False)


def setup_opacus(model, x, y, group_ids, backend):
    GradSampleModule = import_optional("opacus").GradSampleModule
    layers = tracked_layers(model)
    # Opacus records activations only for modules in training mode; Linear/Conv compute
    # the same in either mode, so only they are switched (BatchNorm/Dropout stay in eval).
    for _, m in layers:
        m.train()
    # loss_reduction="mean": Opacus multiplies the backpropagated gradient by B, so
    # grad_sample[n] is already the gradient of l_n (checked against torch.func in the tests).
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")

    def run():
        F.cross_entropy(gsm(x), y).backward()
        grad_sq = {n: _row_sq_norms(m.weight.grad_sample) for n, m in layers}
        gsm.zero_grad(set_to_none=True)  # also drops grad_sample
        return grad_sq

    return run, run


def setup_func(model, x, y, group_ids, backend):
    from torch.func import functional_call, grad, vmap

    layers = tracked_layers(model)
    params = {f"{n}.weight": m.weight.detach() for n, m in layers}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    frozen.update(dict(model.named_buffers()))

    def sample_loss(p, xn, yn):
        out = functional_call(model, (p, frozen), (xn.unsqueeze(0),))
        return F.cross_entropy(out, yn.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def run():
        grads = per_sample_grad(params, x, y)
        return {n: _row_sq_norms(grads[f"{n}.weight"]) for n, _ in layers}

    return run, run


def setup_backpack(model, x, y, group_ids, backend, use_converter: bool = False):
    backpack_module = import_optional("backpack")
    BatchGrad = import_optional("backpack.extensions").BatchGrad
    layers = tracked_layers(model)
    # The converter returns a GraphModule that calls the same modules and parameters.
    model = backpack_module.extend(model, use_converter=use_converter)
    batch = x.shape[0]

    def run():
        loss = F.cross_entropy(model(x), y)
        with backpack_module.backpack(BatchGrad()):
            loss.backward()
        # grad_batch holds the per-sample gradients of the *mean* loss, l_n / B.
        grad_sq = {n: _row_sq_norms(m.weight.grad_batch, scale=float(batch)) for n, m in layers}
        for _, m in layers:
            del m.weight.grad_batch
        model.zero_grad(set_to_none=True)
        return grad_sq

    return run, run


def setup_backpack_fx(model, x, y, group_ids, backend):
    """BackPACK after its torch.fx rewrite of the graph, which makes residual networks work."""
    return setup_backpack(model, x, y, group_ids, backend, use_converter=True)


Setup = Callable[..., Tuple[Callable[[], object], Callable[[], Optional[Dict[str, torch.Tensor]]]]]
SETUPS: Dict[str, Setup] = {
    "spurfast": setup_spurfast,
    "spurfast_nogroup": setup_spurfast_nogroup,
    "plain": setup_plain,
    "opacus": setup_opacus,
    "func": setup_func,
    "backpack": setup_backpack,
    "backpack_fx": setup_backpack_fx,
}
