"""Builds spurfast._C: C++ (OpenMP) kernels always, CUDA sources only when a CUDA
toolkit and a CUDA build of torch are both present. SPURFAST_NO_EXT=1 skips native code."""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    if os.environ.get("SPURFAST_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = bool(cuda_sources) and CUDA_HOME is not None and torch.version.cuda is not None
    extra_compile_args = {"cxx": ["-O3", "-fopenmp", "-std=c++17"]}
    define_macros = []
    if with_cuda:
        extra_compile_args["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17"]
        define_macros.append(("SPURFAST_WITH_CUDA", None))
        ext = CUDAExtension(
            "spurfast._C",
            cpp_sources + cuda_sources,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
        )
    else:
        ext = CppExtension(
            "spurfast._C",
            cpp_sources,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
