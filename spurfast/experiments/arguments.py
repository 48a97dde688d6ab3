"""Command-line arguments shared by the study benchmarks on the embedded SynthWaterbirds."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence


def add_synth_training_arguments(p: argparse.ArgumentParser) -> None:
    """Seeds, data size, SmallCNN width and the ERM settings of the synthetic benchmarks."""
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=1200)
    p.add_argument("--width", type=int, default=16, help="SmallCNN: channels of the first block")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)


def add_synth_study_arguments(p: argparse.ArgumentParser, *, modes: Sequence[str], sigmas: Sequence[str]) -> None:
    """:func:`add_synth_training_arguments`, the intervention grid, threads and ``--out``."""
    add_synth_training_arguments(p)
    p.add_argument("--hardest", type=int, default=200, help="samples per group for the group-gradient score")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--modes", nargs="+", default=list(modes))
    p.add_argument("--sigmas", nargs="+", default=list(sigmas),
                   help="for random_init/random_noise: 'init' (the layer's default-init std) and/or floats")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="seconds-long plumbing run")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: a new run folder)")
