"""Fused statistics kernels against the plain weight-gradient GEMM, per layer shape.

For each Linear/Conv layer shape of the scoring benchmark's models (ResNet-18 on 32x32,
ResNet-50 on 224x224, ViT-S/16 and ViT-B/16 on 224x224, the 3072-2048-2048-10 MLP, at
their benchmark batch sizes) this times

* ``cublas``: the weight gradient alone: ``grad_out.flatten(0, -2).T @ x.flatten(0, -2)``
  for Linear, ``aten.convolution_backward(..., output_mask=[False, True, False])`` for Conv;
* ``spurfast.ops.linear_grad_stats`` / ``conv_grad_stats`` (``grad_sq`` and ``group_grad``,
  4 groups) with ``--backend`` (default ``triton``) and ``method`` ``auto``, ``direct`` and
  ``gram``, through the public function (input checks included, as ``NeuronStats`` calls it);
* ``kernel``: the registered custom op ``torch.ops.spurfast.*`` with the method ``auto``
  chose, i.e. the kernels without the Python boundary (``--backend triton`` on CUDA,
  ``--backend cpp`` on CPU).

FLOPs are those of the weight-gradient GEMM, ``2*B*T*C*D`` (T positions, C output
channels, D = in_channels/groups * kh * kw), for every entry, so TFLOP/s are comparable
and ``ratio = cublas_ms / spurfast_ms`` (the issue's target: >= 0.7 for the fused kernels).
``max_rel_err_dw`` checks ``group_grad.sum(0)`` against the cuBLAS/cuDNN weight gradient.

Run by ``benchmarks/gemm_efficiency.py``; :func:`measure` takes a :class:`Settings`.

Example::

    >>> data = measure(Settings(device="cpu", backend="torch", warmup=0, repeats=1), tiny_shapes()[:1])
    >>> row = data["results"][0]
    >>> row["name"], row["error"], row["max_rel_err_dw"] < 1e-4
    ('tokens', None, True)
"""
from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from spurfast.bench.environment import environment, error_string, select_device, set_tf32_flags, tf32_flags
from spurfast.bench.timing import median_iqr, time_calls

NUM_GROUPS = 4
METHODS = ("auto", "direct", "gram")
BACKENDS = ("triton", "cpp", "torch")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LayerShape:
    """One layer call: Linear when ``kernel`` is None (x ``[B, T, D]``), else Conv2d (x ``[B, Cin, H, W]``)."""

    name: str
    model: str
    batch: int
    out_channels: int  # C
    in_channels: int  # D for Linear, Cin for Conv
    tokens: int = 1  # Linear: positions T per sample (1: x is [B, D])
    height: int = 0  # Conv input size
    width: int = 0
    kernel: Optional[int] = None
    stride: int = 1
    padding: int = 0
    groups: int = 1

    @property
    def is_conv(self) -> bool:
        return self.kernel is not None

    @property
    def out_hw(self) -> Tuple[int, int]:
        k, s, p = self.kernel, self.stride, self.padding
        return (self.height + 2 * p - k) // s + 1, (self.width + 2 * p - k) // s + 1

    @property
    def positions(self) -> int:  # T of the GEMM
        if not self.is_conv:
            return self.tokens
        ho, wo = self.out_hw
        return ho * wo

    @property
    def reduction(self) -> int:  # D of the GEMM
        if not self.is_conv:
            return self.in_channels
        return self.in_channels // self.groups * self.kernel * self.kernel

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.positions * self.out_channels * self.reduction


def _linear(name, model, batch, d_in, d_out, tokens=1):
    return LayerShape(name, model, batch, d_out, d_in, tokens=tokens)


