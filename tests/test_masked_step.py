"""Op level: the fused masked steps (cpp, triton, cuda) against the plain-torch reference over
100 steps with masks changing between steps; masked rows and their state bit-identical.

Tolerances (max |kernel - reference| / max |reference| after 100 steps): float64 1e-12 and
float32 2e-6 for parameters and state, where the kernels and the reference differ only in
rounding (the same operations in the same order; the reference is torch's own ops, which use
FMA in places; the Triton bias corrections are float32). bfloat16 parameters (float32 state)
are compared one step at a time from the same state: within one bfloat16 ulp.
"""
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from spurfast.ops._common import interpreting
from spurfast.ops.masked_step import (
    masked_adam_step,
    masked_adam_step_reference,
    masked_sgd_step,
    masked_sgd_step_reference,
    row_shape,
    state_dtype,
)

from _helpers import rel_err

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}

# A conv weight, the same in channels-last layout, a linear weight, a bias, a 0-d scalar, an empty tensor.
SHAPES = [(6, 3, 3, 3), "channels_last", (5, 7), (6,), (), (0, 4)]
SMALL_SHAPES = [(6, 3, 3, 3), (5, 7), (6,), ()]

ADAM_CONFIGS = {
    "adam": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False),
    "adam_l2_amsgrad_maximize": dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                                     decoupled_weight_decay=False, amsgrad=True, maximize=True),
    "adamw": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True),
    "adamw_beta1_small": dict(lr=1e-3, betas=(0.3, 0.9), eps=1e-8, weight_decay=0.01, decoupled_weight_decay=True),
}
SGD_CONFIGS = {
    "plain": dict(lr=0.05),
    "momentum_dampening_l2": dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov_maximize": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1, maximize=True),
}


def _params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if shape == "channels_last":
            out.append(torch.randn(4, 3, 2, 2, generator=g).to(dtype).contiguous(memory_format=torch.channels_last))
        else:
            out.append(torch.randn(shape, generator=g).to(dtype))
    return out


def _masks(params, step, gen):
    """Masks changing every few steps: every row, random rows, none, a whole tensor frozen."""
    phase = (step // 7) % 4
    out = []
    for i, p in enumerate(params):
        if phase == 0 or (phase == 3 and i % 2 == 0):
            out.append(None)
        elif phase == 2 and i == 0:
            out.append(torch.zeros(row_shape(p), dtype=torch.bool))
        else:
            out.append(torch.rand(row_shape(p), generator=gen) < 0.6)
    return out


def _adam_state(params, amsgrad, device="cpu"):
    make = lambda: [torch.zeros(p.shape, dtype=state_dtype(p.dtype), device=device).as_strided(p.shape, p.stride())
                    .copy_(torch.rand(p.shape) * 0.01) for p in params]
    return dict(exp_avgs=make(), exp_avg_sqs=make(), max_exp_avg_sqs=make() if amsgrad else None,
                steps=[torch.full(row_shape(p), 2.0, device=device) for p in params])


def _clone(tensors):
    return None if tensors is None else [t.clone() for t in tensors]


def _assert_masked_rows_unchanged(before, after, active):
    for b, a, act in zip(before, after, active):
        if act is None:
            continue
        frozen = ~act
        assert torch.equal(b[frozen], a[frozen]), "a masked row changed"


def _run_adam(backend, dtype, config, shapes=SHAPES, steps=100, device="cpu"):
    """Run `backend` and the reference side by side; return (kernel, reference) final tensors."""
    amsgrad = config.get("amsgrad", False)
    params = [p.to(device) for p in _params(shapes, dtype)]
    ref_params = _clone(params)
    state = _adam_state(params, amsgrad, device)
    ref = {k: _clone(v) for k, v in state.items()}
    gen = torch.Generator().manual_seed(1)
    kw = {k: v for k, v in config.items() if k != "betas"}
    beta1, beta2 = config["betas"]
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(dtype).to(device).as_strided(p.shape, p.stride())
                 for p in params]
        active = [None if a is None else a.to(device) for a in _masks(params, step, gen)]
        before = [_clone(params), _clone(state["exp_avgs"]), _clone(state["exp_avg_sqs"]), _clone(state["steps"])]
        masked_adam_step(params, grads, state["exp_avgs"], state["exp_avg_sqs"], state["steps"], active,
                         max_exp_avg_sqs=state["max_exp_avg_sqs"], betas=config["betas"], backend=backend, **kw)
        after = [params, state["exp_avgs"], state["exp_avg_sqs"], state["steps"]]
        for b, a in zip(before, after):
            _assert_masked_rows_unchanged(b, a, active)
        masked_adam_step_reference(ref_params, grads, ref["exp_avgs"], ref["exp_avg_sqs"], ref["max_exp_avg_sqs"],
                                   ref["steps"], active, beta1=beta1, beta2=beta2,
                                   amsgrad=amsgrad, maximize=config.get("maximize", False), **{
                                       k: v for k, v in kw.items() if k not in ("amsgrad", "maximize")})
    return (params, state), (ref_params, ref)


