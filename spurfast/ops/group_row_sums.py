"""Per-group float64 sums of the rows of a per-sample table ``[B, C]``.

``NeuronStats`` folds every batch's per-sample tables (``grad_sq``, the ablation effect) into
running per-group sums kept in float64. In plain torch that is a float64 copy of the table
and an ``index_add_``: three passes over ``[B, C]`` (the copy's read and write, the add's
read). The ``cpp`` kernel (``csrc/group_row_sums.cpp``) reads the table once and adds it into
a ``[G, C]`` result small enough to stay in cache. A non-finite value in a group's rows
leaves that group's sum non-finite, so the sums also serve as the batch's finiteness check.
On CUDA the torch form runs (``index_add_`` is one kernel there).
"""
from __future__ import annotations

import torch

from spurfast._extension import require_extension
from spurfast.ops._common import check_floating, check_group_ids, resolve_backend
from spurfast.ops._library import lib, register_fake

lib.define("group_row_sums(Tensor values, Tensor group_ids, int num_groups) -> Tensor")


def _group_row_sums_cpu(values, group_ids, num_groups):
    return require_extension("cpp").group_row_sums(values, group_ids, num_groups)


def _group_row_sums_cuda(values, group_ids, num_groups):
    return group_row_sums_reference(values, group_ids, num_groups)


lib.impl("group_row_sums", _group_row_sums_cpu, "CPU")
lib.impl("group_row_sums", _group_row_sums_cuda, "CUDA")


@register_fake("spurfast::group_row_sums")
def _group_row_sums_fake(values, group_ids, num_groups):
    return values.new_empty((num_groups, values.shape[1]), dtype=torch.float64)


def group_row_sums_reference(values: torch.Tensor, group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The definition: ``out[g] = sum of values[n] over n with group_ids[n] == g``, float64 ``[G, C]``."""
    out = torch.zeros(num_groups, values.shape[1], dtype=torch.float64, device=values.device)
    return out.index_add_(0, group_ids, values.double())


def group_row_sums(
    values: torch.Tensor, group_ids: torch.Tensor, num_groups: int, *, backend: str = "auto", check_inputs: bool = True
) -> torch.Tensor:
    """Per-group sums ``[G, C]`` (float64) of the rows of ``values [B, C]``.

    Args:
        values: a floating table with one row per sample.
        group_ids: ``[B]`` integer group of each row, in ``[0, num_groups)``.
        num_groups: number of groups G (empty groups sum to 0).
        backend: ``"auto"``, ``"torch"`` or ``"cpp"`` (CPU); Triton has no kernel of its own
            here and runs the torch form.
        check_inputs: check the ids' range in Python first (the cpp kernel checks it anyway).

    Example::

        >>> import torch, spurfast
        >>> values, ids = torch.arange(8.).reshape(4, 2), torch.tensor([1, 0, 1, 1])
        >>> spurfast.ops.group_row_sums(values, ids, 3)
        tensor([[ 2.,  3.],
                [10., 13.],
                [ 0.,  0.]], dtype=torch.float64)
    """
    check_floating(values, "values")
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [B, C], got shape {list(values.shape)}")
    group_ids = check_group_ids(group_ids, values.shape[0], num_groups, check_range=check_inputs).to(values.device)
    # float64 tables use the kernel too: the sums are float64 either way
    backend = resolve_backend(backend, values.device, torch.float32 if backend == "auto" else values.dtype)
    if backend == "cpp" and values.dtype in (torch.float32, torch.float64):
        return torch.ops.spurfast.group_row_sums(values, group_ids, num_groups)
    return group_row_sums_reference(values, group_ids, num_groups)
