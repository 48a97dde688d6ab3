"""Lazy build and load of the C++ extension, its cache, the backend fallback and build_info.

Tests that need isolation run in a subprocess with a temporary SPURFAST_CACHE_DIR. None of
them compiles the real sources into a temporary cache: a failed build uses a one-line broken
source (fails in about a second), and the cached-load tests reuse the default cache, which
the rest of the suite fills once.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROGRESS = "spurfast: compiling the C++ extension"


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    for name, value in env.items():
        if value is None:
            full_env.pop(name)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300
    )


def _progress_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith(PROGRESS)]


# Runs in a child: one op under backend="auto" (collecting warnings), then backend="cpp"; prints a JSON report.
_AUTO_THEN_CPP = """
    import json, warnings, torch, spurfast as sf
    x, g, ids = torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            grad_sq, _ = sf.ops.linear_grad_stats(x, g, ids, 2)
    assert torch.allclose(grad_sq, g ** 2 * (x ** 2).sum(1, keepdim=True))
    try:
        sf.ops.linear_grad_stats(x, g, ids, 2, backend="cpp")
        raised = None
    except RuntimeError as exc:
        raised = str(exc)
    info = sf.build_info()
    print(json.dumps({"warnings": [str(w.message) for w in caught], "raised": raised, "info": info}))