def _assert_close(got, want, dtype):
    for g, w in zip(got, want):
        if w.numel():
            assert rel_err(g.cpu(), w.cpu()) <= TOL[dtype]


@pytest.mark.usefixtures("has_ext")
@pytest.mark.parametrize("name", list(ADAM_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_adam_matches_reference_over_100_steps(name, dtype, one_thread):
    (params, state), (ref_params, ref) = _run_adam("cpp", dtype, ADAM_CONFIGS[name])
    _assert_close(params, ref_params, dtype)
    _assert_close(state["exp_avgs"], ref["exp_avgs"], dtype)
    _assert_close(state["exp_avg_sqs"], ref["exp_avg_sqs"], dtype)
    if state["max_exp_avg_sqs"] is not None:
        _assert_close(state["max_exp_avg_sqs"], ref["max_exp_avg_sqs"], dtype)
    assert all(torch.equal(a, b) for a, b in zip(state["steps"], ref["steps"]))
    assert params[1].is_contiguous(memory_format=torch.channels_last)  # the layout is kept


def _run_sgd(backend, dtype, config, shapes=SHAPES, steps=100, device="cpu"):
    params = [p.to(device) for p in _params(shapes, dtype)]
    ref_params = _clone(params)
    momentum = config.get("momentum", 0.0)
    buffers = [torch.zeros(p.shape, dtype=state_dtype(p.dtype), device=device).as_strided(p.shape, p.stride())
               for p in params] if momentum else []
    ref_buffers = _clone(buffers)
    steps_ = [torch.zeros(row_shape(p), device=device) for p in params]
    ref_steps = _clone(steps_)
    gen = torch.Generator().manual_seed(2)
    full = dict(lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    full.update(config)
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(dtype).to(device).as_strided(p.shape, p.stride())
                 for p in params]
        active = [None if a is None else a.to(device) for a in _masks(params, step + 3, gen)]
        before = [_clone(params), _clone(buffers), _clone(steps_)]
        masked_sgd_step(params, grads, buffers, steps_, active, backend=backend, **config)
        for b, a in zip(before, [params, buffers, steps_]):
            _assert_masked_rows_unchanged(b, a, active)
        masked_sgd_step_reference(ref_params, grads, ref_buffers, ref_steps, active, **full)
    return (params, buffers, steps_), (ref_params, ref_buffers, ref_steps)


@pytest.mark.usefixtures("has_ext")
@pytest.mark.parametrize("name", list(SGD_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_sgd_matches_reference_over_100_steps(name, dtype, one_thread):
    (params, buffers, steps), (ref_params, ref_buffers, ref_steps) = _run_sgd("cpp", dtype, SGD_CONFIGS[name])
    _assert_close(params, ref_params, dtype)
    _assert_close(buffers, ref_buffers, dtype)
    assert all(torch.equal(a, b) for a, b in zip(steps, ref_steps))


def _bf16_one_step_each(backend, device, sgd=False, steps=100):
    """bfloat16 parameters, float32 state: from the same state, every step is within one bf16 ulp."""
    gen = torch.Generator().manual_seed(3)
    params = [p.to(device) for p in _params(SMALL_SHAPES, torch.bfloat16)]
    state = _adam_state(params, amsgrad=False, device=device)
    buffers = [torch.zeros(p.shape, device=device) for p in params]
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16).to(device) for p in params]
        active = [None if a is None else a.to(device) for a in _masks(params, step, gen)]
        ref_params = _clone(params)
        if sgd:
            ref_buffers, ref_steps = _clone(buffers), _clone(state["steps"])
            kw = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False, maximize=False)
            masked_sgd_step(params, grads, buffers, state["steps"], active, backend=backend, **kw)
            masked_sgd_step_reference(ref_params, grads, ref_buffers, ref_steps, active, **kw)
            _assert_close(buffers, ref_buffers, torch.float32)
        else:
            ref = {k: _clone(v) for k, v in state.items()}
            kw = dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
            masked_adam_step(params, grads, state["exp_avgs"], state["exp_avg_sqs"], state["steps"], active,
                             backend=backend, **kw)
            masked_adam_step_reference(ref_params, grads, ref["exp_avgs"], ref["exp_avg_sqs"], None, ref["steps"],
                                       active, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False, maximize=False, **kw)
            _assert_close(state["exp_avgs"], ref["exp_avgs"], torch.float32)
            _assert_close(state["exp_avg_sqs"], ref["exp_avg_sqs"], torch.float32)
        for p, r in zip(params, ref_params):
            assert p.dtype == torch.bfloat16
            ulp = r.float().abs().clamp_min(1e-30) * 2.0 ** -7
            assert bool(((p.float() - r.float()).abs() <= ulp).all())
        for p, r, a in zip(params, ref_params, active):
            if a is not None:
                assert torch.equal(p[~a], r[~a])


@pytest.mark.usefixtures("has_ext")
@pytest.mark.parametrize("sgd", [False, True], ids=["adamw", "sgd"])
def test_cpp_bfloat16_params_float32_state(sgd, one_thread):
    _bf16_one_step_each("cpp", "cpu", sgd=sgd, steps=30)


@pytest.mark.usefixtures("has_ext")
def test_masked_rows_are_not_read(one_thread):
    """NaN in a masked row's parameter, gradient and state stays there and reaches nothing else."""
    params = _params([(8, 5), (8,)], torch.float32)
    state = _adam_state(params, amsgrad=True)
    grads = [torch.randn(p.shape) for p in params]
    active = [torch.tensor([True, False] * 4), torch.tensor([False, True] * 4)]
    for tensors in (params, grads, state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"]):
        for t, a in zip(tensors, active):
            t[~a] = float("nan")
    masked_adam_step(params, grads, state["exp_avgs"], state["exp_avg_sqs"], state["steps"], active,
                     max_exp_avg_sqs=state["max_exp_avg_sqs"], amsgrad=True, lr=0.1, backend="cpp")
    for tensors in (params, state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"]):
        for t, a in zip(tensors, active):
            assert bool(t[a].isfinite().all()) and bool(t[~a].isnan().all())


def test_element_masks_need_the_reference_or_auto(has_ext):
    p = torch.randn(4, 3)
    active = [torch.rand(4, 3) > 0.5]
    state = dict(exp_avgs=[torch.zeros(4, 3)], exp_avg_sqs=[torch.zeros(4, 3)], steps=[torch.zeros(4, 3)])
    with pytest.raises(ValueError, match=r"backend='cpp' cannot step params\[0\].*element mask"):
        masked_adam_step([p], [torch.randn(4, 3)], **state, active=active, backend="cpp")
    before = p.clone()
    grad = torch.randn(4, 3)
    masked_adam_step([p], [grad], **state, active=active, backend="auto")  # routed to the reference
    assert torch.equal(p[~active[0]], before[~active[0]])
    assert not torch.equal(p[active[0]], before[active[0]])
    assert state["steps"][0].tolist() == active[0].float().tolist()
    with pytest.raises(ValueError, match=r"active\[0\] is an element mask, which needs per-element steps\[0\]"):
        masked_adam_step([p], [grad], [torch.zeros(4, 3)], [torch.zeros(4, 3)], [torch.zeros(4)], active)


def test_inputs_are_checked_before_anything_changes():
    p, g = torch.randn(3, 2), torch.randn(3, 2)
    m, v, s = torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3)
    p2, m2 = torch.randn(4), torch.zeros(4)
    before = [t.clone() for t in (p, m, v, s, p2)]
    bad = [
        (dict(grads=[g, torch.randn(3)]), r"grads\[1\] must be a torch.float32 tensor of shape \[4\]"),
        (dict(exp_avgs=[m, torch.zeros(4, dtype=torch.float64)]), r"exp_avgs\[1\] must be a torch.float32"),
        (dict(steps=[s, torch.zeros(5)]), r"steps\[1\] must be a float32 tensor"),
        (dict(active=[torch.ones(3), None]), r"active\[0\] must be None or a bool tensor"),
        (dict(steps=[s]), r"steps must be a list of 2 tensors"),
    ]
    for override, message in bad:
        kwargs = dict(params=[p, p2], grads=[g, torch.randn(4)], exp_avgs=[m, m2], exp_avg_sqs=[v, torch.zeros(4)],
                      steps=[s, torch.zeros(4)], active=None)
        kwargs.update(override)
        with pytest.raises(ValueError, match=message):
            masked_adam_step(**kwargs, backend="torch")
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        masked_adam_step([p], [g], [m], [v], [s], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="amsgrad=True needs max_exp_avg_sqs"):
        masked_adam_step([p], [g], [m], [v], [s], amsgrad=True)
    with pytest.raises(ValueError, match="nesterov momentum requires"):
        masked_sgd_step([p], [g], [m], [s], nesterov=True, momentum=0.9, dampening=0.1)
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_sgd_step([p], [g], [], [s], backend="gpu")
    assert all(torch.equal(a, b) for a, b in zip(before, (p, m, v, s, p2)))


@pytest.mark.usefixtures("has_ext")
def test_mixed_dtypes_are_stepped_per_dtype(one_thread):
    params = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64), torch.randn(2, 2).bfloat16()]
    grads = [torch.randn_like(p) for p in params]
    state = _adam_state(params, amsgrad=False)
    ref_params, ref = _clone(params), {k: _clone(v) for k, v in state.items()}
    active = [torch.tensor([True, False, True]), None, torch.tensor([False, True])]
    masked_adam_step(params, grads, state["exp_avgs"], state["exp_avg_sqs"], state["steps"], active, lr=0.1)
    masked_adam_step_reference(ref_params, grads, ref["exp_avgs"], ref["exp_avg_sqs"], None, ref["steps"], active,
                               lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                               decoupled_weight_decay=False, amsgrad=False, maximize=False)
    for p, r in zip(params, ref_params):
        assert rel_err(p.float(), r.float()) <= 1e-6


