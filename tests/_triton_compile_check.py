"""Compile every Triton kernel ahead of time for a GPU target, without a GPU.

Run by tests/test_triton_compile.py in a subprocess with TRITON_INTERPRET=0; exits 3 when
this Triton's ahead-of-time compile API differs from the one used here.
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import spurfast.ops._triton.ablation_stats as ablation_kernels
import spurfast.ops._triton.activation_stats as act_kernels
import spurfast.ops._triton.grad_stats as grad_kernels

STRIDES = {"sxn", "sxc", "sxh", "sxw", "sgn", "sgc", "sgl", "sgp", "syn", "syc", "syp"}


def compile_kernel(kernel, constexprs, pointer_dtypes, target):
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn  # unwrap autotuners
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_dtypes.get(name, "fp32")
        else:
            signature[name] = "i64" if name in STRIDES else "i32"
    try:
        source = ASTSource(fn=fn, signature=signature,
                           constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    except TypeError:  # older Triton (3.0 checked): constexprs left out of the signature, passed by name
        source = ASTSource(fn=fn, signature={k: v for k, v in signature.items() if v != "constexpr"},
                           constants=dict(constexprs))
    return triton.compile(source, target=target)


# The masked optimizer steps' scalars are floats and their tables int64: their own signatures.
def compile_masked_step(arch: int) -> None:
    import spurfast.ops._triton.masked_step as step_kernels

    target = GPUTarget("cuda", arch, 32)
    tables = {"block_tensor_ptr": "*i32", "block_start_ptr": "*i64", "numel_ptr": "*i64", "row_len_ptr": "*i64"}

    def signature(kernel, param_dtype, constexprs):
        fn = kernel
        while not isinstance(fn, triton.runtime.JITFunction):
            fn = fn.fn
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in tables:
                sig[name] = tables[name]
            elif name.endswith("_addr_ptr"):
                sig[name] = "*i64"
            elif name == "p_like_ptr":
                sig[name] = "*" + param_dtype
            elif name == "s_like_ptr":
                sig[name] = "*fp32"
            else:
                sig[name] = "fp32"
        return fn, sig

    def build(kernel, param_dtype, constexprs):
        fn, sig = signature(kernel, param_dtype, constexprs)
        try:
            source = ASTSource(fn=fn, signature=sig,
                               constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        except TypeError:  # older Triton: constexprs left out of the signature
            source = ASTSource(fn=fn, signature={k: v for k, v in sig.items() if v != "constexpr"},
                               constants=dict(constexprs))
        triton.compile(source, target=target)

    for dtype in ("fp32", "bf16", "fp16"):
        for amsgrad, l2, decoupled, lerp_low in ((False, False, True, True), (True, True, False, False)):
            build(step_kernels._masked_adam_kernel, dtype, dict(AMSGRAD=amsgrad, L2=l2, DECOUPLED=decoupled,
                                                                LERP_LOW=lerp_low, BLOCK=step_kernels.BLOCK))
        for momentum, nesterov, l2 in ((True, True, True), (True, False, False), (False, False, True)):
            build(step_kernels._masked_sgd_kernel, dtype, dict(MOMENTUM=momentum, NESTEROV=nesterov, L2=l2,
                                                               BLOCK=step_kernels.BLOCK))


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    tile = dict(BLOCK_L=32, BLOCK_C=64, BLOCK_K=64)
    for dtype in ("fp32", "bf16", "fp16"):
        precision = "ieee" if dtype == "fp32" else "tf32"
        pointers = {"x_ptr": dtype, "g_ptr": dtype, "order_ptr": "i64", "seg_ptr": "i64"}
        conv = dict(KH=3, KW=3, PRECISION=precision)
        for atomic in (True, False):
            compile_kernel(grad_kernels._direct_kernel, dict(conv, ATOMIC=atomic, **tile), pointers, target)
        compile_kernel(grad_kernels._group_gemm_kernel, dict(conv, **tile), pointers, target)
        compile_kernel(grad_kernels._gram_kernel, dict(conv, BLOCK_L=32, BLOCK_K=32), pointers, target)
        compile_kernel(grad_kernels._gram_contract_kernel, dict(PRECISION="ieee", BLOCK_L=32, BLOCK_C=32),
                       {"g_ptr": dtype}, target)
        compile_kernel(act_kernels._channel_means_kernel, dict(BLOCK_C=64, BLOCK_P=64), {"y_ptr": dtype}, target)
        for has_bias in (True, False):
            compile_kernel(ablation_kernels._ablation_kernel, dict(HAS_BIAS=has_bias, BLOCK_C=64, BLOCK_P=64),
                           {"y_ptr": dtype, "g_ptr": dtype}, target)
    compile_kernel(act_kernels._group_moments_kernel, dict(BLOCK_C=128),
                   {"order_ptr": "i64", "seg_ptr": "i64", "mean_ptr": "fp64", "m2_ptr": "fp64"}, target)
    compile_masked_step(arch)
    print("compiled")


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]))
    except (TypeError, AttributeError, ImportError) as exc:  # a different compile API
        print(f"unsupported triton {triton.__version__} compile API: {exc!r}")
        sys.exit(3)

