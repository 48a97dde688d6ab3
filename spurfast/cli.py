"""The ``spurfast`` command (also ``python -m spurfast``).

    spurfast demo [--quick]                   the whole study on the embedded SynthWaterbirds
    spurfast localize --data D --model M      the same study on your data and model
    spurfast bench [--device cuda]            scoring throughput against Opacus, torch.func, BackPACK
    spurfast rare [--tiny | --estimate]       rare spurious patterns: score vs n, localization, deletion
    spurfast info                             which backends work here, and why not
    spurfast build [--force]                  compile the C++ extension ahead of time

Every command that writes results writes them to a new folder under ``runs/`` unless given ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional

EXAMPLES = """examples:
  spurfast demo --quick                       # about two minutes on a 2-core CPU
  spurfast demo --out runs/demo --seed 1      # the full demo, into runs/demo
  spurfast localize --data synth --model small_cnn --epochs 20
  spurfast localize --data waterbirds:/data/waterbird_complete95_forest2water2 --model resnet18 \\
      --checkpoint erm.safetensors --image-size 224 --device cuda
  spurfast localize --data csv:/data/mine/images.csv --model small_cnn --image-size 64
  spurfast bench --device cuda --out runs/bench-h200
  spurfast rare --data synth --models small_cnn --seeds 0
  spurfast info
