"""Rare spurious correlations (Yang et al., 2022): a pattern on a few images of one class, and its deletion.

* :mod:`~spurfast.rare.patterns` -- the S1-S3/R1-R3 patterns and user patterns, their l2 norms,
  a poisoned dataset (:func:`poison`) and the spurious score.
* :mod:`~spurfast.rare.influence` -- Hessian-vector products, LiSSA, and group-influence deletion
  of the poisoned images with the removed set's gradient from :class:`spurfast.NeuronStats`.
* :mod:`~spurfast.rare.localize` -- where the pattern sits: the units whose first-order removal
  lowers the target probability of patterned copies more than of the clean images, and the
  exact check (the spurious score with the top units zeroed, against random units).
"""
from spurfast.rare.influence import HVP_METHODS, group_influence, hvp, lissa
from spurfast.rare.patterns import (
    PATTERNS,
    Pattern,
    PatternedDataset,
    add_pattern,
    make_pattern,
    pattern_l2,
    poison,
    spurious_score,
    spurious_score_per_image,
)

from spurfast.rare.localize import PATTERN_OBJECTIVES, pattern_units, zero_units_effect

__all__ = [
    "PATTERNS", "Pattern", "PatternedDataset", "add_pattern", "make_pattern", "pattern_l2", "poison",
    "spurious_score", "spurious_score_per_image",
    "HVP_METHODS", "group_influence", "hvp", "lissa",
    "PATTERN_OBJECTIVES", "pattern_units", "zero_units_effect",
]
