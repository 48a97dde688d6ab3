"""Attribution: which neurons memorize which groups, which samples they hold, and what touching them does.

* :mod:`~spurfast.attribution.scores` -- per-neuron scores from ``NeuronStats`` passes.
* :mod:`~spurfast.attribution.localize` -- the top-k units of a score.
* :mod:`~spurfast.attribution.interventions` -- zero / re-initialise / rewind units, restored bit-exactly.
* :mod:`~spurfast.attribution.trace` -- per-group accuracy before and after, against a random control.
* :mod:`~spurfast.attribution.influence` -- per-sample TracIn self-influence.
"""
from spurfast.attribution.influence import self_influence, top_samples
from spurfast.attribution.interventions import MODES, Intervention, init_sigma, intervene, random_units_like
from spurfast.attribution.localize import localize
from spurfast.attribution.scores import (
    CLASSIFIER,
    CONTRASTS,
    DEFAULT_EXCLUDE,
    GroupProfile,
    NeuronScores,
    Unit,
    activation_contrast,
    auroc,
    average_ranks,
    grad_sq_contrast,
    group_gradient,
    group_profile,
    magnitude,
    unstructured_threshold,
)
from spurfast.attribution.trace import TraceResult, trace

__all__ = [
    "CLASSIFIER", "CONTRASTS", "DEFAULT_EXCLUDE", "GroupProfile", "Intervention", "MODES", "NeuronScores",
    "TraceResult", "Unit", "activation_contrast", "auroc", "average_ranks", "grad_sq_contrast", "group_gradient",
    "group_profile", "init_sigma", "intervene", "localize", "magnitude", "random_units_like", "self_influence",
    "top_samples", "trace", "unstructured_threshold",
]