"""

# The demo's two settings: the same data and model (which fit every training group, so there is
# memorization to find); --quick draws fewer interventions, keeps fewer TracIn checkpoints,
# fine-tunes fewer framework variants for fewer epochs and poisons with one pattern at one n
# (20 epochs: in 10 the SmallCNN does not pick up S3 from 30 images). "framework": the "ERM vs framework"
# section (see spurfast.experiments.framework_study), fine-tuned from the demo's ERM model.
# "rare": the "rare patterns" section, RareStudyConfig fields of a one-seed SynthWaterbirds study
# (spurfast.experiments.rare) without the deletion stage.
DEMO_PRESETS: Dict[str, Dict[str, object]] = {
    "default": {
        "n_train": 2000, "n_test": 1200, "width": 16,
        "study": {"epochs": 30, "tracin_every": 5, "hardest": 200, "ks": (1, 2, 3), "modes": ("zero", "random_init"),
                  "sigmas": ("init", 0.01), "repeats": 10, "oracle": True},
        "framework": {"n_val": 600, "epochs": 21, "variants": ("features", "softmax", "logits")},
        "rare": {"ns": (0, 3, 30), "patterns": ("S3", "R3"), "epochs": 20, "localize_images": 500,
                 "ks": (1, 2, 4, 8, 16)},
    },
    "quick": {
        "n_train": 2000, "n_test": 1200, "width": 16,
        "study": {"epochs": 30, "tracin_every": 10, "hardest": 200, "ks": (1, 2), "modes": ("zero", "random_init"),
                  "sigmas": ("init",), "repeats": 3, "oracle": True},
        "framework": {"n_val": 600, "epochs": 10, "variants": ("features", "logits")},
        "rare": {"ns": (0, 30), "patterns": ("S3",), "epochs": 20, "localize_images": 500, "ks": (1, 2, 4, 8)},
    },
}


class CLIError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


def _log(message: str) -> None:
    print(f"spurfast: {message}", file=sys.stderr, flush=True)


def resolve_device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is visible to torch (use --device cpu)")
    return name


def _set_threads(threads: Optional[int]) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise CLIError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _meta(args, device: str, started: float) -> Dict[str, object]:
    import torch

    import spurfast

    info = spurfast.build_info()
    return {
        "command": "spurfast " + " ".join(args.argv),
        "spurfast": spurfast.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "cpp backend": "available" if info["backends"]["cpp"]["available"] else info["backends"]["cpp"]["reason"],
        "wall seconds": round(time.perf_counter() - started, 1),
    }


def _study_config(study: Dict[str, object], args, device: str):
    from spurfast.experiments.memorization import StudyConfig

    settings = dict(study)
    for key in ("epochs", "repeats"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    if getattr(args, "no_oracle", False):
        settings["oracle"] = False
    if getattr(args, "no_self_influence", False):
        settings["self_influence"] = False
    if getattr(args, "minority", None):
        settings["minority"] = args.minority
    if getattr(args, "score", None) is not None:
        settings["score"] = args.score
    return StudyConfig(seeds=args.seeds, device=device, **settings)


def _finish(results, out_dir, args, device, started, title, train, intro) -> int:
    from spurfast.report.study import write_study
    from spurfast.report.tables import summary_table

    paths = write_study(results, out_dir, title=title, train=train, meta=_meta(args, device, started), intro=intro)
    print(summary_table(results).to_markdown())
    print(f"\nresults: {paths['results']}\nreport:  {paths['report']}  ({time.perf_counter() - started:.0f} s)")
    return 0


def cmd_demo(args) -> int:
    import torch

    from spurfast.data.specs import load_data_spec, load_val_split
    from spurfast.experiments.memorization import run_study
    from spurfast.models import SmallCNN
    from spurfast.report.runs import new_run_dir

    started = time.perf_counter()
    device = resolve_device(args.device)
    _set_threads(args.threads)
    preset = DEMO_PRESETS["quick" if args.quick else "default"]
    args.seeds = [args.seed]
    cfg = _study_config(preset["study"], args, device)
    try:
        spec = load_data_spec(args.data, n_train=preset["n_train"], n_test=preset["n_test"], seed=args.data_seed)
    except (ImportError, OSError) as exc:  # a package or a data file of textured_fashion is missing
        raise CLIError(f"--data {args.data}: {exc}") from None
    width = preset["width"]
    data_name = type(spec.train).__name__

    def make_model():
        return SmallCNN(num_classes=2, width=width).to(memory_format=torch.channels_last)

    framework = None if args.no_framework else preset["framework"]
    val = None if framework is None else load_val_split(args.data, framework["n_val"], seed=args.data_seed)
    out_dir = new_run_dir("demo", args.out)
    _log(f"{'quick ' if args.quick else ''}demo: {data_name} ({len(spec.train)} train, groups "
         f"{spec.train.group_counts().tolist()}; {len(spec.test)} test), SmallCNN(width={width}), "
         f"{cfg.epochs} epochs of ERM, seed {args.seed}, on {device}; writing to {out_dir}")
    trained = {}

    def keep(seed, model, info):  # the ERM model, for the framework section after the analysis
        trained.update(model=copy.deepcopy(model), **info)

    results = run_study(make_model, spec.train, spec.test, cfg, num_groups=spec.num_groups,
                        group_names=spec.group_names, progress=not args.no_progress, log=_log,
                        on_trained=keep if framework is not None else None)
    if framework is not None:
        results["framework"] = _framework_section(framework, cfg, width, trained, spec, val, args.seed, device,
                                                  progress=not args.no_progress)
    if not args.no_rare:
        results["rare"] = _rare_section(preset["rare"], args.seed, args.data_seed, width, device,
                                        progress=not args.no_progress)
    what = ("the embedded SynthWaterbirds (the background is spurious, the shape is the label" if args.data == "synth"
            else "TexturedFashion (Fashion-MNIST tops vs footwear on grass vs brick; the texture is spurious")
    intro = (f"ERM on {what}; groups 1 and 2 "
             "contradict the correlation), then the memorization analysis of You et al. (2025): which neurons the "
             "minority groups' fit lives in, what zeroing or re-initialising them does against random neurons, and "
             "which training samples they hold"
             + ("; and, from the same ERM model, the dense/masked training framework of its Part II against a "
                "control and DFR" if framework is not None else "")
             + ("; then, after Yang et al. (2022), how few SynthWaterbirds training images carrying a small pattern "
                "teach the network that pattern, and which units carry it." if not args.no_rare else "."))
    return _finish(results, out_dir, args, device, started, f"spurfast demo: memorization on {data_name}", spec.train, intro)


def _framework_section(settings, cfg, width: int, trained, spec, val, seed: int, device: str, *, progress: bool):
    """The demo's "ERM vs framework" numbers: the framework variants, the control and DFR, each
    from a copy of the demo's ERM model (the same recipe as ``benchmarks/silent_majority.py``)."""
    from spurfast.experiments.erm_study import ERMRecipe
    from spurfast.experiments.framework_study import FrameworkStudyConfig, compare_methods, minority_groups

    started = time.perf_counter()
    recipe = ERMRecipe("small_cnn", epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer,
                       lr_schedule=cfg.lr_schedule, batch_size=cfg.batch_size, width=width)
    fcfg = FrameworkStudyConfig(recipe, seeds=(seed,), epochs=settings["epochs"], variants=settings["variants"])
    _log(f"ERM vs framework: {', '.join(settings['variants'])} ({fcfg.epochs} epochs each), the control and DFR "
         f"({len(val)} validation images), from the seed-{seed} ERM model")
    rows = compare_methods(fcfg, trained["model"], spec.train, val, spec.test, seed,
                           erm_history=trained["history"], erm_seconds=trained["seconds"],
                           num_groups=spec.num_groups, device=device, progress=progress, log=_log)
    counts = spec.train.group_counts().tolist()
    return {"config": fcfg.to_dict(), "seed": seed, "val_group_counts": val.group_counts().tolist(),
            "minority_groups": minority_groups(counts), "rows": rows,
            "seconds": round(time.perf_counter() - started, 1)}


