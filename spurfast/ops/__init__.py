"""Op level: fused statistics kernels with their plain-torch references.

Each op takes a ``backend`` (``"auto"``, ``"torch"``, ``"cpp"``, ...) and is also registered as
a ``torch.ops.spurfast.*`` custom op with a fake impl. The masked optimizer steps behind
:mod:`spurfast.optim` live here too.
"""
from spurfast.ops.ablation_stats import ablation_stats, ablation_stats_reference
from spurfast.ops.activation_stats import activation_stats, activation_stats_reference, merge_group_moments
from spurfast.ops.conv_grad_stats import conv2d_grad_stats_reference, conv_grad_stats, conv_grad_stats_reference
from spurfast.ops.group_grad import DeferredGroupGrad, accumulate_group_grad, accumulate_group_grad_reference
from spurfast.ops.group_row_sums import group_row_sums, group_row_sums_reference
from spurfast.ops.linear_grad_stats import (
    linear_grad_stats,
    linear_grad_stats_reference,
    linear_grad_stats_with_ablation,
    linear_grad_stats_with_ablation_reference,
)
from spurfast.ops.masked_step import (
    masked_adam_step,
    masked_adam_step_reference,
    masked_sgd_step,
    masked_sgd_step_reference,
)

__all__ = [
    "DeferredGroupGrad",
    "ablation_stats",
    "ablation_stats_reference",
    "activation_stats",
    "activation_stats_reference",
    "conv2d_grad_stats_reference",
    "conv_grad_stats",
    "conv_grad_stats_reference",
    "accumulate_group_grad",
    "accumulate_group_grad_reference",
    "group_row_sums",
    "group_row_sums_reference",
    "linear_grad_stats",
    "linear_grad_stats_reference",
    "linear_grad_stats_with_ablation",
    "linear_grad_stats_with_ablation_reference",
    "masked_adam_step",
    "masked_adam_step_reference",
    "masked_sgd_step",
    "masked_sgd_step_reference",
    "merge_group_moments",
]
