"""Lazy loading of the compiled module, backend fallback and build_info."""
import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300
    )


def test_import_loads_no_native_code_and_queries_no_device():
    proc = _run(
        """
        import sys, torch
        calls = []
        torch.cuda.is_available = lambda: calls.append("is_available") or False
        torch.cuda.device_count = lambda: calls.append("device_count") or 0
        import spurfast
        assert "spurfast._C" not in sys.modules, "extension imported eagerly"
        assert "triton" not in sys.modules, "triton imported eagerly"
        assert not calls, calls
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_no_ext_falls_back_with_one_warning_and_names_the_reason():
    proc = _run(
        """
        import warnings, torch, spurfast as sf
        x, g, ids = torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                grad_sq, _ = sf.ops.linear_grad_stats(x, g, ids, 2)
        assert len([w for w in caught if "falling back" in str(w.message)]) == 1, [str(w.message) for w in caught]
        assert torch.allclose(grad_sq, g ** 2 * (x ** 2).sum(1, keepdim=True))
        info = sf.build_info()
        assert not info["backends"]["cpp"]["available"]
        assert "SPURFAST_NO_EXT" in info["backends"]["cpp"]["reason"]
        try:
            sf.ops.linear_grad_stats(x, g, ids, 2, backend="cpp")
        except RuntimeError as exc:
            assert "SPURFAST_NO_EXT" in str(exc) and "backend='torch'" in str(exc)
            print("ok")
        """,
        SPURFAST_NO_EXT="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_build_info_reports_every_backend():
    import spurfast

    info = spurfast.build_info()
    assert set(info["backends"]) >= {"torch", "cpp", "cuda", "triton"}
    for name, entry in info["backends"].items():
        assert isinstance(entry["available"], bool) and entry["reason"], name
    assert info["backends"]["torch"]["available"]


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
