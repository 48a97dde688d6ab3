"""Training: the ERM baseline, the dense/masked framework of You et al. (2025), DFR, and checkpoints."""
from spurfast.train.checkpoints import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from spurfast.train.dfr import dfr, fit_dfr, fit_logistic_regression, last_layer_features
from spurfast.train.erm import epoch_seed, erm, make_optimizer
from spurfast.train.example_tied import ExampleTiedDropout
from spurfast.train.silent_majority import (
    dense_masked_step,
    features_and_logits,
    find_classifier,
    gradient_stats,
    mask_path,
    refresh_mask,
    silent_majority,
)

__all__ = [
    "erm", "make_optimizer", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_path", "epoch_seed",
    "silent_majority", "dense_masked_step", "refresh_mask", "features_and_logits", "find_classifier", "gradient_stats",
    "mask_path", "dfr", "fit_dfr", "fit_logistic_regression", "last_layer_features", "ExampleTiedDropout",
]
