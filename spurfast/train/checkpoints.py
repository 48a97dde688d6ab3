"""Training checkpoints: one ``.safetensors`` file per epoch, written atomically.

A file holds the model's state dict (``model.*``), the optimizer's tensor state
(``optimizer.state.<param index>.<key>``), the torch RNG state (``rng.*``) and, in the
safetensors metadata field, a JSON document with the epoch, the optimizer's param-group
hyperparameters, the run's settings and its history. Loading never unpickles code.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open

from spurfast._files import save_safetensors_atomic

_CHECKPOINT_RE = re.compile(r"^epoch_(\d+)\.safetensors$")
FORMAT_VERSION = 1


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses shared or non-contiguous storage; a private contiguous copy is always safe.
    return t.detach().to("cpu", copy=True).contiguous()


def save_checkpoint(
    path: Union[str, os.PathLike],
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    epoch: int = 0,
    extra: Optional[Mapping[str, Any]] = None,
    save_rng: bool = True,
) -> str:
    """Write ``model`` (+ ``optimizer``, RNG state, ``extra`` JSON) to ``path`` atomically.

    Example:
        >>> import tempfile, os
        >>> from spurfast.train import make_optimizer
        >>> model = nn.Linear(3, 2)
        >>> opt = make_optimizer(model, "sgd", lr=0.1)
        >>> path = os.path.join(tempfile.mkdtemp(), "epoch_0001.safetensors")
        >>> _ = save_checkpoint(path, model, opt, epoch=1, extra={"note": "hi"})
        >>> meta = load_checkpoint(path, nn.Linear(3, 2), make_optimizer(nn.Linear(3, 2), "sgd", lr=0.5))
        >>> meta["epoch"], meta["extra"]["note"], meta["param_groups"][0]["lr"]
        (1, 'hi', 0.1)
    """
    path = os.fspath(path)
    tensors: Dict[str, torch.Tensor] = {f"model.{k}": _cpu_copy(v) for k, v in model.state_dict().items()}
    meta: Dict[str, Any] = {"format": FORMAT_VERSION, "epoch": int(epoch), "extra": dict(extra or {})}
    if optimizer is not None:
        state = optimizer.state_dict()
        scalar_state: Dict[str, Dict[str, Any]] = {}
        for param_id, param_state in state["state"].items():
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.state.{param_id}.{key}"] = _cpu_copy(value)
                else:
                    scalar_state.setdefault(str(param_id), {})[key] = value
        meta["optimizer"] = type(optimizer).__name__
        meta["optimizer_scalar_state"] = scalar_state
        meta["param_groups"] = state["param_groups"]
    if save_rng:
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
    try:
        metadata = {"spurfast": json.dumps(meta)}
    except TypeError as exc:
        raise TypeError(f"checkpoint metadata must be JSON-serializable: {exc}") from exc

    return save_safetensors_atomic(tensors, path, metadata=metadata, fsync=True)


def load_checkpoint(
    path: Union[str, os.PathLike],
    model: Optional[nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    restore_rng: bool = False,
) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` / ``optimizer``.

    Returns the JSON metadata (``epoch``, ``extra``, ``param_groups``, ...). With
    ``restore_rng=True`` the global torch RNG state is restored too. Tensors land on the device
    of the model's parameters (the optimizer's state follows its parameters).
    See :func:`save_checkpoint` for an example.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    with safe_open(path, framework="pt", device="cpu") as f:
        raw_meta = (f.metadata() or {}).get("spurfast")
        if raw_meta is None:
            raise ValueError(f"{path!r} is not a spurfast checkpoint (no 'spurfast' metadata)")
        meta = json.loads(raw_meta)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if model is not None:
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(state)
    if optimizer is not None:
        if "param_groups" not in meta:
            raise ValueError(f"{path!r} holds no optimizer state")
        if meta["optimizer"] != type(optimizer).__name__:
            raise ValueError(f"{path!r} holds {meta['optimizer']} state, not {type(optimizer).__name__}")
        opt_state: Dict[int, Dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer.state."):
                param_id, name = key[len("optimizer.state."):].split(".", 1)
                opt_state.setdefault(int(param_id), {})[name] = value
        for param_id, scalars in meta["optimizer_scalar_state"].items():
            opt_state.setdefault(int(param_id), {}).update(scalars)
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    if restore_rng:
        if "rng.torch" not in tensors:
            raise ValueError(f"{path!r} holds no RNG state")
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


def latest_checkpoint(checkpoint_dir: Union[str, os.PathLike]) -> Optional[str]:
    """Path of the ``epoch_NNNN.safetensors`` with the highest epoch in the folder, or ``None``."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        return None
    found = [(int(m.group(1)), name) for name in os.listdir(checkpoint_dir) if (m := _CHECKPOINT_RE.match(name))]
    return os.path.join(checkpoint_dir, max(found)[1]) if found else None


def checkpoint_path(checkpoint_dir: Union[str, os.PathLike], epoch: int) -> str:
    """``<checkpoint_dir>/epoch_<epoch:04d>.safetensors``: the checkpoint after ``epoch`` epochs."""
    return os.path.join(os.fspath(checkpoint_dir), f"epoch_{int(epoch):04d}.safetensors")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
