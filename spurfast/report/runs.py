"""Run folders: every command that writes results writes them to a fresh folder unless told where."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Dict, Optional, Union

RUNS_ROOT = "runs"


def run_environment(device: str) -> Dict[str, object]:
    """What a results file records about where it ran: torch, Python, the device, torch's CPU
    threads, the machine's cores and its platform string.

    Example::

        >>> sorted(run_environment("cpu"))
        ['cpu_count', 'device', 'platform', 'python', 'threads', 'torch']
    """
    import torch

    return {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform()}


def new_run_dir(name: str, out: Optional[Union[str, os.PathLike]] = None, root: Union[str, os.PathLike] = RUNS_ROOT) -> Path:
    """The folder a run writes to: ``out`` when given (created if missing), else a new
    ``<root>/<name>-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, ... when that exists), so that no run
    overwrites another's results.

    Example::

        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> a, b = new_run_dir("demo", root=root), new_run_dir("demo", root=root)
        >>> a != b and a.is_dir() and b.name.startswith("demo-")
        True
    """
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise ValueError(f"out: {str(path)!r} exists and is not a folder")
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