def _rare_section(settings, seed: int, data_seed: int, width: int, device: str, *, progress: bool):
    """The demo's "rare patterns" numbers: a small one-seed study of spurfast.experiments.rare on
    SynthWaterbirds (spurious score against n, the units carrying the pattern zeroed against
    random ones); the deletion methods are left to ``spurfast rare``."""
    from spurfast.experiments.rare import RareStudyConfig, run_rare_study

    rcfg = RareStudyConfig("synth", "small_cnn", seeds=(seed,), data_seed=data_seed, width=width, deletion=False,
                           device=device, **settings)
    _log(f"rare patterns: {', '.join(rcfg.patterns)} on n = {', '.join(map(str, rcfg.ns))} training images of class "
         f"{rcfg.target_class}, SmallCNN(width={width}), {rcfg.epochs} epochs each")
    return run_rare_study(rcfg, progress=progress, log=_log)


def _build_model(name: str, spec, width: int):
    from spurfast.models import MLP, create_model

    image_shape = tuple(spec.train[0][0].shape)
    key = name.lower().replace("-", "_")
    try:
        if key in ("small_cnn", "smallcnn"):
            return create_model(name, num_classes=spec.num_classes, width=width, in_channels=image_shape[0])
        if key == "mlp":
            return MLP(in_features=math.prod(image_shape), num_classes=spec.num_classes)
        return create_model(name, num_classes=spec.num_classes)
    except (ValueError, ImportError) as exc:  # an unknown name, or a missing optional package
        raise CLIError(f"--model: {exc}") from None