"""


def test_import_loads_no_native_code_and_queries_no_device(tmp_path):
    cache = tmp_path / "cache"
    proc = _run(
        """
        import sys, torch
        calls = []
        torch.cuda.is_available = lambda: calls.append("is_available") or False
        torch.cuda.device_count = lambda: calls.append("device_count") or 0
        import spurfast
        assert not [m for m in sys.modules if m in ("spurfast._C", "spurfast_C")], "extension imported eagerly"
        assert "torch.utils.cpp_extension" not in sys.modules, "build machinery imported eagerly"
        assert "triton" not in sys.modules, "triton imported eagerly"
        assert "spurfast_C" not in open("/proc/self/maps").read(), "extension mapped eagerly"
        assert not calls, calls
        print("ok")
        """,
        SPURFAST_CACHE_DIR=str(cache),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert not cache.exists(), "import touched the build cache"
    assert PROGRESS not in proc.stderr


def test_no_ext_falls_back_with_one_warning_and_names_the_reason(tmp_path):
    proc = _run(_AUTO_THEN_CPP, SPURFAST_NO_EXT="1", SPURFAST_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    fallbacks = [w for w in report["warnings"] if "falling back" in w]
    assert len(fallbacks) == 1, report["warnings"]
    assert "SPURFAST_NO_EXT" in fallbacks[0]
    assert "SPURFAST_NO_EXT" in report["raised"] and "backend='torch'" in report["raised"]
    info = report["info"]
    assert not info["backends"]["cpp"]["available"]
    assert "SPURFAST_NO_EXT" in info["backends"]["cpp"]["reason"]
    assert info["extension_state"] == "disabled"
    assert not _progress_lines(proc.stderr), "compiled although native code is disabled"


def test_missing_compiler_falls_back_once_and_cpp_raises_with_the_reason(tmp_path):
    cache = str(tmp_path / "cache")
    proc = _run(_AUTO_THEN_CPP, CXX="/nonexistent/c++", SPURFAST_CACHE_DIR=cache, SPURFAST_NO_EXT=None)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    fallbacks = [w for w in report["warnings"] if "falling back" in w]
    assert len(fallbacks) == 1, report["warnings"]
    assert "/nonexistent/c++" in fallbacks[0] and "compiler" in fallbacks[0]
    assert "/nonexistent/c++" in report["raised"] and "spurfast build" in report["raised"]
    assert report["info"]["extension_state"] == "unavailable"
    assert not _progress_lines(proc.stderr), "announced a compile it could not start"


@pytest.fixture
def broken_sources(tmp_path):
    if shutil.which(os.environ.get("CXX", "c++").split()[0]) is None or shutil.which("ninja") is None:
        pytest.skip("needs a C++ compiler and ninja")
    src = tmp_path / "csrc"
    src.mkdir()
    # Fails before any torch header is read, so the "build" takes about a second.
    (src / "module.cpp").write_text("#error deliberately broken source for a spurfast test\n")
    return src


def test_failed_build_warns_once_raises_for_cpp_and_is_remembered(tmp_path, broken_sources):
    cache = tmp_path / "cache"
    env = dict(SPURFAST_CACHE_DIR=str(cache), SPURFAST_CSRC_DIR=str(broken_sources), SPURFAST_NO_EXT=None)
    first = _run(_AUTO_THEN_CPP, **env)
    assert first.returncode == 0, first.stderr
    assert len(_progress_lines(first.stderr)) == 1, first.stderr
    assert str(cache) in _progress_lines(first.stderr)[0]
    report = json.loads(first.stdout)
    fallbacks = [w for w in report["warnings"] if "falling back" in w]
    assert len(fallbacks) == 1, report["warnings"]
    assert "deliberately broken" in fallbacks[0]
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    log = entry / "build.log"
    assert str(log) in fallbacks[0], "the warning does not name the log"
    assert "deliberately broken" in log.read_text()
    assert "deliberately broken" in report["raised"] and "backend='torch'" in report["raised"]
    assert report["info"]["extension_state"] == "failed"
    assert not (entry / "stamp.json").exists()
    log_mtime = log.stat().st_mtime_ns

    second = _run(_AUTO_THEN_CPP, **env)
    assert second.returncode == 0, second.stderr
    assert not _progress_lines(second.stderr), "a remembered failure was compiled again"
    assert log.stat().st_mtime_ns == log_mtime
    report = json.loads(second.stdout)
    fallbacks = [w for w in report["warnings"] if "falling back" in w]
    assert len(fallbacks) == 1 and "earlier build" in fallbacks[0] and "deliberately broken" in fallbacks[0]
    assert "spurfast build" in fallbacks[0]

    # An explicit build retries (and fails again, raising with the reason).
    forced = _run(
        """
        from spurfast._extension import ExtensionBuildError, build_extension
        try:
            build_extension(force=True)
        except ExtensionBuildError as exc:
            print(exc)
        """,
        **env,
    )
    assert forced.returncode == 0, forced.stderr
    assert len(_progress_lines(forced.stderr)) == 1, "force did not retry the remembered failure"
    assert "deliberately broken" in forced.stdout


def test_a_build_for_another_torch_is_never_loaded(tmp_path, monkeypatch):
    from spurfast import _extension

    cache = tmp_path / "cache"
    monkeypatch.setenv("SPURFAST_CACHE_DIR", str(cache))
    spec = _extension._build_spec()
    other_key = dict(spec["key"], torch_version="1.0.0", torch_git_version="0" * 40)
    # Two fakes: this key's own folder with a stamp for another torch, and another torch's folder.
    for folder in (spec["entry"], cache / "torch1.0.0-cpu-fake"):
        folder.mkdir(parents=True)
        (folder / "spurfast_C.so").write_bytes(b"not a shared object")
        (folder / "stamp.json").write_text(json.dumps({"key": other_key, "so": "spurfast_C.so"}))
    proc = _run(
        """
        import json, spurfast
        from spurfast import _extension
        ext = _extension.load_extension()
        print(json.dumps({"ext": None if ext is None else ext.__file__, "error": str(_extension._C_error),
                          "info": spurfast.build_info()}))
        """,
        SPURFAST_CACHE_DIR=str(cache),
        CXX="/nonexistent/c++",  # so that the rebuild it must attempt fails at once
        SPURFAST_NO_EXT=None,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ext"] is None
    assert "could not be imported" not in report["error"], "tried to load a build for another torch"
    assert "/nonexistent/c++" in report["error"]
    assert "1.0.0" in report["error"], "the error does not mention the other build in the cache"
    assert report["info"]["extension_other_builds"] == ["1.0.0"]


def test_cache_key_follows_sources_and_names_torch(tmp_path, monkeypatch):
    import torch

    from spurfast import _extension

    src = tmp_path / "csrc"
    shutil.copytree(_extension.source_dir(), src)
    monkeypatch.setenv("SPURFAST_CSRC_DIR", str(src))
    monkeypatch.setenv("SPURFAST_CACHE_DIR", str(tmp_path / "cache"))
    before = _extension._build_spec()
    assert before["entry"].parent == tmp_path / "cache"
    assert before["key"]["torch_version"] == torch.__version__
    assert before["key"]["torch_git_version"] == torch.version.git_version
    assert before["key"]["cxx11_abi"] == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert not any(flag.startswith("-std=") for flag in before["cflags"]), "the C++ standard is torch's to choose"
    with open(src / "module.cpp", "a") as f:
        f.write("\n// edited\n")
    assert _extension._build_spec()["entry"] != before["entry"], "an edited source would reuse the old build"


def test_cached_build_loads_without_compiler_ninja_or_build_machinery(has_ext):
    proc = _run(
        """
        import sys
        sys.modules["torch.utils.cpp_extension"] = None  # importing it now raises
        import spurfast
        from spurfast import _extension
        ext = _extension.load_extension()
        assert ext is not None, _extension._C_error
        info = spurfast.build_info()
        assert info["extension_state"] == "loaded", info["extension_state"]
        print(info["extension_built_for_torch"])
        """,
        CXX="/nonexistent/c++",
        PATH="",
        SPURFAST_NO_EXT=None,
    )
    import torch

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == torch.__version__
    assert not _progress_lines(proc.stderr)


def test_build_info_names_the_torch_the_extension_was_built_for(has_ext):
    import torch

    from spurfast._extension import build_extension, build_info, format_build_info

    info = build_info()
    assert info["extension_built_for_torch"] == torch.__version__
    assert info["extension_state"] in ("loaded", "compiled")
    assert pathlib.Path(info["extension"]).is_relative_to(info["extension_cache_dir"])
    assert build_extension() == info["extension"], "a cached build was not reused"
    text = format_build_info(info)
    assert f"built for torch {torch.__version__}" in text
    assert text.splitlines()[0].startswith(f"torch      {torch.__version__}")
    for name in ("torch", "cpp", "cuda", "triton"):
        assert f"  {name} " in text, name


def test_build_extension_and_format_build_info_check_their_arguments():
    from spurfast._extension import build_extension, format_build_info

    with pytest.raises(TypeError, match="force"):
        build_extension(force="yes")
    with pytest.raises(TypeError, match="info must be"):
        format_build_info({"torch_version": "2.4"})


def test_build_info_reports_every_backend():
    import spurfast

    info = spurfast.build_info()
    assert set(info["backends"]) >= {"torch", "cpp", "cuda", "triton"}
    for name, entry in info["backends"].items():
        assert isinstance(entry["available"], bool) and entry["reason"], name
    assert info["backends"]["torch"]["available"]
    assert "extension_built_for_torch" in info and info["extension_cache_dir"]


@pytest.mark.slow
def test_wheel_is_pure_python_with_the_sources_and_the_license(tmp_path):
    # Build from a copy so that the checkout's build/ and *.egg-info stay untouched (and no
    # stale build output of the checkout can leak into the wheel).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "_csrc")
    shutil.copytree(ROOT / "csrc", src / "csrc", ignore=ignore)
    shutil.copytree(ROOT / "spurfast", src / "spurfast", ignore=ignore)
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "deprecat" not in output.lower(), [l for l in output.splitlines() if "deprecat" in l.lower()]
    assert not [l for l in output.splitlines() if "torch" in l and ("Collecting" in l or "Downloading" in l)], (
        "the isolated build environment fetched torch"
    )
    (wheel,) = dist.glob("spurfast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for cpp in sorted((ROOT / "csrc").glob("*.cpp")):
        assert f"spurfast/_csrc/{cpp.name}" in names, names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".dylib"))], "the wheel holds compiled code"
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata


def test_cpp_backend_on_wrong_device_is_an_error():
    import torch

    import spurfast

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        spurfast.ops.linear_grad_stats(
            torch.randn(2, 3, device="cuda"), torch.randn(2, 2, device="cuda"), torch.zeros(2, dtype=torch.long), 1,
            backend="cpp",
        )


def test_build_spec_of_a_cuda_torch_needs_no_build_machinery(monkeypatch):
    """Deciding whether the CUDA sources are compiled (part of the cache key) must not import
    torch.utils.cpp_extension: a cached build has to load where it cannot be imported."""
    import torch
    from spurfast import _extension

    monkeypatch.setattr(torch.version, "cuda", "12.1")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setitem(sys.modules, "torch.utils.cpp_extension", None)  # importing it now raises
    spec = _extension._build_spec()
    assert spec["with_cuda"] is False and spec["cuda_skipped"]  # no GPU here, no arch list
    monkeypatch.setenv("CUDA_HOME", "/nonexistent-toolkit")
    assert _extension._cuda_home() == "/nonexistent-toolkit"
