"""Lazy build and load of the C++ extension, and the backend report.

Nothing here runs at ``import spurfast``. The first op that needs native code calls
:func:`load_extension`, which imports a cached build of the C++ sources for the torch in
use or, when there is none, compiles one with ``torch.utils.cpp_extension.load`` (ninja;
a minute or two, once, announced by one line on stderr). A failure is kept and shown only
when a backend that needs the extension is asked for: ``backend="auto"`` falls back to
plain torch with one warning, ``backend="cpp"`` raises with the reason.

Sources: ``spurfast/_csrc/`` in an installed wheel, the checkout's ``csrc/`` in an editable
install or a source tree, or ``$SPURFAST_CSRC_DIR``. CUDA sources (``cuda/*.cu``) are
compiled too when torch is a CUDA build and a CUDA toolkit (``CUDA_HOME``) is found.

Cache: ``$SPURFAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/spurfast``, else ``~/.cache/spurfast``.
One folder per build key: torch version, git revision and CUDA version, the C++ ABI, the
Python ABI and platform, and a hash of the sources and flags, so that a build for another
torch is never loaded. A folder holds the ``.so``, ``stamp.json`` (written last and
atomically: a build without it is unfinished), ``build.log`` and, after a failed compile,
``failed.json``, so that later processes do not retry a long compile until the sources,
torch or the compiler change or ``spurfast build`` is run.

``SPURFAST_NO_EXT=1`` disables native code. ``CXX``, ``MAX_JOBS``, ``CUDA_HOME`` and
``TORCH_CUDA_ARCH_LIST`` work as for torch (without a visible GPU, CUDA sources are compiled
only when ``TORCH_CUDA_ARCH_LIST`` names the architectures).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shlex
import shutil
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

_C: Optional[Any] = None
_C_error: Optional[BaseException] = None
_C_tried = False
_warned: set = set()
# What the last load or build found, for build_info(): state, entry, built_for_torch, log.
_state: Dict[str, Any] = {}
_lock = threading.Lock()

EXT_NAME = "spurfast_C"  # the module name compiled into the .so (PyInit_spurfast_C)
CXX_FLAGS = ("-O3", "-fopenmp")  # no -std=: torch's cpp_extension adds the standard its headers need
LD_FLAGS = ("-fopenmp",)
NVCC_FLAGS = ("-O3", "--use_fast_math")
SOURCE_PATTERNS = ("*.cpp", "*.h", "*.cu", "*.cuh")
_RECIPE = 1  # bump when the build recipe changes in a way the key does not see


class ExtensionBuildError(RuntimeError):
    """The C++ extension could not be built or loaded; the message says why and where the log is."""


def cache_dir() -> Path:
    """The folder that holds the compiled builds (see the module docstring)."""
    if os.environ.get("SPURFAST_CACHE_DIR"):
        return Path(os.environ["SPURFAST_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "spurfast"


def source_dir() -> Path:
    """The C++ sources: ``$SPURFAST_CSRC_DIR``, the wheel's ``spurfast/_csrc`` or the checkout's ``csrc``."""
    if os.environ.get("SPURFAST_CSRC_DIR"):
        return Path(os.environ["SPURFAST_CSRC_DIR"]).expanduser().resolve()
    package = Path(__file__).resolve().parent
    installed = package / "_csrc"
    return installed if installed.is_dir() else package.parent / "csrc"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _attempt() -> Dict[str, Optional[str]]:
    """The settings outside the key that a failed build may have failed on; changing one retries it."""
    return {"cxx": _compiler(), "cuda_home": os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")}


def _build_spec() -> Dict[str, Any]:
    """Sources, flags and the cache key of the build for the torch in this process."""
    import torch

    src = source_dir()
    if not src.is_dir():
        raise ExtensionBuildError(
            f"the C++ sources are missing: {src} is not a folder (reinstall spurfast, or set SPURFAST_CSRC_DIR)"
        )
    cpp = sorted(src.glob("*.cpp"))
    cu = sorted(src.glob("cuda/*.cu"))
    if not cpp:
        raise ExtensionBuildError(f"no C++ sources (*.cpp) in {src}")
    cuda_skipped = _why_no_cuda(cu)  # None when the CUDA sources are compiled too
    with_cuda = cuda_skipped is None
    arch_list = _cuda_arch_list() if with_cuda else None
    cflags = list(CXX_FLAGS) + (["-DSPURFAST_WITH_CUDA"] if with_cuda else [])
    cuda_flags = list(NVCC_FLAGS) + ["-DSPURFAST_WITH_CUDA"] if with_cuda else []
    digest = hashlib.sha256(json.dumps([_RECIPE, cflags, cuda_flags, list(LD_FLAGS)]).encode())
    for path in sorted({p for pattern in SOURCE_PATTERNS for p in src.rglob(pattern)}):
        digest.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    key = {
        "torch_version": torch.__version__,
        "torch_git_version": getattr(torch.version, "git_version", None),
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", False)),
        "python": sys.implementation.cache_tag,
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "platform": sysconfig.get_platform(),
        "with_cuda": with_cuda,
        "cuda_arch_list": arch_list,
        "sources_sha256": digest.hexdigest(),
    }
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    accel = f"cu{key['torch_cuda']}" if key["torch_cuda"] else "cpu"
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", f"torch{torch.__version__}-{accel}-{key['python']}-{key_hash}")
    return {
        "key": key,
        "entry": cache_dir() / name,
        "sources": cpp + (cu if with_cuda else []),
        "cflags": cflags,
        "cuda_flags": cuda_flags,
        "with_cuda": with_cuda,
        "cuda_arch_list": arch_list,
        "cuda_skipped": cuda_skipped,
    }


def _import_cpp_extension(quiet: bool = True) -> Any:
    """``torch.utils.cpp_extension``, imported without its chatter unless ``quiet=False``.

    The import looks for a CUDA toolkit and, with a CUDA torch on a machine without a GPU,
    says "No CUDA runtime is found" (newer torch logs it, older prints it): noise beside
    our one progress line.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    saved_level = logger.level
    try:
        if quiet:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            from torch.utils import cpp_extension
    except Exception as exc:
        raise ExtensionBuildError(f"torch.utils.cpp_extension cannot be imported: {exc!r}") from exc
    finally:
        logger.setLevel(saved_level)
    return cpp_extension