def load_checkpoint_file(path: str, model) -> None:
    """Load weights into ``model`` from a safetensors file (a spurfast training checkpoint included)
    or a ``torch.save`` file read with ``weights_only=True``; never unpickles code."""
    import torch

    if not os.path.isfile(path):
        raise CLIError(f"--checkpoint: {path!r} is not a file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
        if any(k.startswith("model.") for k in state) and not any(k in model.state_dict() for k in state):
            state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle with code, a truncated file, ...
            raise CLIError(f"--checkpoint: {path!r} cannot be read as weights only ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"--checkpoint: {path!r} does not hold a state dict of tensors")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def few(items):
            return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

        problems = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                    f"shape mismatch {few(mismatched)}" if mismatched else ""]
        raise CLIError(f"--checkpoint: {path!r} does not fit the model: " + "; ".join(p for p in problems if p))
    model.load_state_dict(state)


def cmd_localize(args) -> int:
    from spurfast.data.specs import load_data_spec
    from spurfast.experiments.memorization import run_study
    from spurfast.report.runs import new_run_dir

    started = time.perf_counter()
    device = resolve_device(args.device)
    _set_threads(args.threads)
    try:
        spec = load_data_spec(args.data, image_size=args.image_size, max_samples=args.max_samples, seed=args.data_seed)
    except ImportError as exc:  # an optional package of the dataset is missing; the message says which
        raise CLIError(f"--data {args.data}: {exc}") from None
    model = None
    if args.checkpoint is not None:
        model = _build_model(args.model, spec, args.width)
        load_checkpoint_file(args.checkpoint, model)
        model.to(device)
    else:
        _build_model(args.model, spec, args.width)  # an unknown model name fails now, before any training
    study = {"epochs": 30, "lr": args.lr, "optimizer": args.optimizer, "batch_size": args.batch_size,
             "hardest": args.hardest, "ks": tuple(args.ks), "modes": tuple(args.modes),
             "sigmas": tuple(args.sigmas), "repeats": 10}
    cfg = _study_config(study, args, device)
    out_dir = new_run_dir("localize", args.out)
    what = f"checkpoint {args.checkpoint}" if model is not None else f"{cfg.epochs} epochs of ERM"
    _log(f"localize: {args.data} ({len(spec.train)} train, groups {spec.train.group_counts().tolist()}; "
         f"{len(spec.test)} test), {args.model}, {what}, on {device}; writing to {out_dir}")
    results = run_study(lambda: _build_model(args.model, spec, args.width), spec.train, spec.test, cfg,
                        num_groups=spec.num_groups, group_names=spec.group_names, model=model,
                        progress=not args.no_progress, log=_log)
    return _finish(results, out_dir, args, device, started, f"spurfast localize: {args.model} on {args.data}", spec.train, "")


def cmd_bench(args) -> int:
    import spurfast.bench

    try:
        return spurfast.bench.run(args)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def cmd_rare(args) -> int:
    from spurfast.data import DatasetFileError
    from spurfast.experiments.rare_runner import configs_from_args, estimate_studies, format_estimate, run_studies
    from spurfast.report.rare import rare_markdown, write_rare_run
    from spurfast.report.runs import new_run_dir

    started = time.perf_counter()
    device = resolve_device(args.device)
    _set_threads(args.threads)
    configs = configs_from_args(args)  # a bad value raises ValueError naming it: one line, exit 2
    try:
        if args.estimate:
            print(format_estimate(estimate_studies(configs)))
            return 0
        _log(f"rare: {len(configs)} studies ({', '.join(f'{c.data}/{c.model}' for c in configs)}), patterns "
             f"{' '.join(configs[0].patterns)}, n in {' '.join(map(str, configs[0].ns))}, seeds "
             f"{' '.join(map(str, configs[0].seeds))}, on {device}")
        results = run_studies(configs, progress=args.progress, log=_log)
    except (DatasetFileError, ImportError) as exc:  # Fashion-MNIST's Debian package is missing
        raise CLIError(f"--data {' '.join(args.data)}: {str(exc).splitlines()[0]}") from None
    out_dir = new_run_dir("rare", args.out)
    paths = write_rare_run(results, out_dir, meta=_meta(args, device, started))
    print(rare_markdown(results))
    print("\n" + "\n".join(f"{name + ':':10s}{path}" for name, path in paths.items())
          + f"  ({time.perf_counter() - started:.0f} s)")
    return 0


def cmd_info(args) -> int:
    from spurfast._extension import build_info, format_build_info

    print(format_build_info(build_info()))
    return 0


def cmd_build(args) -> int:
    from spurfast._extension import ExtensionBuildError, build_extension

    try:
        path = build_extension(force=args.force, verbose=args.verbose)
    except ExtensionBuildError as exc:
        print(f"spurfast build: failed: {exc}", file=sys.stderr)
        return 1
    print(f"spurfast: C++ extension ready: {path}")
    return 0


def _add_common(p: argparse.ArgumentParser, out_help: str) -> None:
    from spurfast.experiments.memorization import STUDY_SCORES

    p.add_argument("--out", metavar="DIR", default=None, help=out_help)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train and score (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data (generation or subsampling)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--epochs", type=int, default=None, help="ERM epochs (default: the preset's)")
    p.add_argument("--repeats", type=int, default=None, help="seeded draws per random intervention")
    p.add_argument("--no-oracle", action="store_true", help="skip zeroing every eligible unit alone")
    p.add_argument("--no-self-influence", action="store_true", help="skip TracIn self-influence")
    p.add_argument("--score", choices=STUDY_SCORES, default=None,
                   help="how units are ranked (default verified: the target's first-order flip rate on the margin, "
                        "its top 64 units checked by the exact oracle on the training split; group_gradient: the "
                        "paper's score)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spurfast", description="Find which neurons memorize which training examples, at the cost of a training step.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    import spurfast

    parser.add_argument("--version", action="version", version=f"spurfast {spurfast.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="the whole study on the embedded SynthWaterbirds, with an HTML report",
        description="Train ERM on the embedded SynthWaterbirds, record NeuronStats, score and localize the units that "
                    "memorize each minority group, intervene on them against random units, compute self-influence, and "
                    "write results.json, PNG plots and a self-contained report.html.",
        epilog="examples:\n  spurfast demo --quick\n  spurfast demo --seed 1 --out runs/demo-seed1\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--quick", action="store_true", help="a smaller run of the same pipeline (about two minutes on a 2-core CPU)")
    demo.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    demo.add_argument("--no-framework", action="store_true",
                      help="skip the ERM vs framework section (the dense/masked fine-tuning, its control and DFR)")
    demo.add_argument("--no-rare", action="store_true",
                      help="skip the rare patterns section (a pattern on a few training images, Yang et al. 2022)")
    demo.add_argument("--data", choices=("synth", "textured_fashion"), default="synth",
                      help="synth (default: SynthWaterbirds, generated) or textured_fashion (Fashion-MNIST items on "
                           "real textures at 64x64; needs `apt-get install dataset-fashion-mnist` and "
                           "`pip install \"spurfast[real]\"`)")
    _add_common(demo, "folder for the results (default: a new runs/demo-<time>)")
    demo.set_defaults(func=cmd_demo)

    loc = sub.add_parser(
        "localize", help="the same study on your data and model",
        description="Score, localize and intervene on the units that memorize each minority group of your data; "
                    "trains by ERM first unless --checkpoint is given. Data: synth, textured_fashion (Fashion-MNIST "
                    "items on real textures, from local packages), waterbirds:PATH (the folder with "
                    "metadata.csv), celeba:PATH (list_attr_celeba.csv, list_eval_partition.csv, img_align_celeba/), "
                    "csv:PATH (columns path,label,attr,split; paths relative to the CSV).",
        epilog="examples:\n  spurfast localize --data synth --model small_cnn\n"
               "  spurfast localize --data csv:mine/images.csv --model resnet18 --checkpoint erm.safetensors\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    loc.add_argument("--data", required=True, help="synth | textured_fashion | waterbirds:PATH | celeba:PATH | csv:PATH")
    loc.add_argument("--model", required=True, help="small_cnn, mlp, or a torchvision/timm model name")
    loc.add_argument("--checkpoint", metavar="FILE", default=None,
                     help="trained weights (.safetensors, or a torch.save file read with weights_only=True); no training")
    loc.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default 0)")
    loc.add_argument("--width", type=int, default=16, help="small_cnn width (default 16)")
    loc.add_argument("--image-size", type=int, default=None,
                     help="image side: file datasets after resize/crop (default 224), textured_fashion (default 64)")
    loc.add_argument("--max-samples", type=int, default=None, help="file datasets: a seeded subset of each split")
    loc.add_argument("--minority", type=int, nargs="+", default=None,
                     help="minority group ids (default: groups under half the mean training group size)")
    loc.add_argument("--lr", type=float, default=2e-3)
    loc.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    loc.add_argument("--batch-size", type=int, default=64)
    loc.add_argument("--hardest", type=int, default=200, help="samples per group for the group-gradient score")
    loc.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3], help="numbers of units to intervene on")
    loc.add_argument("--modes", nargs="+", default=["zero", "random_init"], help="intervention modes")
    loc.add_argument("--sigmas", nargs="+", default=["init"], help="random_init sigmas: 'init' and/or floats")
    _add_common(loc, "folder for the results (default: a new runs/localize-<time>)")
    loc.set_defaults(func=cmd_localize)

    bench = sub.add_parser(
        "bench", help="scoring throughput: spurfast vs plain fwd+bwd, Opacus, torch.func, BackPACK",
        description="Time the per-sample scoring pass of spurfast against a plain forward+backward and whichever of "
                    "Opacus, torch.func and BackPACK are installed, on the benchmark models; writes results.json and "
                    "results.md.",
        epilog="examples:\n  spurfast bench --quick\n  spurfast bench --device cuda --out runs/bench-gpu\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    import spurfast.bench

    spurfast.bench.add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    rare = sub.add_parser(
        "rare", help="rare spurious patterns (Yang et al. 2022): spurious score vs n, localization, deletion",
        description="Add a pattern (S1/S3 corner squares, R3 noise) to n training images of one class, train, and "
                    "measure the spurious score (how often the pattern alone raises that class's probability by "
                    "more than 0.1 on other classes' test images); then localize the units carrying the pattern "
                    "and zero them against random units, and delete the poisoned images by incremental retraining, "
                    "retraining from scratch and group influence. Writes results.json, runs.csv, results.md and "
                    "score_vs_n.png. Fashion-MNIST needs `apt-get install dataset-fashion-mnist`.",
        epilog="examples:\n  spurfast rare --tiny                              # seconds: the plumbing\n"
               "  spurfast rare --estimate --threads 1             # time every stage, extrapolate\n"
               "  spurfast rare --data synth --models small_cnn --seeds 0 --ns 0 3 30\n"
               "  spurfast rare --threads 2 --out runs/rare         # the README experiment (~45 min)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from spurfast.experiments.rare_runner import add_rare_arguments

    add_rare_arguments(rare, threads_help="torch CPU threads (default: torch's choice)")
    rare.set_defaults(func=cmd_rare)

    info = sub.add_parser("info", help="which backends work here (build_info), and why not")
    info.set_defaults(func=cmd_info)

    build = sub.add_parser("build", help="compile the C++ extension now (otherwise on first use)")
    build.add_argument("--force", action="store_true", help="rebuild even if a build is cached (also retries a failed one)")
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    build.set_defaults(func=cmd_build)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.argv = argv
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"spurfast {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spurfast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
