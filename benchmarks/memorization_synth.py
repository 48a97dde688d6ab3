"""Memorization localization on the embedded SynthWaterbirds (You et al. 2025, Part I), over seeds.

A thin caller of :func:`spurfast.experiments.memorization.run_study` (the pipeline of
``spurfast demo``, with several training seeds and a wider setting grid): per seed, ERM with
``SmallCNN``, the group-gradient score, the top-k units of each minority group, interventions
against a random-units control, the exact ablation oracle (``--oracle``) and TracIn
self-influence. Writes ``results.json`` (every number), ``tables.md``, PNG figures and
``report.html`` into ``--out`` (default: a new ``runs/memorization_synth-<time>``).

    python benchmarks/memorization_synth.py --out benchmarks/results/memorization_synth \\
        --modes random_init zero --sigmas init 0.01 0.1 --oracle      # the committed run (CPU, 2 threads)
    python benchmarks/memorization_synth.py --tiny                     # plumbing check, seconds
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spurfast.data.specs import load_data_spec  # noqa: E402
from spurfast.experiments.arguments import add_synth_study_arguments  # noqa: E402
from spurfast.experiments.memorization import STUDY_SCORES, StudyConfig, run_study  # noqa: E402
from spurfast.models import MLP, SmallCNN  # noqa: E402
from spurfast.report.runs import new_run_dir, run_environment  # noqa: E402
from spurfast.report.study import write_study  # noqa: E402
from spurfast.report.tables import all_tables  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_synth_study_arguments(p, modes=["random_init"], sigmas=["init"])
    p.add_argument("--model", default="small_cnn", choices=["small_cnn", "mlp"])
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 512], help="MLP: hidden widths")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--tracin-every", type=int, default=5, help="TracIn checkpoint every this many epochs")
    p.add_argument("--score", default="group_gradient", choices=list(STUDY_SCORES),
                   help="how units are ranked (default: the paper's group-gradient score, which this benchmark measures)")
    p.add_argument("--oracle", action="store_true", help="also zero every eligible unit alone")
    p.add_argument("--no-self-influence", action="store_true", help="skip the TracIn self-influence part")
    args = p.parse_args(argv)
    if args.tiny:
        args.n_train, args.n_test, args.epochs, args.width, args.hidden = 200, 80, 2, 4, [16, 16]
        args.seeds, args.repeats, args.tracin_every, args.hardest = args.seeds[:1], 2, 1, 20
    return args


def main(argv=None):
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = load_data_spec("synth", n_train=args.n_train, n_test=args.n_test, seed=args.data_seed)
    if args.model == "mlp":
        def make_model():
            return MLP(in_features=3 * 32 * 32, hidden=args.hidden, num_classes=2)
    else:
        def make_model():
            return SmallCNN(num_classes=2, width=args.width).to(memory_format=torch.channels_last)
    cfg = StudyConfig(
        seeds=args.seeds, score=args.score, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, lr_schedule=args.lr_schedule,
        batch_size=args.batch_size, tracin_every=args.tracin_every, hardest=args.hardest, ks=args.ks,
        modes=args.modes, sigmas=args.sigmas, repeats=args.repeats, oracle=args.oracle,
        self_influence=not args.no_self_influence,
    )
    out = new_run_dir("memorization_synth", args.out)
    results = run_study(make_model, spec.train, spec.test, cfg, num_groups=spec.num_groups,
                        group_names=spec.group_names, log=lambda s: print(s, flush=True))
    meta = {
        "command": "python benchmarks/memorization_synth.py " + " ".join(argv),
        **run_environment("cpu"),
        "wall seconds": round(time.perf_counter() - started, 1),
    }
    write_study(results, out, title="memorization on SynthWaterbirds, over seeds", train=spec.train, meta=meta)
    for table in all_tables(results):
        print(f"\n{table.title}\n\n{table.to_markdown()}")
    print(f"\nwrote {out} ({meta['wall seconds']} s)")
    return results


if __name__ == "__main__":
    main()
