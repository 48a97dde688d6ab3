"""Memorization localization on the embedded SynthWaterbirds benchmark (You et al. 2025, Part I).

For each training seed: train ``SmallCNN`` by ERM (the settings of
``benchmarks/erm_synth_waterbirds.py``, which fit every training group), score every conv
channel with the group-gradient score (one NeuronStats pass), localize the top-k channels
(k = 1, 2, 3; BatchNorm and the final classifier excluded) for each minority group, and
intervene on them (``--modes``: ``random_init`` from N(0, sigma^2) for each of ``--sigmas``,
"init" = the layer's default-init std; ``zero``; ...), 10 seeded draws, against a random-units
control of the same size and layer distribution. Readout: per-group train and test accuracy
change. Also: per-sample TracIn self-influence from the epoch checkpoints and its AUROC for
minority vs majority samples, and with ``--oracle`` every eligible unit zeroed alone, to see
where the units that hurt one minority group (and not the majority) rank by the score.

Claim checked (per minority target group g and k <= 3, means over seeds): re-initialising the
top-k units drops g's accuracy by >= 10 points and by >= 3x both the larger majority-group drop
and the random control's drop of g.

    python benchmarks/memorization_synth.py --modes random_init zero --sigmas init 0.01 0.1 --oracle
                                                            # the committed run (CPU, 2 threads)
    python benchmarks/memorization_synth.py --tiny --out /tmp/m.json   # plumbing check

Models are retrained by default (about a minute per seed on an idle 2-core CPU); ``--cache DIR``
keeps the trained models (final weights + the TracIn checkpoints, ~1 MB per seed) and reuses
them when the training settings match; ``--retrain`` ignores the cache.
Writes JSON (default benchmarks/results/memorization_synth.json), a PNG next to it, and
prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file, save_file  # noqa: E402

from spurfast.data import SynthWaterbirds  # noqa: E402
from spurfast.metrics import evaluate  # noqa: E402
from spurfast.models import MLP, SmallCNN  # noqa: E402
from spurfast.attribution import (  # noqa: E402
    TraceResult, intervene, trace,
    auroc, average_ranks, group_gradient, localize, self_influence, top_samples,
)
from spurfast.train import checkpoint_path, erm, load_checkpoint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "memorization_synth.json"
MAJORITY, MINORITY = (0, 3), (1, 2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=1200)
    p.add_argument("--model", default="small_cnn", choices=["small_cnn", "mlp"])
    p.add_argument("--width", type=int, default=16, help="SmallCNN: channels of the first block")
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 512], help="MLP: hidden widths")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tracin-every", type=int, default=5, help="TracIn checkpoint every this many epochs")
    p.add_argument("--hardest", type=int, default=200, help="samples per group for the group-gradient score")
    p.add_argument("--targets", type=int, nargs="+", default=list(MINORITY), help="minority groups to localize")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--modes", nargs="+", default=["random_init"])
    p.add_argument("--sigmas", nargs="+", default=["init"],
                   help="for random_init/random_noise: 'init' (the layer's default-init std) and/or floats")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--exclude-extra", nargs="*", default=[], help="more layer patterns to exclude")
    p.add_argument("--oracle", action="store_true",
                   help="also zero every eligible unit alone and report where the units that hurt a minority "
                        "group most (and only it) rank by the group-gradient score")
    p.add_argument("--no-self-influence", action="store_true", help="skip the TracIn self-influence part")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=None,
                   help="folder for trained models (final + TracIn checkpoints, ~1 MB per seed); reused when settings match")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--tiny", action="store_true", help="seconds-long plumbing run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.tiny:
        args.n_train, args.n_test, args.epochs, args.width, args.hidden = 200, 80, 2, 4, [16, 16]
        args.seeds, args.repeats, args.tracin_every, args.hardest = args.seeds[:1], 2, 1, 20
        args.cache = None
    args.sigmas = [s if s == "init" else float(s) for s in args.sigmas]
    return args


def train_settings(args):
    keys = ("data_seed", "n_train", "model", "width", "hidden", "epochs", "lr", "optimizer", "lr_schedule", "batch_size", "tracin_every")
    return {k: getattr(args, k) for k in keys}


def lr_at(args, step_fraction: float) -> float:
    if args.lr_schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * step_fraction))
    return args.lr


def tracin_weights(args, epochs):
    """Mean learning rate over the interval each checkpoint stands for (TracIn's eta_t)."""
    weights, prev = [], 0
    for e in epochs:
        fractions = [(prev + (i + 0.5) * (e - prev) / 100) / args.epochs for i in range(100)]
        weights.append(statistics.fmean(lr_at(args, f) for f in fractions) * (e - prev))
        prev = e
    return weights


def build_model(args):
    if args.model == "mlp":
        return MLP(in_features=3 * 32 * 32, hidden=args.hidden, num_classes=2)
    return SmallCNN(num_classes=2, width=args.width).to(memory_format=torch.channels_last)


def get_model(args, seed, train, test):
    """Trained model + TracIn checkpoints (state dicts), from the cache or by training."""
    settings = train_settings(args)
    epochs = list(range(args.tracin_every, args.epochs + 1, args.tracin_every))
    if not epochs or epochs[-1] != args.epochs:
        epochs.append(args.epochs)
    cache_file = None if args.cache is None else args.cache / f"seed{seed}.safetensors"
    model = build_model(args)
    if cache_file is not None and cache_file.exists() and not args.retrain:
        from safetensors import safe_open

        with safe_open(str(cache_file), framework="pt") as f:
            meta = json.loads(f.metadata()["settings"])
        if meta == settings:
            tensors = load_file(str(cache_file))
            ckpts = [{k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"e{e}.")} for e in epochs]
            model.load_state_dict(ckpts[-1])
            return model, ckpts, epochs, {"cached": True, "train_seconds": None}
    torch.manual_seed(seed)
    model = build_model(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        erm(
            model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed,
            optimizer=args.optimizer, lr_schedule=args.lr_schedule, eval_datasets={}, progress=False,
            checkpoint_dir=tmp,
        )
        ckpts = []
        for e in epochs:
            m = build_model(args)
            load_checkpoint(checkpoint_path(tmp, e), m)
            ckpts.append({k: v.clone() for k, v in m.state_dict().items()})
    seconds = time.perf_counter() - started
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"e{e}.{k}": v.contiguous() for e, c in zip(epochs, ckpts) for k, v in c.items()}
        save_file(tensors, str(cache_file), metadata={"settings": json.dumps(settings)})
    model = build_model(args)
    model.load_state_dict(ckpts[-1])
    return model, ckpts, epochs, {"cached": False, "train_seconds": round(seconds, 1)}


