"""Lazy loading of the compiled module ``spurfast._C`` and the backend report.

Nothing here runs at ``import spurfast``: the extension is imported the first time an
op asks for it, and a failure is kept so that it can be shown when, and only when, a
user asks for a backend that needs it.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Any, Dict, Optional

_C: Optional[Any] = None
_C_error: Optional[BaseException] = None
_C_tried = False
_warned: set = set()


def load_extension() -> Optional[Any]:
    """Import ``spurfast._C`` once; return it, or ``None`` if it is unavailable."""
    global _C, _C_error, _C_tried
    if _C_tried:
        return _C
    _C_tried = True
    if os.environ.get("SPURFAST_NO_EXT", "0") == "1":
        _C_error = RuntimeError("native code disabled by SPURFAST_NO_EXT=1")
        return None
    try:
        import torch  # noqa: F401  (libtorch must be loaded before the extension)

        _C = importlib.import_module("spurfast._C")
    except Exception as exc:  # keep any failure (ImportError, undefined symbol, ...)
        _C_error = exc
        _C = None
    return _C


def require_extension(backend: str) -> Any:
    """Return ``spurfast._C`` or raise an error that says why it is missing."""
    ext = load_extension()
    if ext is None:
        raise RuntimeError(
            f"spurfast backend {backend!r} needs the compiled extension spurfast._C, which "
            f"could not be loaded: {_C_error!r}. Rebuild with "
            "`pip install --no-build-isolation -e .` (without SPURFAST_NO_EXT=1), "
            "or use backend='torch'."
        ) from _C_error
    return ext


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def build_info() -> Dict[str, Any]:
    """Report which backends are usable here and, for each that is not, why.

    Example::

        >>> import spurfast
        >>> info = spurfast.build_info()
        >>> info["backends"]["torch"]["available"]
        True
    """
    import torch

    ext = load_extension()
    backends: Dict[str, Dict[str, Any]] = {
        "torch": {"available": True, "reason": "plain-torch reference, always available"},
    }
    if ext is not None:
        backends["cpp"] = {
            "available": True,
            "reason": f"spurfast._C loaded (OpenMP threads: {ext.openmp_max_threads()})",
        }
    else:
        backends["cpp"] = {"available": False, "reason": repr(_C_error)}
    cuda_compiled = bool(ext is not None and ext.with_cuda())
    cuda_device = torch.cuda.is_available()
    if cuda_compiled and cuda_device:
        backends["cuda"] = {"available": True, "reason": "compiled with CUDA sources and a GPU is visible"}
    else:
        why = []
        if not cuda_compiled:
            why.append("extension built without CUDA sources")
        if not cuda_device:
            why.append("no CUDA device visible to torch")
        backends["cuda"] = {"available": False, "reason": "; ".join(why)}
    try:
        import triton

        triton_version: Optional[str] = triton.__version__
    except Exception as exc:
        triton_version = None
        triton_error = repr(exc)
    if triton_version is not None and cuda_device:
        backends["triton"] = {"available": True, "reason": f"triton {triton_version} with a CUDA device"}
    else:
        reason = "triton not importable: " + triton_error if triton_version is None else "no CUDA device"
        backends["triton"] = {"available": False, "reason": reason}
    return {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton_version": triton_version,
        "extension": None if ext is None else ext.__file__,
        "backends": backends,
    }
