"""Attribution: which neurons memorize which groups, which samples they hold, and what touching them does.

* :mod:`~spurfast.attribution.scores` -- per-neuron scores from ``NeuronStats`` passes.
* :mod:`~spurfast.attribution.objectives` -- the margin and the loss, per sample.
* :mod:`~spurfast.attribution.ablation` -- first-order ablation scores from one ``NeuronStats`` pass.
* :mod:`~spurfast.attribution.oracle` -- the exact ablation oracle, many units per forward.
* :mod:`~spurfast.attribution.localize` -- the top-k units of a score.
* :mod:`~spurfast.attribution.verify` -- localization verified by the oracle, iterative localization,
  the samples each unit holds.
* :mod:`~spurfast.attribution.interventions` -- zero / re-initialise / rewind units, restored bit-exactly.
* :mod:`~spurfast.attribution.trace` -- per-group accuracy before and after, against a random control.
* :mod:`~spurfast.attribution.influence` -- per-sample TracIn self-influence.
"""
from spurfast.attribution.ablation import AblationScores, FirstOrderEffects, ablation_scores, first_order_effects
from spurfast.attribution.influence import self_influence, top_samples
from spurfast.attribution.interventions import MODES, Intervention, init_sigma, intervene, random_units_like
from spurfast.attribution.localize import localize, rank_all
from spurfast.attribution.objectives import OBJECTIVES, margin
from spurfast.attribution.oracle import ORACLE_MODES, OracleResult, ablation_oracle, evaluate_variants
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
from spurfast.attribution.verify import (
    FAST_SCORES,
    MemorizedExamples,
    VerifiedLocalization,
    fast_score,
    iterative_localize,
    memorized_examples,
    verified_localize,
)

__all__ = [
    "AblationScores", "FAST_SCORES", "FirstOrderEffects", "MemorizedExamples", "OBJECTIVES", "ORACLE_MODES",
    "OracleResult", "VerifiedLocalization", "ablation_oracle", "ablation_scores", "evaluate_variants", "fast_score",
    "first_order_effects", "iterative_localize", "margin", "memorized_examples", "rank_all", "verified_localize",
    "CLASSIFIER", "CONTRASTS", "DEFAULT_EXCLUDE", "GroupProfile", "Intervention", "MODES", "NeuronScores",
    "TraceResult", "Unit", "activation_contrast", "auroc", "average_ranks", "grad_sq_contrast", "group_gradient",
    "group_profile", "init_sigma", "intervene", "localize", "magnitude", "random_units_like", "self_influence",
    "top_samples", "trace", "unstructured_threshold",
]