def pct(x):
    return None if x is None or x != x else round(100 * x, 2)


def spearman(a, b):
    """Spearman rank correlation of two equal-length sequences (average ranks for ties)."""
    ra, rb = average_ranks(torch.tensor(a)), average_ranks(torch.tensor(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def oracle(args, model, scores, train, exclude, before_train):
    """Zero each eligible unit alone; per minority target, how the score ranks the units that hurt it.

    A unit is *group-specific* for target g when zeroing it alone drops g's training accuracy by
    >= 10 points and by >= 3x the larger majority-group drop (the claim without its random
    control, which a single deterministic ablation has no use for).
    """
    units = localize(scores, k=10**9, group=args.targets[0], exclude=exclude, per_layer=True)  # every eligible unit
    drops = {}
    for unit in units:
        with intervene(model, [unit], "zero"):
            after = evaluate(model, train, num_groups=4, batch_size=2048).group_acc.tolist()
        drops[(unit.layer, unit.channel)] = [100 * (b - a) for b, a in zip(before_train, after)]
    out = {}
    for target in args.targets:
        ranking = [(u.layer, u.channel) for u in localize(scores, k=len(units), group=target, exclude=exclude)]
        rank = {u: i for i, u in enumerate(ranking)}
        specific = sorted(
            (u for u, d in drops.items() if d[target] >= 10 and d[target] >= 3 * max(d[g] for g in MAJORITY)),
            key=lambda u: -drops[u][target],
        )
        out[target] = {
            "units": len(units),
            "group_specific_units": len(specific),
            "best_specific": [{"unit": f"{u[0]}:{u[1]}", "drop": [round(d, 1) for d in drops[u]], "score_rank": rank[u]}
                              for u in specific[:5]],
            "score_top3": [{"unit": f"{u[0]}:{u[1]}", "drop": [round(d, 1) for d in drops[u]]} for u in ranking[:3]],
            "spearman_score_vs_target_drop": spearman(
                [float(scores[u[0]][target, u[1]]) for u in ranking], [drops[u][target] for u in ranking]),
        }
    return out


def self_influence_report(args, model, train, ckpts, weights, localized):
    """Per-sample memorization: TracIn self-influence over the epoch checkpoints, and AUROCs."""
    influence = self_influence(model, train, ckpts, weights)
    final_only = self_influence(model, train)
    minority = (train.group_ids == 1) | (train.group_ids == 2)
    majority = ~minority
    si = {
        "auroc_minority_vs_majority": auroc(influence, minority),
        "auroc_final_checkpoint_only": auroc(final_only, minority),
        "auroc_per_target_vs_majority": {},
        "unit_restricted": {},
    }
    for target in args.targets:
        keep = (train.group_ids == target) | majority
        si["auroc_per_target_vs_majority"][target] = auroc(influence[keep], (train.group_ids == target)[keep])
        units = localized[target][: max(args.ks)]
        restricted = self_influence(model, train, ckpts, weights, units=units)
        tops = top_samples(model, train, units, k=10, checkpoints=ckpts, lrs=weights)
        si["unit_restricted"][target] = {
            "auroc_target_vs_majority": auroc(restricted[keep], (train.group_ids == target)[keep]),
            "top10_fraction_in_target": {
                f"{u[0]}:{u[1]}": float((train.group_ids[tops[tuple(u)][0]] == target).double().mean())
                for u in units
            },
            "top10_fraction_minority": {
                f"{u[0]}:{u[1]}": float(minority[tops[tuple(u)][0]].double().mean()) for u in units
            },
        }
    return si


def run_seed(args, seed, train, test):
    t0 = time.perf_counter()
    model, ckpts, ck_epochs, info = get_model(args, seed, train, test)
    model.eval()
    before = {
        name: evaluate(model, ds, num_groups=4).group_acc.tolist() for name, ds in (("train", train), ("test", test))
    }
    t_score = time.perf_counter()
    scores = group_gradient(model, train, num_groups=4, hardest=args.hardest)
    score_seconds = time.perf_counter() - t_score
    exclude = ("bn", "downsample", "shortcut", "<classifier>") + tuple(args.exclude_extra)
    rows, localized = [], {}
    t_trace = time.perf_counter()
    for target in args.targets:
        units = localize(scores, k=max(args.ks), group=target, exclude=exclude)
        localized[target] = [(u.layer, u.channel) for u in units]
        result = trace(
            model, units, {"train": train, "test": test}, modes=args.modes, sigmas=args.sigmas,
            repeats=args.repeats, ks=args.ks, num_groups=4, seed=1000 * seed, batch_size=2048,
        )
        for r in result.rows:
            rows.append(dict(r, seed=seed, target=target))
    trace_seconds = time.perf_counter() - t_trace
    oracle_result = oracle(args, model, scores, train, exclude, before["train"]) if args.oracle else None

    weights = tracin_weights(args, ck_epochs)
    t_si = time.perf_counter()
    si = None if args.no_self_influence else self_influence_report(args, model, train, ckpts, weights, localized)
    si_seconds = time.perf_counter() - t_si
    return {
        "seed": seed,
        "model": info,
        "tracin_epochs": ck_epochs,
        "tracin_lr_weights": weights,
        "before_group_acc": {k: [pct(a) for a in v] for k, v in before.items()},
        "selected_per_group": [len(scores.extra["selected"][g]) for g in range(4)],
        "localized": {str(t): u for t, u in localized.items()},
        "self_influence": si,
        "oracle": oracle_result,
        "seconds": {
            "total": round(time.perf_counter() - t0, 1), "score": round(score_seconds, 2),
            "trace": round(trace_seconds, 1), "self_influence": round(si_seconds, 1),
        },
    }, rows


def settings_of(rows):
    """The (mode, sigma) settings in ``rows``, in the order they were run."""
    return list(dict.fromkeys((r["mode"], r["sigma"]) for r in rows))


def summarize(args, rows):
    """Per (target, mode, sigma, k, split): means over seeds of the per-seed mean changes (points)."""
    out = []
    for target in args.targets:
        for mode, sigma in settings_of(rows):
            for k in args.ks:
                for split in ("train", "test"):
                    def change(units, group):
                        per_seed = [
                            r["change_mean"] for r in rows
                            if (r["target"], r["mode"], r["sigma"], r["k"], r["split"], r["units"], r["group"])
                            == (target, mode, sigma, k, split, units, group)
                        ]
                        return 100 * statistics.fmean(per_seed), (
                            100 * statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
                        ), [round(100 * c, 2) for c in per_seed]

                    drop_t, std_t, seeds_t = change("selected", target)
                    drop_t = -drop_t
                    maj = {g: -change("selected", g)[0] for g in MAJORITY}
                    other_min = {g: -change("selected", g)[0] for g in MINORITY if g != target}
                    ctrl, ctrl_std, _ = change("random", target)
                    ctrl = -ctrl
                    worst_maj = max(maj.values())
                    out.append({
                        "target": target, "mode": mode, "sigma": sigma, "k": k, "split": split,
                        "target_drop": round(drop_t, 2), "target_drop_std_over_seeds": round(std_t, 2),
                        "target_change_per_seed": seeds_t,
                        "majority_drop": {str(g): round(v, 2) for g, v in maj.items()},
                        "other_minority_drop": {str(g): round(v, 2) for g, v in other_min.items()},
                        "control_target_drop": round(ctrl, 2), "control_std_over_seeds": round(ctrl_std, 2),
                        "claim_met": bool(drop_t >= 10 and drop_t >= 3 * worst_maj and drop_t >= 3 * ctrl),
                    })
    return out


def markdown(summary):
    lines = [
        "| target group | mode | sigma | k | split | target drop (pts, mean ± sd over seeds) | majority drops g0 / g3 "
        "| other minority drop | random-units drop of target | claim met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['target']} | {s['mode']} | {'-' if s['sigma'] is None else s['sigma']} | {s['k']} | {s['split']} | {s['target_drop']:.1f} ± "
            f"{s['target_drop_std_over_seeds']:.1f} | {s['majority_drop']['0']:.1f} / {s['majority_drop']['3']:.1f} | "
            f"{', '.join(f'{v:.1f}' for v in s['other_minority_drop'].values())} | {s['control_target_drop']:.1f} | "
            f"{'yes' if s['claim_met'] else 'no'} |"
        )
    return "\n".join(lines)


def oracle_markdown(args, runs):
    lines = [
        "| seed | target | group-specific units / eligible | best specific units: drops g0/g1/g2/g3 (rank by score) "
        "| score's top-3: target drop each | Spearman(score, target drop) |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        for target in args.targets:
            o = run["oracle"][target]
            best = "; ".join(f"{b['unit']}: {'/'.join(f'{d:.0f}' for d in b['drop'])} (#{b['score_rank'] + 1})"
                             for b in o["best_specific"][:3]) or "none"
            top = ", ".join(f"{t['drop'][target]:.1f}" for t in o["score_top3"])
            lines.append(f"| {run['seed']} | {target} | {o['group_specific_units']} / {o['units']} | {best} | {top} "
                         f"| {o['spearman_score_vs_target_drop']:.2f} |")
    return "\n".join(lines)


def plot(args, rows, path):
    """Train-accuracy change per group vs k, mean over seeds; one panel per (mode, target)."""
    merged = {}
    for r in rows:
        label = r["mode"] if r["sigma"] is None else f"{r['mode']} σ={r['sigma']}"
        key = (f"{label}, top-k of group {r['target']}", r["sigma"], r["k"], r["units"], r["split"], r["group"])
        merged.setdefault(key, []).append(r["change_mean"])
    agg = []
    for (mode, sigma, k, units, split, group), vals in merged.items():
        agg.append({
            "mode": mode, "sigma": sigma, "k": k, "units": units, "split": split, "group": group,
            "change_mean": statistics.fmean(vals), "change_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        })
    return TraceResult(agg).plot(path, x="k", split="train")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train = SynthWaterbirds("train", seed=args.data_seed, n=args.n_train)
    test = SynthWaterbirds("test", seed=args.data_seed, n=args.n_test)
    runs, rows = [], []
    for seed in args.seeds:
        run, seed_rows = run_seed(args, seed, train, test)
        runs.append(run)
        rows += seed_rows
        si = run["self_influence"]
        print(f"seed {seed}: before train {run['before_group_acc']['train']} test {run['before_group_acc']['test']}; "
              f"localized {run['localized']}; self-influence AUROC "
              f"{'-' if si is None else round(si['auroc_minority_vs_majority'], 3)}; {run['seconds']}", flush=True)
    summary = summarize(args, rows)
    table = markdown(summary)
    aurocs = [r["self_influence"]["auroc_minority_vs_majority"] for r in runs if r["self_influence"]]
    si_line = "Self-influence: skipped" if not aurocs else (
        "Self-influence AUROC, minority (groups 1, 2) vs majority (0, 3) training samples: "
               + ", ".join(f"{a:.3f}" for a in aurocs) + f" (mean {statistics.fmean(aurocs):.3f})")
    print(table)
    print(si_line)
    oracle_table = oracle_markdown(args, runs) if args.oracle else None
    if oracle_table:
        print(oracle_table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    try:
        plot(args, rows, png)
    except ImportError as e:
        print(f"no plot: {e}")
        png = None
    result = {
        "benchmark": "memorization_synth",
        "command": "python benchmarks/memorization_synth.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "data": {"train_group_counts": train.group_counts().tolist(), "test_group_counts": test.group_counts().tolist(),
                 "group_names": list(train.group_names)},
        "runs": runs,
        "summary": summary,
        "claim_met_any_k_le_3": {
            f"{t}/{m}{'' if sg is None else f'/sigma={sg}'}/{split}": any(
                s["claim_met"] for s in summary
                if (s["target"], s["mode"], s["sigma"], s["split"]) == (t, m, sg, split) and s["k"] <= 3)
            for t in args.targets for m, sg in settings_of(rows) for split in ("train", "test")
        },
        "self_influence_auroc": {"per_seed": aurocs, "mean": statistics.fmean(aurocs)} if aurocs else None,
        "table_markdown": table,
        "oracle_table_markdown": oracle_table,
        "plot": None if png is None else png.name,
        "trace_rows": rows,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['total_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
