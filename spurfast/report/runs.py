"""Run folders: every command that writes results writes them to a fresh folder unless told where."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Union

RUNS_ROOT = "runs"


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
