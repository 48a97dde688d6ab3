"""Writing safetensors files atomically (masks, checkpoints, statistics share it)."""
from __future__ import annotations

import os
import tempfile
from typing import Dict, Optional, Union

import torch
from safetensors.torch import save_file


def save_safetensors_atomic(tensors: Dict[str, torch.Tensor], path: Union[str, os.PathLike],
                            metadata: Optional[Dict[str, str]] = None, fsync: bool = False) -> str:
    """Write ``tensors`` to ``path`` through a temporary file in the same folder and
    ``os.replace``, so that a crash or a full disk never leaves a half-written file behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
