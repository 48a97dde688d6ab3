"""``spurfast bench``: the scoring-throughput comparison as one command.

Three configurations, picked by ``--device`` and ``--quick`` (every default can be
overridden by its flag):

============  =====================================  ==============================  ======================
run           models (batch)                         repeats                         time limits
============  =====================================  ==============================  ======================
``cuda``      resnet18 (256), resnet50 (64),         5 warm-up, up to 20 timed       5 s timed per method,
              vit_small (64), vit_base (32),                                         360 s for the run
              mlp (512), the GPU issue's sizes
``cpu``       resnet18 (32), mlp (128); ResNet-18    1 warm-up, up to 5 timed        20 s timed per method
              is a torchvision-free stand-in when
              torchvision cannot be imported
``--quick``   all five, shrunk (``tiny``), B=2;      no warm-up, 2 timed             2 s per method
              one CPU thread
============  =====================================  ==============================  ======================

``--quick`` is the rehearsal of the GPU command on CPU: the same models (those whose
library is importable; on CPU ResNet-18 falls back to its stand-in), methods, checks and
files, at sizes that take seconds (ResNet-50 on 32x32, the ViTs with 2 blocks on 32x32,
the MLP 64-32-32-10). On ``cuda`` a model whose library is missing is skipped, with the
reason, as is a peer that is not installed; neither stops the run.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from spurfast.bench._flags import parse_batch_sizes, parse_list
from spurfast.bench.environment import check_device, write_json, write_text
from spurfast.bench.models import ALL_MODELS, CPU_MODELS, MODEL_SPECS
from spurfast.bench.peers import ALL_METHODS
from spurfast.bench.throughput import Settings, measure, render_table

QUICK_BATCH = 2
DEFAULTS = {  # warmup, repeats, budget_s, time_limit_s
    "cuda": (5, 20, 5.0, 360.0),
    "cpu": (1, 5, 20.0, None),
    "quick": (0, 2, 2.0, None),  # the untimed check() call is the warm-up
}
SPURFAST_BACKENDS = ("auto", "torch", "cpp", "triton")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``spurfast bench`` flags to ``parser``; :func:`run` takes what it parses.

    Example::

        >>> p = argparse.ArgumentParser()
        >>> add_arguments(p)
        >>> args = p.parse_args(["--quick", "--models", "mlp"])
        >>> args.device, args.quick, args.models, args.out
        ('cpu', True, 'mlp', None)
    """
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where to measure (default cpu; cuda runs the GPU issue's models and batches)")
    parser.add_argument("--quick", action="store_true",
                        help="rehearsal of the GPU run: every model shrunk, batch 2, 2 repeats (a minute on a CPU)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="folder for results.json and results.md (default: a new runs/bench-<time>)")
    parser.add_argument("--models", default=None, metavar="LIST",
                        help=f"comma-separated subset of {','.join(ALL_MODELS)} (default: by --device, see above)")
    parser.add_argument("--methods", default=None, metavar="LIST",
                        help=f"comma-separated subset of {','.join(ALL_METHODS)} (default all); the first that "
                             "yields per-sample norms is the reference for max rel err")
    parser.add_argument("--batch-size", default=None, metavar="N|NAME=N,...",
                        help="one batch size for every model, or per model, e.g. mlp=256,resnet18=64")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per method before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (at most)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="per method: cut --repeats (not below 3) so the timed calls take about this long")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="skip the models and methods that would start this long after the run began "
                             "(default 360 on cuda, so that a run ends well within 8 minutes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the run (default: torch's; 1 with --quick on cpu)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="CPU: rounds of plain and spurfast steps in alternation, for per-round ratios "
                             "(default 20 on cpu, 3 with --quick, 0 on cuda)")
    parser.add_argument("--no-memory", action="store_true",
                        help="CPU: skip the peak-memory pass after the timings (a fresh process per model)")
    parser.add_argument("--spurfast-backend", default="auto", choices=SPURFAST_BACKENDS,
                        help="NeuronStats backend (auto: cpp on CPU, triton on CUDA)")
    parser.add_argument("--no-tf32", action="store_true", help="disallow TF32 (default: allowed for every method)")
    parser.add_argument("--seed", type=int, default=0)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The run that ``args`` asks for, with the defaults of its configuration filled in;
    ValueError (naming the flag) for a bad value."""
    device = getattr(args, "device", "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    quick = bool(getattr(args, "quick", False))
    warmup, repeats, budget_s, time_limit_s = DEFAULTS["quick" if quick else device]
    models = parse_list(getattr(args, "models", None), ALL_MODELS, "--models")
    if models is None:
        models = list(ALL_MODELS if quick or device == "cuda" else CPU_MODELS)
    methods = parse_list(getattr(args, "methods", None), ALL_METHODS, "--methods") or list(ALL_METHODS)
    batch_text = getattr(args, "batch_size", None)
    if quick:
        batches = {m: QUICK_BATCH for m in models}
    elif device == "cpu":
        batches = {m: MODEL_SPECS[m].cpu_batch or MODEL_SPECS[m].batch for m in models}
    else:
        batches = {m: MODEL_SPECS[m].batch for m in models}
    batches.update(parse_batch_sizes(batch_text, models))

    def pick(name, default):
        value = getattr(args, name, None)
        return default if value is None else value

    return Settings(
        models=models, methods=methods, device=device, batch_sizes=batches,
        warmup=pick("warmup", warmup), repeats=pick("repeats", repeats), tiny=quick,
        spurfast_backend=pick("spurfast_backend", "auto"), tf32=not getattr(args, "no_tf32", False),
        seed=pick("seed", 0), budget_s=pick("budget_s", budget_s), time_limit_s=pick("time_limit_s", time_limit_s),
        allow_standin=device == "cpu", quick=quick,
        # tiny shapes gain nothing from threads, and on a busy small CPU oversubscribed threads slow them 10x
        threads=pick("threads", 1 if quick and device == "cpu" else None),
        batch_size_override=None if batch_text is None else str(batch_text),
        pairs=pick("pairs", 0 if device == "cuda" else (3 if quick else 20)),
        memory=device == "cpu" and not getattr(args, "no_memory", False),
        argv=getattr(args, "argv", None) or list(sys.argv),
    )


def run(args: argparse.Namespace) -> int:
    """Run ``spurfast bench``: measure, write ``results.json`` and ``results.md`` into
    ``new_run_dir("bench", args.out)`` (rewritten after every model, so that a run cut off
    keeps what it measured), print the table and the folder. Returns 0; raises ValueError
    with a one-line message for a bad argument (e.g. ``--device cuda`` without CUDA)."""
    from spurfast.report.runs import new_run_dir

    settings = settings_from_args(args)
    check_device(settings.device)  # before a run folder is made
    out_dir = new_run_dir("bench", getattr(args, "out", None))
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"

    def save(data: dict) -> None:
        write_json(json_path, data)
        write_text(md_path, render_table(data) + "\n")

    data = measure(settings, on_model=save)
    print(render_table(data))
    print(f"\nwrote {json_path} and {md_path.name} ({data.get('wall_s', 0):.0f} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m spurfast.bench``, for a checkout whose ``spurfast`` command is not installed."""
    parser = argparse.ArgumentParser(prog="spurfast bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except ValueError as exc:
        parser.error(str(exc))
        return 2