@pytest.mark.usefixtures("has_ext")
def test_registered_op_passes_opcheck():
    params = [torch.randn(3, 4), torch.randn(4)]
    args = ([p.clone() for p in params], [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params], [], [torch.zeros(3), torch.zeros(4)],
            [torch.tensor([True, False, True]), None], 1e-3, 0.9, 0.999, 1e-8, 0.01, True, False, False)
    torch.library.opcheck(torch.ops.spurfast.masked_adam_step.default, args)
    sgd_args = ([p.clone() for p in params], [torch.randn_like(p) for p in params],
                [torch.zeros_like(p) for p in params], [torch.zeros(3), torch.zeros(4)], [None, None],
                0.1, 0.9, 0.0, 0.0, False, False)
    torch.library.opcheck(torch.ops.spurfast.masked_sgd_step.default, sgd_args)


# ------------------------------------------------------------------------------ Triton
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def _needs_triton():
    pytest.importorskip("triton")
    if TRITON_DEVICE == "cpu" and not interpreting():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before Triton is imported")


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("name", ["adam_l2_amsgrad_maximize", "adamw"])
def test_triton_adam_matches_reference_over_100_steps(name):
    _needs_triton()
    (params, state), (ref_params, ref) = _run_adam("triton", torch.float32, ADAM_CONFIGS[name], shapes=SMALL_SHAPES,
                                                   device=TRITON_DEVICE)
    _assert_close(params, ref_params, torch.float32)
    _assert_close(state["exp_avgs"], ref["exp_avgs"], torch.float32)
    _assert_close(state["exp_avg_sqs"], ref["exp_avg_sqs"], torch.float32)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(state["steps"], ref["steps"]))


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("name", ["plain", "momentum_dampening_l2", "nesterov_maximize"])
def test_triton_sgd_matches_reference_over_100_steps(name):
    _needs_triton()
    (params, buffers, steps), (ref_params, ref_buffers, ref_steps) = _run_sgd(
        "triton", torch.float32, SGD_CONFIGS[name], shapes=SMALL_SHAPES, device=TRITON_DEVICE)
    _assert_close(params, ref_params, torch.float32)
    _assert_close(buffers, ref_buffers, torch.float32)


