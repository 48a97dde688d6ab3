"""Localization against the exact oracle on the embedded SynthWaterbirds: which score finds the units
whose removal matters (the fused first-order ablation statistic, verified and iterative
localization, against magnitude, the group-gradient score and the grad_sq contrast).

A thin caller of :func:`spurfast.experiments.localization.run_localization`: the README's setting
(SynthWaterbirds n=2000, SmallCNN width 16, the ERM settings of ``memorization_synth.py``),
3 training seeds, both minority groups. Writes ``localization_synth.json`` and the tables
``localization_synth.md`` into ``--out`` (default: a new ``runs/localization_synth-<time>``).

    python benchmarks/localization.py --out benchmarks/results      # the committed run (CPU, 2 threads)
    python benchmarks/localization.py --tiny                        # plumbing check, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spurfast.data.specs import load_data_spec  # noqa: E402
from spurfast.experiments.arguments import add_synth_study_arguments  # noqa: E402
from spurfast.experiments.localization import SCORES, LocalizationConfig, run_localization  # noqa: E402
from spurfast.experiments.memorization import StudyConfig  # noqa: E402
from spurfast.models import SmallCNN  # noqa: E402
from spurfast.report.runs import new_run_dir  # noqa: E402
from spurfast.report.study import json_safe  # noqa: E402
from spurfast.report.localization import localization_tables  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_synth_study_arguments(p, modes=["zero", "random_init"], sigmas=["0.01", "init"])
    p.add_argument("--candidates", type=int, default=64, help="units the verified localization checks exactly")
    p.add_argument("--scores", nargs="+", default=list(SCORES), choices=list(SCORES))
    args = p.parse_args(argv)
    if args.tiny:
        args.n_train, args.n_test, args.epochs, args.width = 200, 80, 2, 8
        args.seeds, args.repeats, args.hardest, args.candidates = args.seeds[:1], 2, 20, 8
    return args


def main(argv=None):
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = load_data_spec("synth", n_train=args.n_train, n_test=args.n_test, seed=args.data_seed)

    def make_model():
        return SmallCNN(num_classes=2, width=args.width).to(memory_format=torch.channels_last)

    study = StudyConfig(seeds=args.seeds, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                        hardest=args.hardest, ks=args.ks, modes=args.modes, sigmas=args.sigmas,
                        repeats=args.repeats, oracle=True, self_influence=False)
    cfg = LocalizationConfig(study=study, candidates=args.candidates, scores=args.scores)
    out = new_run_dir("localization_synth", args.out)
    results = run_localization(make_model, spec.train, spec.test, cfg, num_groups=spec.num_groups,
                               group_names=spec.group_names, log=lambda s: print(s, flush=True))
    results["meta"] = {
        "command": "python benchmarks/localization.py " + " ".join(argv),
        "torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "wall seconds": round(time.perf_counter() - started, 1),
    }
    (out / "localization_synth.json").write_text(json.dumps(json_safe(results), indent=1, allow_nan=False) + "\n")
    tables = localization_tables(results)
    (out / "localization_synth.md").write_text("\n\n".join(f"### {t.title}\n\n{t.to_markdown()}" for t in tables) + "\n")
    for table in tables:
        print(f"\n{table.title}\n\n{table.to_markdown()}")
    print(f"\nwrote {out} ({results['meta']['wall seconds']} s)")
    return results


if __name__ == "__main__":
    main()
