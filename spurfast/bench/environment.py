"""What a results file records about where it was measured, and how it is written."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

PEER_DISTRIBUTIONS = ("opacus", "backpack-for-pytorch", "torchvision", "timm")


def error_string(exc: BaseException, limit: int = 800) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters (tables and JSON stay readable)."""
    msg = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def check_device(device: str) -> None:
    """ValueError naming ``--device`` unless ``device`` is "cpu", or "cuda" with a GPU torch can see."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device cuda: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); use --device cpu"
        )


def select_device(device: str, tf32: bool = True) -> torch.device:
    """``device`` checked by :func:`check_device`; sets TF32 for every method alike."""
    check_device(device)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return torch.device(device)


def tf32_flags() -> Tuple[bool, bool]:
    """(matmul, cudnn) TF32 switches, to restore after a run."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def set_tf32_flags(flags: Tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = cpu_info()
    model = info.get("model_name")
    cores = os.cpu_count()
    # Two CPUs with one model name ("AMD EPYC" under a hypervisor) can differ twofold in the
    # speed of torch's kernels: the family/model numbers and the vector ISA tell them apart.
    detail = ", ".join(x for x in (
        f"family {info['family']} model {info['model']}" if "family" in info and "model" in info else None,
        info.get("capability"),
    ) if x)
    arch = platform.machine() or "cpu"
    where = f"{arch}, {detail}" if detail else arch
    if model:
        return f"{model}, {cores} cores ({where})" if cores else f"{model} ({where})"
    return platform.processor() or arch


_SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "sve", "asimd")


def cpu_info() -> Dict[str, object]:
    """What identifies this CPU for timings: model name, family/model/stepping and the SIMD
    flags of the first processor in /proc/cpuinfo (Linux; absent keys elsewhere), and the
    vector ISA torch's CPU kernels dispatch to (``capability``)."""
    info: Dict[str, object] = {}
    fields = {"model name": "model_name", "cpu family": "family", "model": "model", "stepping": "stepping",
              "cache size": "cache_size"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = (part.strip() for part in line.partition(":"))
                if key in fields and value:
                    info[fields[key]] = value
                elif key in ("flags", "Features"):
                    present = set(value.split())
                    info["simd"] = [flag for flag in _SIMD_FLAGS if flag in present]
    except OSError:
        pass
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    if capability is not None:
        try:
            info["capability"] = capability()
        except Exception:  # metadata only
            pass
    return info


def slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def version(dist: str) -> Optional[str]:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    """The checked-out commit of a source checkout, read from .git without running git
    (None for an installed copy or when unreadable)."""
    try:
        git = Path(__file__).resolve().parents[2] / ".git"
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            ref_file = git / ref
            if ref_file.exists():
                return ref_file.read_text().strip()
            for line in (git / "packed-refs").read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
            return None
        return head
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    """Device and versions for a results file."""
    import spurfast

    try:
        build_info = spurfast.build_info()
    except Exception as exc:  # record, never abort a benchmark over metadata
        build_info = {"error": error_string(exc)}
    return {
        "device": device_name(device),
        "device_type": device.type,
        "gpu_capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu": cpu_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton") or version("pytorch-triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "spurfast": getattr(spurfast, "__version__", None),
        "spurfast_commit": git_commit(),
        "build_info": build_info,
        "peers": {d: version(d) for d in PEER_DISTRIBUTIONS},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_text(path: Path, text: str) -> None:
    """Write atomically (``*.tmp`` then rename), so that a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data: dict, indent: int = 2) -> None:
    write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def merge_into_existing(out: Path, merge_results: Callable[[dict, dict], dict], stub: dict, merge: bool
                        ) -> Callable[[dict], dict]:
    """With ``merge``, the function that folds new results into those already in ``out``; checks
    ``stub`` (the new run's environment and settings) against them first, so that a mismatched file
    is refused before any time is spent measuring. Without ``merge`` (or no file yet), the identity."""
    old = json.loads(out.read_text()) if merge and out.exists() else None
    if old is None:
        return lambda data: data
    try:
        merge_results(old, stub)
    except ValueError as exc:
        raise SystemExit(str(exc))
    return lambda data: merge_results(old, data)
