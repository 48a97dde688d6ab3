"""The rare-pattern studies as one command: options, configs, the run and the time estimate.

Shared by ``benchmarks/rare_spurious.py`` and ``spurfast rare`` so that both take the same
options and run the same studies:

* :func:`add_rare_arguments` -- ``--data``, ``--models``, ``--ns``, ``--patterns``, ``--seeds``,
  ``--epochs``, ``--n-train``, ... ``--tiny``, ``--estimate``, ``--out``.
* :func:`configs_from_args` -- one :class:`~spurfast.experiments.rare.RareStudyConfig` per
  (dataset, model): each ``--data`` with each ``--models`` (default: Fashion-MNIST with the MLP
  and SmallCNN, SynthWaterbirds with SmallCNN, the README experiment).
* :func:`run_studies`, :func:`estimate_studies`, :func:`format_estimate`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from spurfast.experiments.rare import (
    DATASETS, DEFAULT_MODELS, MODELS, RareStudyConfig, estimate_seconds, run_rare_study, tiny_config,
)
from spurfast.rare.patterns import PATTERNS

__all__ = ["TWO_THREAD_SPEEDUP", "add_rare_arguments", "configs_from_args", "run_studies", "estimate_studies",
           "format_estimate"]

#: Speed-up of 2 threads over 1 assumed when a 1-thread estimate is converted.
TWO_THREAD_SPEEDUP = 1.6


def add_rare_arguments(p: argparse.ArgumentParser, *, threads_help: str = "torch CPU threads") -> None:
    """The options of the rare-pattern studies (``None`` defaults take each study's own)."""
    p.add_argument("--data", nargs="+", choices=DATASETS, default=list(DATASETS),
                   help="datasets, one study per (dataset, model) (default: fashion synth)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=None,
                   help="models for every dataset (default: mlp and small_cnn on fashion, small_cnn on synth)")
    p.add_argument("--ns", type=int, nargs="+", default=None, help="poisoned images per run; 0 is the clean control "
                   "(default 0 1 3 10 30 100)")
    p.add_argument("--patterns", nargs="+", choices=PATTERNS, default=None, help="default S1 S3 R3")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    p.add_argument("--epochs", type=int, default=None,
                   help="ERM epochs (default per study: fashion mlp 20, fashion small_cnn 8, synth small_cnn 20)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default fashion 10000, synth 2000)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default 2000)")
    p.add_argument("--target-class", type=int, default=None, help="the poisoned class (default fashion 0, synth 1)")
    p.add_argument("--lr", type=float, default=None, help="Adam rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128")
    p.add_argument("--deletion-epochs", type=int, default=None,
                   help="incremental retraining epochs (default: --epochs)")
    p.add_argument("--influence-depth", type=int, default=None, help="LiSSA depth (default mlp 1000, small_cnn 200)")
    p.add_argument("--influence-repeats", type=int, default=None, help="LiSSA repeats (default 1)")
    p.add_argument("--no-localization", action="store_true", help="skip the localization stage")
    p.add_argument("--no-deletion", action="store_true", help="skip the deletion stage")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data subset")
    p.add_argument("--threads", type=int, default=None, help=threads_help)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tiny", action="store_true", help="seconds-long plumbing run (one seed, one pattern, n in 0 3)")
    p.add_argument("--estimate", action="store_true", help="time one piece of every stage, print the expected run time")
    p.add_argument("--progress", action="store_true", help="progress bars of every epoch")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: a new runs/rare-<time>)")


#: Option -> config field, for the options that are passed on only when given.
_FIELDS = {"ns": "ns", "patterns": "patterns", "seeds": "seeds", "epochs": "epochs", "n_train": "n_train",
           "n_test": "n_test", "target_class": "target_class", "lr": "lr", "batch_size": "batch_size",
           "deletion_epochs": "deletion_epochs", "influence_depth": "influence_depth",
           "influence_repeats": "influence_repeats"}


def configs_from_args(args: argparse.Namespace) -> List[RareStudyConfig]:
    """One config per (dataset, model); raises ``ValueError`` (naming the field) on bad values.

    Example:
        >>> p = argparse.ArgumentParser(); add_rare_arguments(p)
        >>> [(c.data, c.model, c.epochs) for c in configs_from_args(p.parse_args([]))]
        [('fashion', 'mlp', 20), ('fashion', 'small_cnn', 8), ('synth', 'small_cnn', 20)]
        >>> configs_from_args(p.parse_args(["--data", "synth", "--models", "mlp", "--tiny"]))[0].ns
        (0, 3)
    """
    overrides: Dict[str, Any] = {}
    for option, field in _FIELDS.items():
        value = getattr(args, option, None)
        if value is not None:
            overrides[field] = tuple(value) if isinstance(value, list) else value
    configs = []
    for data in dict.fromkeys(args.data):
        for model in dict.fromkeys(args.models or DEFAULT_MODELS[data]):
            cfg = RareStudyConfig(data, model, data_seed=args.data_seed, device=args.device,
                                  localization=not args.no_localization, deletion=not args.no_deletion, **overrides)
            configs.append(tiny_config(cfg) if args.tiny else cfg)
    return configs


def run_studies(configs: Sequence[RareStudyConfig], *, progress: bool = False,
                log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """``{"studies": [run_rare_study(cfg) per config], "seconds"}``."""
    started = time.perf_counter()
    studies = [run_rare_study(cfg, progress=progress, log=log) for cfg in configs]
    return {"studies": studies, "seconds": time.perf_counter() - started}


def estimate_studies(configs: Sequence[RareStudyConfig]) -> Dict[str, Any]:
    """Every config's :func:`~spurfast.experiments.rare.estimate_seconds` and their total."""
    estimates = [estimate_seconds(cfg) for cfg in configs]
    return {"studies": estimates, "expected_seconds": round(sum(e["expected_seconds"] for e in estimates), 1)}


def format_estimate(estimate: Dict[str, Any]) -> str:
    """Lines for the terminal: per study, the timed pieces and the expected time; then the total
    (and, when timed at 1 thread, the total at 2 threads with :data:`TWO_THREAD_SPEEDUP`)."""
    lines = []
    for e in estimate["studies"]:
        lines.append(f"{e['data']}/{e['model']}: {e['trained_models']} trained models, pieces (s) "
                     f"{e['pieces_seconds']}; expected {e['expected_seconds'] / 60:.1f} min at "
                     f"{e['threads']} thread(s)")
    total = estimate["expected_seconds"]
    threads = {e["threads"] for e in estimate["studies"]}
    counts = ", ".join(map(str, sorted(threads)))
    line = f"expected full run: {total:.0f} s ({total / 60:.1f} min) at {counts} thread(s)"
    if threads == {1}:
        line += f"; about {total / TWO_THREAD_SPEEDUP / 60:.1f} min at 2 threads (/{TWO_THREAD_SPEEDUP})"
    return "\n".join(lines + [line])
