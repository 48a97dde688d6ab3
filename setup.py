"""spurfast installs as pure Python; its C++ extension is compiled on first use.

Installing builds nothing native and imports no torch, so pip never puts a second torch in
an isolated build environment, and the extension is always compiled against the torch that
is installed at run time (``spurfast/_extension.py``; ``spurfast build`` does it ahead of
time). A wheel ships the C++/CUDA sources as ``spurfast/_csrc/``; an editable install reads
the checkout's ``csrc/`` directly.
"""
import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
SOURCE_PATTERNS = ("*.cpp", "*.h", "*.cu", "*.cuh")


class build_py_with_csrc(build_py):
    """Copy ``csrc/**`` to ``spurfast/_csrc/`` in the wheel, where the run-time build finds it."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install compiles from the checkout's csrc/
        csrc = os.path.join(ROOT, "csrc")
        sources = [p for pat in SOURCE_PATTERNS for p in glob.glob(os.path.join(csrc, "**", pat), recursive=True)]
        if not sources:
            raise RuntimeError(f"no C++ sources under {csrc}; a source distribution must include csrc/")
        for src in sorted(sources):
            dst = os.path.join(self.build_lib, "spurfast", "_csrc", os.path.relpath(src, csrc))
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst)


setup(cmdclass={"build_py": build_py_with_csrc})