@pytest.mark.usefixtures("triton_interpreter")
def test_triton_bfloat16_params_float32_state():
    _needs_triton()
    _bf16_one_step_each("triton", TRITON_DEVICE, steps=15)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("sgd", [False, True], ids=["adamw", "sgd"])
def test_gpu_kernels_bfloat16_over_100_steps(backend, sgd):
    if backend == "cuda":
        from spurfast._extension import load_extension

        ext = load_extension()
        if ext is None or not ext.with_cuda():
            pytest.skip("the extension was built without its CUDA sources")
    _bf16_one_step_each(backend, "cuda", sgd=sgd, steps=100)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kernels_float32_over_100_steps(backend):
    if backend == "cuda":
        from spurfast._extension import load_extension

        ext = load_extension()
        if ext is None or not ext.with_cuda():
            pytest.skip("the extension was built without its CUDA sources")
    (params, state), (ref_params, ref) = _run_adam(backend, torch.float32, ADAM_CONFIGS["adam_l2_amsgrad_maximize"],
                                                   device="cuda")
    _assert_close(params, ref_params, torch.float32)
    (params, buffers, _), (ref_params, ref_buffers, _) = _run_sgd(backend, torch.float32,
                                                                  SGD_CONFIGS["momentum_dampening_l2"], device="cuda")
    _assert_close(params, ref_params, torch.float32)
    _assert_close(buffers, ref_buffers, torch.float32)


