"""Benchmarks of spurfast, importable so that the ``spurfast bench`` command, the scripts in
``benchmarks/`` and the tests share one implementation.

* :mod:`spurfast.bench.throughput`: a scoring pass against plain forward+backward and
  Opacus / ``torch.func`` / BackPACK; :func:`add_arguments` and :func:`run` are the
  ``spurfast bench`` command built on it (:mod:`spurfast.bench.command`);
* :mod:`spurfast.bench.gemm`: the fused kernels against the weight-gradient GEMM per layer shape;
* :mod:`spurfast.bench.cpu_backends`: the ``cpp`` backend against the ``torch`` reference on CPU;
* :mod:`spurfast.bench.profile`: where a CPU scoring step's time goes, per layer and phase;
* :mod:`spurfast.bench.sweep`: the CPU scoring step against plain across batch sizes;
* :mod:`spurfast.bench.compiled`: recording on a ``torch.compile``'d model against eager, its
  compile times and the graph breaks dynamo reports;
* :mod:`spurfast.bench.timing`, :mod:`spurfast.bench.environment`, :mod:`spurfast.bench.models`:
  what they share.

Nothing here queries a device or imports a peer (Opacus, BackPACK, torchvision, timm) at
import time. Usage::

    import argparse, spurfast.bench as bench
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    bench.run(parser.parse_args(["--quick", "--out", "/tmp/bench-quick"]))
"""
from spurfast.bench.command import add_arguments, run

__all__ = ["add_arguments", "run"]
