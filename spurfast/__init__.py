"""spurfast: find which neurons memorize which training examples, at the cost of a training step.

Public API (everything else is internal)::

    import spurfast as sf
    stats = sf.NeuronStats(model, num_groups=4)
    with stats.record(group_ids):
        F.cross_entropy(model(x), y).backward()
"""
from spurfast import losses, ops, optim, rare, train
from spurfast._extension import build_info
from spurfast.capture import NeuronStats
from spurfast.masks import Mask, masked, masked_call
from spurfast.attribution import (
    AblationScores,
    OracleResult,
    ablation_oracle,
    ablation_scores,
    iterative_localize,
    margin,
    memorized_examples,
    verified_localize,
    Intervention,
    TraceResult,
    intervene,
    trace,
    NeuronScores,
    Unit,
    activation_contrast,
    auroc,
    grad_sq_contrast,
    group_gradient,
    group_profile,
    localize,
    magnitude,
    self_influence,
    top_samples,
    unstructured_threshold,
)

__version__ = "0.1.0"
__all__ = [
    "AblationScores",
    "OracleResult",
    "ablation_oracle",
    "ablation_scores",
    "iterative_localize",
    "memorized_examples",
    "verified_localize",
    "Intervention",
    "Mask",
    "NeuronScores",
    "NeuronStats",
    "TraceResult",
    "Unit",
    "activation_contrast",
    "auroc",
    "build_info",
    "grad_sq_contrast",
    "group_gradient",
    "group_profile",
    "intervene",
    "localize",
    "magnitude",
    "margin",
    "masked",
    "masked_call",
    "losses",
    "ops",
    "optim",
    "rare",
    "train",
    "self_influence",
    "top_samples",
    "trace",
    "unstructured_threshold",
    "__version__",
]