# ------------------------------------------------------------------------ CUDA C++ compile
@pytest.mark.slow
def test_cuda_source_compiles_for_hopper(tmp_path):
    """csrc/cuda/masked_step.cu compiles with nvcc for sm_90 against this torch's headers, even
    where torch is a CPU build (its headers lack one generated file, stubbed here)."""
    nvcc = shutil.which("nvcc") or next(iter(sorted(pathlib.Path("/usr/local").glob("cuda*/bin/nvcc"))), None)
    if nvcc is None:
        pytest.skip("no nvcc (CUDA toolkit) found")
    from torch.utils.cpp_extension import include_paths
    import sysconfig

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [str(tmp_path / "stub"), *include_paths(), sysconfig.get_paths()["include"]]
    cmd = [str(nvcc), "-c", str(ROOT / "csrc" / "cuda" / "masked_step.cu"), "-o", str(tmp_path / "masked_step.o"),
           "-DSPURFAST_WITH_CUDA", "-std=c++17", "-O3", "--use_fast_math", "-arch=sm_90", "-Xcompiler", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-diag-suppress", "3306"]
    cmd += [f"-I{p}" for p in includes]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "masked_step.o").stat().st_size > 0


# ---------------------------------------------------------------------------- benchmark
def test_benchmark_quick_writes_json_and_table(tmp_path, one_thread):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("masked_step_bench", ROOT / "benchmarks" / "masked_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["masked_step_bench"] = module
    spec.loader.exec_module(module)
    out = tmp_path / "run"
    data = module.main(["--quick", "--out", str(out), "--threads", "1"])
    written = json.loads((out / "masked_step.json").read_text())
    assert written["settings"]["quick"] is True
    rows = written["rows"]
    assert {r["masked_fraction"] for r in rows} == {0.0, 0.01, 0.5}
    for row in rows:
        for key in ("spurfast_ms", "torch_ms", "copy_ms", "bytes_moved", "copy_fraction", "speedup_vs_torch"):
            assert row[key] > 0
        assert row["max_rel_err_vs_torch"] <= 1e-5
        assert row["masked_rows_unchanged"] is True
    table = (out / "masked_step.md").read_text()
    assert "| masked rows |" in table and data["rows"] == rows