def _why_no_cuda(cuda_sources: List[Path]) -> Optional[str]:
    """Why the CUDA sources are not compiled, or None when they are."""
    import torch

    if not cuda_sources:
        return "no CUDA sources"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if _cuda_home() is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    if _cuda_arch_list() is None:
        return "no GPU visible and TORCH_CUDA_ARCH_LIST unset, so no GPU architecture to compile for"
    return None


def _cuda_home() -> Optional[str]:
    """The CUDA toolkit torch.utils.cpp_extension would use (``CUDA_HOME``/``CUDA_PATH``, the
    ``nvcc`` on ``PATH``, else ``/usr/local/cuda``), found without importing it: loading a
    cached build must work where the build machinery cannot be imported."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(nvcc))
    return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None


def _cuda_arch_list() -> Optional[str]:
    """``TORCH_CUDA_ARCH_LIST``, else the visible GPUs' architectures (what torch would pick)."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if not torch.cuda.is_available():
        return None
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    # A reader sees the old file or the whole new one, never half of it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _import_so(path: Path) -> Any:
    import torch  # noqa: F401  (libtorch must be loaded before the extension)

    spec = importlib.util.spec_from_file_location(EXT_NAME, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_cached(spec: Dict[str, Any]) -> Optional[Any]:
    """Import the stamped build of exactly this key, or return None when there is none."""
    entry = spec["entry"]
    stamp = _read_json(entry / "stamp.json")
    # The key is compared field by field, not only through the folder name, so that a
    # copied or hand-edited folder for another torch is never loaded.
    if stamp is None or stamp.get("key") != spec["key"] or not isinstance(stamp.get("so"), str):
        return None
    so = entry / stamp["so"]
    if not so.is_file():
        return None
    module = _import_so(so)
    log = entry / "build.log"
    built_for = stamp["key"]["torch_version"]
    _state.update(state="loaded", built_for_torch=built_for, log=str(log) if log.is_file() else None)
    return module


def _other_builds(current: Optional[Dict[str, Any]]) -> List[str]:
    """Builds in the cache for another torch (or Python, or older sources); never loaded here."""
    root = cache_dir()
    found = set()
    try:
        stamps = sorted(root.glob("*/stamp.json"))
    except OSError:
        return []
    for path in stamps:
        key = (_read_json(path) or {}).get("key")
        if not isinstance(key, dict) or key == current:
            continue
        version = str(key.get("torch_version"))
        if current is None or version != current["torch_version"]:
            found.add(version)
        elif key.get("python") != current["python"]:
            found.add(f"{version} ({key.get('python')})")
        else:
            found.add(f"{version} (other sources or flags)")
    return sorted(found)


def _find_tools() -> Optional[str]:
    """Check that a compiler and ninja exist; return a folder to put on PATH for ninja, if needed."""
    argv = shlex.split(_compiler()) or ["c++"]
    if shutil.which(argv[0]) is None:
        raise ExtensionBuildError(
            f"no C++ compiler: {argv[0]!r} was not found (install g++ or clang++, or set CXX to one)"
        )
    if shutil.which("ninja") is not None:
        return None
    # `pip install ninja` puts the binary in the environment's scripts folder, which is not on
    # PATH when a venv's python is run without activating the venv.
    candidates = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")]
    for folder in candidates + [os.path.dirname(sys.executable)]:
        if folder and shutil.which("ninja", path=folder) is not None:
            return folder
    raise ExtensionBuildError("ninja was not found (pip install ninja)")


@contextlib.contextmanager
def _environ(**values: Optional[str]) -> Iterator[None]:
    """Set environment variables (None: leave alone) for the build, then restore them."""
    values = {name: value for name, value in values.items() if value is not None}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _build_lock(entry: Path) -> Iterator[None]:
    """One compile per build key at a time across processes; the OS drops the lock if we die."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f"{entry.name}.lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (Windows: no lock, a second compile is only slower)
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _error_line(text: str) -> str:
    """The first compiler or linker error in ninja's output, else its first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\berror\b:|undefined (symbol|reference)|cannot find", line, re.IGNORECASE):
            return line[:400]
    return lines[0][:400] if lines else "no output"


def _compile(spec: Dict[str, Any], verbose: bool, note: str) -> Any:
    """Compile and import the build of ``spec``; ``note`` is appended to the progress line and errors."""
    import torch

    entry, key = spec["entry"], spec["key"]
    try:
        ninja_dir = _find_tools()
    except ExtensionBuildError as exc:
        raise ExtensionBuildError(f"{exc}{note}") from None
    cpp_extension = _import_cpp_extension(quiet=not verbose)
    entry.mkdir(parents=True, exist_ok=True)
    _state.update(state="failed", log=str(entry / "build.log"))
    print(
        f"spurfast: compiling the C++ extension for torch {torch.__version__} "
        f"(once, a minute or two; cached in {cache_dir()}){note}",
        file=sys.stderr,
        flush=True,
    )
    # torch's own lock file is left behind if a build is killed, and then blocks every later
    # build forever; we hold our own lock, so any such file is stale.
    (entry / "lock").unlink(missing_ok=True)
    # torch renames a module whose sources changed within one process (spurfast_C_v1), and
    # skips the build of one it has built before; neither fits a build folder per key.
    versioner = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
    if versioner is not None:
        versioner.entries.pop(EXT_NAME, None)
    log = entry / "build.log"
    started = time.perf_counter()
    try:
        path = None if ninja_dir is None else ninja_dir + os.pathsep + os.environ.get("PATH", "")
        # An explicit arch list also keeps torch from warning that TORCH_CUDA_ARCH_LIST is unset.
        with _environ(PATH=path, TORCH_CUDA_ARCH_LIST=spec["cuda_arch_list"]):
            module = cpp_extension.load(
                name=EXT_NAME,
                sources=[str(p) for p in spec["sources"]],
                extra_cflags=spec["cflags"],
                extra_cuda_cflags=spec["cuda_flags"],
                extra_ldflags=list(LD_FLAGS),
                build_directory=str(entry),
                verbose=verbose,
                with_cuda=spec["with_cuda"],
            )
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        log.write_text(f"spurfast build for torch {torch.__version__} with {_compiler()}\n{text}\n")
        reason = _error_line(text)
        _write_json_atomic(
            entry / "failed.json",
            {"key": key, "reason": reason, "log": str(log), "attempt": _attempt(), "time": _now()},
        )
        raise ExtensionBuildError(
            f"compiling the C++ extension failed: {reason} (full log: {log}; `spurfast build` retries){note}"
        ) from exc
    seconds = time.perf_counter() - started
    so = Path(module.__file__)
    log.write_text(f"spurfast: built {so} for torch {torch.__version__} with {_compiler()} in {seconds:.1f} s\n")
    _write_json_atomic(
        entry / "stamp.json",
        {"key": key, "so": so.name, "built_at": _now(), "build_seconds": round(seconds, 1), "cxx": _compiler()},
    )
    (entry / "failed.json").unlink(missing_ok=True)
    _state.update(state="compiled", built_for_torch=key["torch_version"])
    return module


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _load_or_build(force: bool, verbose: bool, explicit: bool) -> Any:
    spec = _build_spec()
    entry = spec["entry"]
    _state.update(entry=str(entry), log=None, built_for_torch=None, cuda_skipped=spec["cuda_skipped"])
    if not force:
        try:
            module = _load_cached(spec)
        except Exception as exc:
            if not explicit:
                _state.update(state="unavailable")
                raise ExtensionBuildError(
                    f"the cached build in {entry} could not be imported ({exc!r}); "
                    "run `spurfast build` to rebuild it"
                ) from exc
            module, force = None, True  # an explicit build replaces a broken one
        if module is not None:
            return module
    _state.update(state="unavailable")
    others = _other_builds(spec["key"])
    note = ""
    if others:
        note = f"; the cache also holds builds for torch {', '.join(others)}, which do not match and are not used"
    with _build_lock(entry):
        if force:
            shutil.rmtree(entry, ignore_errors=True)
        else:
            module = _load_cached(spec)  # another process may have built it while we waited
            if module is not None:
                return module
            failed = _read_json(entry / "failed.json")
            same_attempt = failed and failed.get("key") == spec["key"] and failed.get("attempt") == _attempt()
            if not explicit and same_attempt:
                _state.update(state="failed", log=failed.get("log"))
                raise ExtensionBuildError(
                    f"an earlier build for this torch and these sources failed and is not retried: "
                    f"{failed.get('reason')} (log: {failed.get('log')}); fix the cause, then run `spurfast build`{note}"
                )
        return _compile(spec, verbose, note)


def load_extension() -> Optional[Any]:
    """Return the C++ extension, building it on first use, or ``None`` if it is unavailable.

    The outcome is decided once per process; on ``None``, ``_C_error`` holds the reason.

    Example::

        >>> from spurfast._extension import load_extension
        >>> ext = load_extension()
        >>> ext is None or hasattr(ext, "linear_grad_stats")
        True
    """
    global _C, _C_error, _C_tried
    with _lock:
        if _C_tried:
            return _C
        _C_tried = True
        if os.environ.get("SPURFAST_NO_EXT", "0") == "1":
            _C_error = ExtensionBuildError("native code disabled by SPURFAST_NO_EXT=1")
            _state.update(state="disabled")
            return None
        try:
            _C = _load_or_build(force=False, verbose=False, explicit=False)
        except Exception as exc:  # any failure (no compiler, compile error, bad .so) means "unavailable"
            _C, _C_error = None, exc
        return _C


def build_extension(force: bool = False, verbose: bool = False) -> str:
    """Compile the C++ extension for the installed torch now and return the path of the ``.so``.

    Without ``force``, a cached build is reused and a remembered failure is retried (an
    explicit build always tries again). ``force=True`` discards the cached build and compiles
    from scratch. ``verbose=True`` shows the compiler's output. Raises
    :class:`ExtensionBuildError` with the reason and the log path when the build fails. A
    process that had already loaded the extension keeps the old build until it restarts.
    ``SPURFAST_NO_EXT`` does not stop an explicit build; it only stops loading.

    Example::

        >>> from spurfast._extension import build_extension
        >>> path = build_extension()  # compiles once (a minute or two); later calls reuse the cache
        >>> path.endswith(".so")
        True
    """
    global _C, _C_error, _C_tried
    if not isinstance(force, bool):
        raise TypeError(f"force must be a bool, got {type(force).__name__}")
    if not isinstance(verbose, bool):
        raise TypeError(f"verbose must be a bool, got {type(verbose).__name__}")
    with _lock:
        module = _load_or_build(force=force, verbose=verbose, explicit=True)
        if _C is None and os.environ.get("SPURFAST_NO_EXT", "0") != "1":
            _C, _C_error, _C_tried = module, None, True
        return str(Path(module.__file__))


def require_extension(backend: str) -> Any:
    """Return the C++ extension or raise an error that says why it is missing and what to do."""
    ext = load_extension()
    if ext is None:
        if os.environ.get("SPURFAST_NO_EXT", "0") == "1":
            fix = "unset SPURFAST_NO_EXT"
        else:
            fix = "fix the cause and run `spurfast build` (it shows the compiler output with --verbose)"
        raise RuntimeError(
            f"spurfast backend {backend!r} needs the C++ extension, which is unavailable: {_C_error}. "
            f"To use it, {fix}; or use backend='torch'."
        ) from _C_error
    return ext


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def build_info() -> Dict[str, Any]:
    """Report which backends are usable here and, for each that is not, why.

    Loads the extension (compiling it on first use) to find out. Keys: ``torch_version``,
    ``torch_cuda``, ``triton_version``, ``extension`` (path of the loaded ``.so`` or None),
    ``backends`` (``torch``/``cpp``/``cuda``/``triton`` -> ``{"available", "reason"}``), and
    about the extension's build:

    * ``extension_built_for_torch``: the torch version the loaded build was compiled against
      (read from its stamp; None when none is loaded);
    * ``extension_state``: ``"loaded"`` (a cached build), ``"compiled"`` (built by this
      process), ``"failed"`` (compiling failed, now or remembered from earlier; see the log),
      ``"unavailable"`` (no compiler, ninja or sources, or a cached build would not import)
      or ``"disabled"`` (``SPURFAST_NO_EXT=1``);
    * ``extension_cache_dir``, ``extension_log`` (the build log, if any) and
      ``extension_other_builds`` (torch versions whose builds sit in the cache, unused here).

    Example::

        >>> import spurfast
        >>> info = spurfast.build_info()
        >>> info["backends"]["torch"]["available"]
        True
        >>> info["extension"] is None or info["extension_built_for_torch"] == info["torch_version"]
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
            "reason": f"C++ extension loaded (OpenMP threads: {ext.openmp_max_threads()})",
        }
    else:
        backends["cpp"] = {"available": False, "reason": str(_C_error)}
    cuda_compiled = bool(ext is not None and ext.with_cuda())
    cuda_device = torch.cuda.is_available()
    if cuda_compiled and cuda_device:
        backends["cuda"] = {"available": True, "reason": "compiled with CUDA sources and a GPU is visible"}
    else:
        why = []
        if not cuda_compiled:
            if ext is None:
                why.append("C++ extension unavailable")
            else:
                skipped = _state.get("cuda_skipped") or "no CUDA sources"
                why.append(skipped if skipped == "no CUDA sources" else f"CUDA sources not compiled: {skipped}")
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
    try:
        current_key: Optional[Dict[str, Any]] = _build_spec()["key"]
    except Exception:
        current_key = None
    return {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton_version": triton_version,
        "extension": None if ext is None else ext.__file__,
        "extension_built_for_torch": _state.get("built_for_torch") if ext is not None else None,
        "extension_state": _state.get("state", "unavailable"),
        "extension_cache_dir": str(cache_dir()),
        "extension_log": _state.get("log"),
        "extension_other_builds": _other_builds(current_key),
        "backends": backends,
    }


def format_build_info(info: Dict[str, Any]) -> str:
    """Human-readable text of :func:`build_info`'s report (what ``spurfast info`` prints).

    Example::

        >>> from spurfast._extension import build_info, format_build_info
        >>> text = format_build_info(build_info())
        >>> text.splitlines()[0].startswith("torch")
        True
        >>> "cpp" in text
        True
    """
    if not isinstance(info, dict) or not isinstance(info.get("backends"), dict):
        raise TypeError("info must be the dict that build_info() returns (with a 'backends' dict)")
    cuda = info.get("torch_cuda")
    lines = [
        f"torch      {info.get('torch_version')} ({'CUDA ' + cuda if cuda else 'CPU only'})",
        f"triton     {info.get('triton_version') or 'not importable'}",
        f"extension  {info.get('extension_state', 'unknown')}: "
        + (info.get("extension") or info["backends"].get("cpp", {}).get("reason", "not loaded")),
    ]
    if info.get("extension_built_for_torch"):
        lines.append(f"  built for torch {info['extension_built_for_torch']}")
    if info.get("extension_cache_dir"):
        lines.append(f"  cache      {info['extension_cache_dir']}")
    if info.get("extension_log"):
        lines.append(f"  log        {info['extension_log']}")
    if info.get("extension_other_builds"):
        lines.append(f"  unused builds in the cache for torch {', '.join(info['extension_other_builds'])}")
    lines.append("backends")
    width = max(len(name) for name in info["backends"])
    for name, entry in info["backends"].items():
        lines.append(f"  {name:<{width}}  {'yes' if entry.get('available') else 'no ':<3}  {entry.get('reason', '')}")
    return "\n".join(lines)
