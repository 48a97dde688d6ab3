"""Where a CPU scoring step's time goes, per layer and per phase (issue 15's profile): the
measurement is `spurfast.bench.profile` (its docstring names the phases and what is timed).

    python benchmarks/scoring_profile.py --out benchmarks/results/scoring_profile   # the committed run
    python benchmarks/scoring_profile.py --quick --out /tmp/profile                  # small models, seconds
    python benchmarks/scoring_profile.py --render benchmarks/results/scoring_profile/scoring_profile.json

Models: the MLP 3072-2048-2048-10 (batch 128) and the width-stack ResNet-18 of
`benchmarks/cpu_backends.py` (batch 32), torchvision's ResNet-18 and the CIFAR-style ResNet-18
(batch 32, 3x32x32; torchvision-free stand-ins where torchvision is missing). Writes
scoring_profile.json and scoring_profile.md into the run folder.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn

from spurfast.bench import profile
from spurfast.bench.cpu_backends import MLP, MODELS, NUM_CLASSES
from spurfast.bench.environment import environment, write_json, write_text
from spurfast.bench.models import build_model
from spurfast.report.runs import new_run_dir


def _models(quick: bool):
    """``name -> (model factory, batch)``: the MLP and the width stack of `benchmarks/cpu_backends.py`,
    and the benchmark's torchvision and CIFAR-style ResNet-18 (their torchvision-free stand-ins
    where torchvision is missing; the same modules and initialisation)."""
    if quick:
        return {"mlp_small": (lambda: MLP((3072, 256, 256, NUM_CLASSES)).eval(), 16)}
    models = {name: (factory, batch) for name, (factory, batch, _) in MODELS.items()}
    for name in ("resnet18", "resnet18_cifar"):
        models[name] = (lambda name=name: build_model(name, allow_standin=True)[0].eval(), 32)
    return models


def _only_weights_require_grad(model: nn.Module) -> nn.Module:
    """As in the issue's measurement: only Linear/Conv weights require grad, eval mode."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            p.requires_grad_(name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d)))
    return model.eval()


def main(argv: Optional[List[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=None, help="alternating plain/scoring steps (default 20; quick 3)")
    parser.add_argument("--profiled-steps", type=int, default=None, help="steps under the profiler (default 5; quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="one small MLP, few steps: seconds")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a new runs/scoring_profile-<time>/)")
    parser.add_argument("--render", metavar="JSON", help="only print the tables of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        print(profile.render(data))
        return data
    pairs = args.pairs if args.pairs is not None else (3 if args.quick else 20)
    steps = args.profiled_steps if args.profiled_steps is not None else (1 if args.quick else 5)
    if pairs < 1 or steps < 1 or args.threads < 1:
        parser.error("--pairs, --profiled-steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    out = new_run_dir("scoring_profile", args.out)
    data = {"command": "python benchmarks/scoring_profile.py " + " ".join(shlex.quote(a) for a in argv),
            "environment": environment(torch.device("cpu")), "threads": torch.get_num_threads(),
            "settings": {"pairs": pairs, "profiled_steps": steps, "num_groups": 4, "backend": "cpp",
                         "statistics": "grad_sq, group_grad, activation statistics, removal effect"},
            "phases": list(profile.PHASES), "models": {}}
    for name, (factory, batch) in _models(args.quick).items():
        torch.manual_seed(0)
        model = _only_weights_require_grad(factory())
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, NUM_CLASSES, (batch,))
        data["models"][name] = profile.profile_model(model, x, y, pairs=pairs, profiled_steps=steps)
        print(f"{name}: {data['models'][name]['ratio']:.2f}x plain", file=sys.stderr, flush=True)
    write_json(out / "scoring_profile.json", data)
    write_text(out / "scoring_profile.md", profile.render(data) + "\n")
    print(profile.render(data))
    print(f"\nwrote {out / 'scoring_profile.json'} and scoring_profile.md")
    return data


if __name__ == "__main__":
    main()
