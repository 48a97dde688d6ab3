"""Localization against the exact oracle: which score finds the units whose removal matters (the
fused first-order ablation statistic, verified and iterative localization, against magnitude, the
group-gradient score and the grad_sq contrast).

A thin caller of :func:`spurfast.experiments.localization.run_localization`, 3 training seeds,
both minority groups. ``--data synth`` (the default): SynthWaterbirds n=2000, SmallCNN width 16,
the ERM settings of ``memorization_synth.py``, the oracle over every unit. ``--data
textured_fashion``: TexturedFashion n=2000 at 64 px, the ImageNet-pretrained EfficientNet-Lite0
fine-tuned with the recipe of ``erm_textured_fashion.py``; its 21,008 units are too many for an
exact oracle over all of them on a CPU, so the oracle covers a pool (each score's top 8, the fast
score's top 32, 128 units drawn uniformly: Spearman over those) on a probe of the training split
(every minority sample, 100 per majority group), and only the verified units get the full trace.
Writes ``localization_<data>.json`` and the tables ``localization_<data>.md`` into ``--out``
(default: a new ``runs/localization_<data>-<time>``).

    python benchmarks/localization.py --out benchmarks/results      # the committed synthetic run (CPU, 2 threads)
    python benchmarks/localization.py --data textured_fashion --out benchmarks/results
    python benchmarks/localization.py --tiny                        # plumbing check, seconds
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spurfast.data.specs import load_data_spec  # noqa: E402
from spurfast.experiments.arguments import add_synth_study_arguments  # noqa: E402
from spurfast.experiments.erm_study import ERMRecipe, build_model  # noqa: E402
from spurfast.experiments.localization import SCORES, LocalizationConfig, run_localization  # noqa: E402
from spurfast.experiments.memorization import StudyConfig  # noqa: E402
from spurfast.models import SmallCNN  # noqa: E402
from spurfast.report.runs import new_run_dir, run_environment  # noqa: E402
from spurfast.report.study import json_safe  # noqa: E402
from spurfast.report.localization import localization_tables  # noqa: E402


#: --data textured_fashion: what differs from the synthetic defaults (see the docstring).
TEXTURED_DEFAULTS = dict(epochs=20, lr=1e-3, n_test=600, repeats=3, sigmas=["init"], candidates=32,
                         pool_top=8, pool_random=128, probe_majority=100, image_size=64,
                         scores=["magnitude", "group_gradient", "grad_sq_contrast", "ablation_margin_mean",
                                 "ablation_margin_flip_rate", "ablation_margin_flip_rate_x1.5", "verified"],
                         full_trace=["verified"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=["synth", "textured_fashion"], default="synth")
    add_synth_study_arguments(p, modes=["zero", "random_init"], sigmas=["0.01", "init"])
    p.add_argument("--candidates", type=int, default=64, help="units the verified localization checks exactly")
    p.add_argument("--scores", nargs="+", default=list(SCORES), choices=list(SCORES))
    p.add_argument("--pool-top", type=int, default=None,
                   help="oracle over a pool (each score's top N, ...) instead of every unit")
    p.add_argument("--pool-random", type=int, default=0, help="with --pool-top: units drawn uniformly for Spearman")
    p.add_argument("--probe-majority", type=int, default=None,
                   help="scores and oracle on every minority sample and this many per majority group")
    p.add_argument("--full-trace", nargs="+", default=None, choices=list(SCORES),
                   help="scores traced over every mode and k (default all; the others: k=1 zero)")
    p.add_argument("--image-size", type=int, default=64, help="textured_fashion: image side (multiple of 32)")
    known, _ = p.parse_known_args(argv)
    if known.data == "textured_fashion":
        p.set_defaults(**TEXTURED_DEFAULTS)
    args = p.parse_args(argv)
    if args.tiny:
        args.n_train, args.n_test, args.epochs, args.width = 200, 80, 2, 8
        args.seeds, args.repeats, args.hardest, args.candidates = args.seeds[:1], 2, 20, 8
        if args.data == "textured_fashion":
            args.n_train, args.image_size, args.epochs, args.pool_top, args.pool_random = 120, 32, 1, 3, 8
            args.probe_majority = 20
    return args


def make_model_factory(args):
    if args.data == "synth":
        return lambda: SmallCNN(num_classes=2, width=args.width).to(memory_format=torch.channels_last)
    recipe = ERMRecipe("efficientnet_lite0", epochs=args.epochs, lr=args.lr, optimizer="adam", pretrained=True,
                       normalization="imagenet", batch_size=args.batch_size)
    return lambda: build_model(recipe)


def main(argv=None):
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = load_data_spec(args.data, n_train=args.n_train, n_test=args.n_test, seed=args.data_seed,
                          image_size=args.image_size if args.data == "textured_fashion" else None)
    study = StudyConfig(seeds=args.seeds, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                        hardest=args.hardest, ks=args.ks, modes=args.modes, sigmas=args.sigmas,
                        repeats=args.repeats, oracle=True, self_influence=False)
    cfg = LocalizationConfig(study=study, candidates=args.candidates, scores=args.scores, pool_top=args.pool_top,
                             pool_random=args.pool_random, probe_majority=args.probe_majority,
                             full_trace=args.full_trace)
    name = f"localization_{args.data}"
    out = new_run_dir(name, args.out)
    results = run_localization(make_model_factory(args), spec.train, spec.test, cfg, num_groups=spec.num_groups,
                               group_names=spec.group_names, log=lambda s: print(s, flush=True))
    results["meta"] = {
        "command": "python benchmarks/localization.py " + " ".join(argv),
        "data": args.data, "model": "SmallCNN" if args.data == "synth" else "efficientnet_lite0 (ImageNet-pretrained)",
        **run_environment("cpu"),
        "wall seconds": round(time.perf_counter() - started, 1),
    }
    (out / f"{name}.json").write_text(json.dumps(json_safe(results), indent=1, allow_nan=False) + "\n")
    tables = localization_tables(results)
    (out / f"{name}.md").write_text("\n\n".join(f"### {t.title}\n\n{t.to_markdown()}" for t in tables) + "\n")
    for table in tables:
        print(f"\n{table.title}\n\n{table.to_markdown()}")
    print(f"\nwrote {out} ({results['meta']['wall seconds']} s)")
    return results


if __name__ == "__main__":
    main()