def _conv(name, model, batch, cin, cout, hw, k, s=1, p=None):
    return LayerShape(name, model, batch, cout, cin, height=hw, width=hw, kernel=k, stride=s,
                      padding=k // 2 if p is None else p)


def _resnet50(batch: int = 64) -> List[LayerShape]:
    """torchvision ResNet-50 (v1.5: stride on the 3x3) on 224x224; one entry per distinct call shape."""
    shapes = [_conv("conv1", "resnet50", batch, 3, 64, 224, 7, 2, 3)]
    cin, hw = 64, 56
    for stage, (width, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        out = 4 * width
        pre = f"layer{stage}"
        shapes += [
            _conv(f"{pre}.0.conv1", "resnet50", batch, cin, width, hw, 1),
            _conv(f"{pre}.0.conv2", "resnet50", batch, width, width, hw, 3, stride),
            _conv(f"{pre}.0.conv3", "resnet50", batch, width, out, hw // stride, 1),
            _conv(f"{pre}.0.downsample", "resnet50", batch, cin, out, hw, 1, stride),
        ]
        hw //= stride
        shapes += [
            _conv(f"{pre}.1.conv1", "resnet50", batch, out, width, hw, 1),
            _conv(f"{pre}.1.conv2", "resnet50", batch, width, width, hw, 3),
        ]  # later blocks repeat block 1's shapes; conv3 there equals block 0's conv3
        cin = out
    shapes.append(_linear("fc", "resnet50", batch, 2048, 2))
    return shapes


def _resnet18(batch: int = 256) -> List[LayerShape]:
    """torchvision ResNet-18 unchanged on 32x32 inputs (stem to 16x16, max-pool to 8x8)."""
    shapes = [_conv("conv1", "resnet18", batch, 3, 64, 32, 7, 2, 3),
              _conv("layer1.conv", "resnet18", batch, 64, 64, 8, 3)]
    cin, hw = 64, 8
    for stage, width in ((2, 128), (3, 256), (4, 512)):
        pre = f"layer{stage}"
        shapes += [
            _conv(f"{pre}.0.conv1", "resnet18", batch, cin, width, hw, 3, 2),
            _conv(f"{pre}.0.downsample", "resnet18", batch, cin, width, hw, 1, 2),
        ]
        hw //= 2
        shapes.append(_conv(f"{pre}.conv", "resnet18", batch, width, width, hw, 3))
        cin = width
    shapes.append(_linear("fc", "resnet18", batch, 512, 10))
    return shapes


def _resnet18_cifar(batch: int = 256) -> List[LayerShape]:
    """CIFAR-style ResNet-18 on 32x32 inputs: 3x3 stride-1 stem, no max-pool, 32x32 maps in stage 1."""
    model = "resnet18_cifar"
    shapes = [_conv("conv1", model, batch, 3, 64, 32, 3), _conv("layer1.conv", model, batch, 64, 64, 32, 3)]
    cin, hw = 64, 32
    for stage, width in ((2, 128), (3, 256), (4, 512)):
        pre = f"layer{stage}"
        shapes += [_conv(f"{pre}.0.conv1", model, batch, cin, width, hw, 3, 2),
                   _conv(f"{pre}.0.downsample", model, batch, cin, width, hw, 1, 2)]
        hw //= 2
        shapes.append(_conv(f"{pre}.conv", model, batch, width, width, hw, 3))
        cin = width
    shapes.append(_linear("fc", model, batch, 512, 10))
    return shapes


def _vit(model: str, batch: int, dim: int) -> List[LayerShape]:
    """timm ViT-*/16 on 224x224: 196 patches + class token, MLP ratio 4, 2-class head on the class token."""
    tokens = 197
    return [
        _conv("patch_embed.proj", model, batch, 3, dim, 224, 16, 16, 0),
        _linear("attn.qkv", model, batch, dim, 3 * dim, tokens),
        _linear("attn.proj", model, batch, dim, dim, tokens),
        _linear("mlp.fc1", model, batch, dim, 4 * dim, tokens),
        _linear("mlp.fc2", model, batch, 4 * dim, dim, tokens),
        _linear("head", model, batch, dim, 2),
    ]


def default_shapes() -> List[LayerShape]:
    return (
        _resnet18()
        + _resnet18_cifar()
        + _resnet50()
        + _vit("vit_small", 64, 384)
        + _vit("vit_base", 32, 768)
        + [_linear("fc1", "mlp", 512, 3072, 2048), _linear("fc2", "mlp", 512, 2048, 2048),
           _linear("fc3", "mlp", 512, 2048, 10)]
    )


def tiny_shapes() -> List[LayerShape]:
    """CPU smoke-test sizes covering each code path (tokens, rank-one, strided/padded conv)."""
    return [
        _linear("tokens", "tiny", 4, 16, 8, tokens=3),
        _linear("rank1", "tiny", 4, 32, 10),
        _conv("conv3x3", "tiny", 2, 3, 4, 8, 3),
        _conv("conv1x1_s2", "tiny", 2, 4, 8, 8, 1, 2, 0),
    ]


# ---------------------------------------------------------------------------- one shape
def make_inputs(shape: LayerShape, device: torch.device, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    b = shape.batch
    if shape.is_conv:
        ho, wo = shape.out_hw
        x = torch.randn(b, shape.in_channels, shape.height, shape.width, generator=gen)
        grad_out = torch.randn(b, shape.out_channels, ho, wo, generator=gen)
    elif shape.tokens == 1:
        x = torch.randn(b, shape.in_channels, generator=gen)
        grad_out = torch.randn(b, shape.out_channels, generator=gen)
    else:
        x = torch.randn(b, shape.tokens, shape.in_channels, generator=gen)
        grad_out = torch.randn(b, shape.tokens, shape.out_channels, generator=gen)
    group_ids = torch.randint(0, NUM_GROUPS, (b,), generator=gen)
    return x.to(device, dtype), grad_out.to(device, dtype), group_ids.to(device)


def weight_shape(shape: LayerShape) -> Tuple[int, ...]:
    if shape.is_conv:
        return (shape.out_channels, shape.in_channels // shape.groups, shape.kernel, shape.kernel)
    return (shape.out_channels, shape.in_channels)


def plain_weight_grad_fn(shape: LayerShape, x, grad_out) -> Callable[[], torch.Tensor]:
    """The weight gradient alone, as cuBLAS/cuDNN (or the CPU BLAS) computes it in autograd."""
    if not shape.is_conv:
        g2, x2 = grad_out.flatten(0, -2), x.flatten(0, -2)
        return lambda: g2.t() @ x2
    weight = torch.empty(weight_shape(shape), device=x.device, dtype=x.dtype)
    s, p = [shape.stride] * 2, [shape.padding] * 2

    def fn():
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, s, p, [1, 1], False, [0, 0], shape.groups, [False, True, False]
        )[1]

    return fn


def spurfast_fn(shape: LayerShape, x, grad_out, group_ids, backend: str, method: str):
    import spurfast

    if shape.is_conv:
        return lambda: spurfast.ops.conv_grad_stats(
            x, grad_out, weight_shape(shape), shape.stride, shape.padding, 1, shape.groups, group_ids,
            NUM_GROUPS, backend=backend, method=method, check_inputs=False,
        )
    return lambda: spurfast.ops.linear_grad_stats(
        x, grad_out, group_ids, NUM_GROUPS, backend=backend, method=method, check_inputs=False
    )


def auto_method(shape: LayerShape, backend: str) -> str:
    """The method ``method="auto"`` resolves to (spurfast's cost model)."""
    from spurfast.ops._common import choose_method

    if not shape.is_conv:
        return choose_method(shape.positions, shape.out_channels, shape.reduction, backend)
    input_gram = (shape.height * shape.width, shape.in_channels) if shape.groups == 1 else None
    return choose_method(shape.positions, shape.out_channels // shape.groups, shape.reduction, backend,
                         linear=False, input_gram=input_gram)


def kernel_fn(shape: LayerShape, x, grad_out, group_ids, method: str):
    """The registered custom op, called directly (dispatches on the tensors' device)."""
    import spurfast  # noqa: F401  (registers torch.ops.spurfast)

    if shape.is_conv:
        k, s, p = [shape.kernel] * 2, [shape.stride] * 2, [shape.padding] * 2
        return lambda: torch.ops.spurfast.conv2d_grad_stats(
            x, grad_out, k, s, p, [1, 1], shape.groups, group_ids, NUM_GROUPS, method
        )
    x3, g3 = x.reshape(x.shape[0], -1, x.shape[-1]), grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])
    return lambda: torch.ops.spurfast.linear_grad_stats(x3, g3, group_ids, NUM_GROUPS, method)


def gram_bytes(shape: LayerShape) -> int:
    """Memory of the Gram path's ``[B*groups, T, T]`` float32 workspace."""
    return 4 * shape.batch * shape.groups * shape.positions ** 2


def _timed(fn, shape: LayerShape, device, settings: "Settings") -> dict:
    try:
        median, iqr = median_iqr(time_calls(fn, settings.warmup, settings.repeats, device))
        return dict(ms=median, iqr_ms=iqr, tflops=shape.flops / (median * 1e-3) / 1e12, error=None)
    except Exception as exc:  # OOM, unsupported shape, missing backend: record and go on
        return dict(ms=None, iqr_ms=None, tflops=None, error=error_string(exc, 600))


def run_shape(shape: LayerShape, device: torch.device, settings: "Settings") -> dict:
    row = dict(asdict(shape), positions=shape.positions, reduction=shape.reduction, gflop=shape.flops / 1e9,
               cublas=None, spurfast={}, max_rel_err_dw=None, error=None)
    try:
        x, grad_out, group_ids = make_inputs(shape, device, DTYPES[settings.dtype], settings.seed)
    except Exception as exc:
        row["error"] = error_string(exc, 600)
        return row
    plain = plain_weight_grad_fn(shape, x, grad_out)
    row["cublas"] = _timed(plain, shape, device, settings)
    chosen = None
    try:
        chosen = auto_method(shape, settings.backend)
    except Exception as exc:
        row["error"] = f"auto method unknown: {error_string(exc, 600)}"
    for method in settings.methods:
        if method == "gram" and gram_bytes(shape) > settings.max_gram_gib * 2**30:
            row["spurfast"][method] = dict(ms=None, iqr_ms=None, tflops=None, error=(
                f"skipped: the Gram workspace would take {gram_bytes(shape) / 2**30:.1f} GiB "
                f"(> --max-gram-gib {settings.max_gram_gib})"))
            continue
        entry = _timed(spurfast_fn(shape, x, grad_out, group_ids, settings.backend, method), shape, device, settings)
        if method == "auto":
            entry["method"] = chosen
        row["spurfast"][method] = entry
    # torch.ops.spurfast.* dispatches on the device: Triton on CUDA, the C++ kernels on CPU
    # (so on CPU it stands for the triton backend only under the interpreter, which it skips).
    kernel_backend = "triton" if device.type == "cuda" else "cpp"
    if settings.backend == kernel_backend and chosen is not None and not settings.no_kernel:
        entry = _timed(kernel_fn(shape, x, grad_out, group_ids, chosen), shape, device, settings)
        entry["method"] = chosen
        row["spurfast"]["kernel"] = entry
    cublas_ms = (row["cublas"] or {}).get("ms")
    for entry in row["spurfast"].values():
        entry["ratio"] = cublas_ms / entry["ms"] if cublas_ms and entry.get("ms") else None
    try:  # the fused op's dW must be the weight gradient
        _, group_grad = spurfast_fn(shape, x, grad_out, group_ids, settings.backend, "auto")()
        ref = plain().double()
        dw = group_grad.sum(0).reshape(ref.shape).double()
        row["max_rel_err_dw"] = ((dw - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    except Exception as exc:
        row["error"] = row["error"] or f"dW check failed: {error_string(exc, 600)}"
    del x, grad_out, group_ids, plain
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------- table
def _f(v, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def render_table(data: dict) -> str:
    """Markdown: a header (device, versions, settings), one row per shape, then the errors."""
    env, s = data.get("environment", {}), data.get("settings", {})
    lines = [
        f"**{env.get('device', '?')}** · torch {env.get('torch')} · triton {env.get('triton')} · CUDA {env.get('cuda')} · "
        f"spurfast {env.get('spurfast')} ({(env.get('spurfast_commit') or '')[:10]}) · {env.get('date', '')}",
        "",
        f"{s.get('dtype')} (TF32 {'on' if s.get('tf32') else 'off'}), backend `{s.get('backend')}`, {NUM_GROUPS} groups; "
        "TFLOP/s of the weight-gradient GEMM (2·B·T·C·D); ratio = cuBLAS time / spurfast time"
        + ("; **tiny shapes (smoke test)**" if s.get("tiny") else ""),
        "",
        "| model | layer | B | T | C | D | GFLOP | cuBLAS TFLOP/s | auto (path) TFLOP/s | auto ratio | kernel ratio "
        "| direct ratio | gram ratio | dW rel err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data.get("results", []):
        sp = r.get("spurfast", {})
        auto, kern = sp.get("auto", {}), sp.get("kernel", {})
        direct, gram = sp.get("direct", {}), sp.get("gram", {})
        lines.append(
            f"| {r['model']} | {r['name']} | {r['batch']} | {r['positions']} | {r['out_channels']} | {r['reduction']} | "
            f"{_f(r.get('gflop'), '.2f')} | {_f((r.get('cublas') or {}).get('tflops'), '.1f')} | "
            f"{_f(auto.get('tflops'), '.1f')} ({auto.get('method') or '?'}) | {_f(auto.get('ratio'), '.2f')} | "
            f"{_f(kern.get('ratio'), '.2f')} | {_f(direct.get('ratio'), '.2f')} | {_f(gram.get('ratio'), '.2f')} | "
            f"{_f(r.get('max_rel_err_dw'), '.1e')} |"
        )
    errors = [(r["model"], r["name"], k, e["error"]) for r in data.get("results", [])
              for k, e in list(r.get("spurfast", {}).items()) + [("cublas", r.get("cublas") or {})]
              if e.get("error") and not e["error"].startswith("skipped")]
    if errors:
        lines += ["", "Errors:", ""] + [f"* {m} {n} {k}: {e}" for m, n, k, e in errors]
    if data.get("skipped_shapes"):
        lines += ["", f"Not run (time limit {s.get('time_limit_s')} s): " + ", ".join(data["skipped_shapes"])]
    return "\n".join(lines)


def merge_results(old: dict, new: dict) -> dict:
    """``new`` plus the shapes of ``old`` it did not rerun; refuses (ValueError) to mix devices or settings."""
    for section, keys in (("environment", ("device", "torch")),
                          ("settings", ("backend", "dtype", "tf32", "warmup", "repeats", "tiny"))):
        for key in keys:
            if old[section].get(key) != new[section].get(key):
                raise ValueError(f"--merge: {key} differs ({old[section].get(key)!r} in the file, "
                                 f"{new[section].get(key)!r} now); write to another --out")
    rerun = {(r["model"], r["name"]) for r in new["results"]}
    runs = old["settings"].get("runs") or [old["settings"].get("argv")]
    kept = [r for r in old["results"] if (r["model"], r["name"]) not in rerun]
    done = {f"{r['model']} {r['name']}" for r in kept + new["results"]}
    return dict(new, results=kept + new["results"],
                skipped_shapes=[s for s in new.get("skipped_shapes", []) if s not in done],
                settings=dict(new["settings"], runs=runs + [new["settings"]["argv"]]))


# ---------------------------------------------------------------------------- running
@dataclass
class Settings:
    """One GEMM-efficiency run (the fields are the script's flags)."""

    device: str = "cpu"
    backend: str = "triton"
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    dtype: str = "float32"
    tf32: bool = True
    warmup: int = 5
    repeats: int = 20
    max_gram_gib: float = 8.0
    no_kernel: bool = False
    tiny: bool = False
    seed: int = 0
    time_limit_s: Optional[float] = None  # from the start: no shape starts after this
    verbose: bool = False
    argv: Optional[List[str]] = None

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"--methods must be a subset of {','.join(METHODS)}, got {bad}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {','.join(BACKENDS)}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {','.join(DTYPES)}, got {self.dtype!r}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"--time-limit-s must be positive, got {self.time_limit_s}")

    def record(self) -> dict:
        out = asdict(self)
        out.pop("verbose")
        out.update(num_groups=NUM_GROUPS, argv=list(self.argv) if self.argv is not None else None)
        return out


def select_shapes(tiny: bool = False, models: Optional[Sequence[str]] = None) -> List[LayerShape]:
    """The benchmark's shapes (or the tiny smoke-test ones), only those of ``models`` when given."""
    shapes = tiny_shapes() if tiny else default_shapes()
    if models:
        known = sorted({s.model for s in shapes})
        bad = [m for m in models if m not in known]
        if bad:
            raise ValueError(f"--models must be a subset of {','.join(known)}, got {bad}")
        shapes = [s for s in shapes if s.model in models]
    return shapes


def measure(settings: Settings, shapes: Sequence[LayerShape],
            on_shape: Optional[Callable[[dict], None]] = None) -> dict:
    """Time every shape; ``on_shape(data)`` after each (to write what was measured so far).
    Shapes that would start after ``settings.time_limit_s`` are listed in ``skipped_shapes``."""
    start = time.perf_counter()
    saved_tf32 = tf32_flags()
    try:
        device = select_device(settings.device, settings.tf32)
        data = {"benchmark": "gemm_efficiency", "environment": environment(device), "settings": settings.record(),
                "results": [], "skipped_shapes": []}
        for shape in shapes:
            if settings.time_limit_s and time.perf_counter() - start > settings.time_limit_s:
                data["skipped_shapes"].append(f"{shape.model} {shape.name}")
                continue
            row = run_shape(shape, device, settings)
            data["results"].append(row)
            if settings.verbose:
                auto = row["spurfast"].get("auto", {})
                print(f"{shape.model} {shape.name}: cublas {(row['cublas'] or {}).get('tflops')} TFLOP/s, "
                      f"auto {auto.get('tflops')} ({auto.get('method')}), ratio {auto.get('ratio')}",
                      file=sys.stderr, flush=True)
            data["wall_s"] = round(time.perf_counter() - start, 3)
            if on_shape is not None:
                on_shape(data)
        if data["skipped_shapes"]:
            print(f"time limit ({settings.time_limit_s:g} s) reached: skipped {len(data['skipped_shapes'])} shapes",
                  file=sys.stderr, flush=True)
        data["wall_s"] = round(time.perf_counter() - start, 3)
    finally:
        set_tf32_flags(saved_tf32)
    return data
