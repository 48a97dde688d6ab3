"""Throughput of a spurfast scoring pass against plain training and per-sample-gradient peers.

A *scoring pass* is one forward and backward of the batch loss inside
``NeuronStats.record`` (per-sample ``grad_sq``, ``group_grad`` and activation statistics
for every Linear/Conv layer, 4 groups). It is timed against

* ``plain``: the same forward + backward without spurfast (the cost to beat);
* ``opacus``: ``GradSampleModule`` per-sample gradients, then squared row norms;
* ``func``: ``torch.func.vmap(grad(...))`` over ``functional_call``, then squared row norms;
* ``backpack``: BackPACK ``BatchGrad`` per-sample gradients, then squared row norms
  (``extend(model)``; fails on torchvision ResNets, whose in-place ``+=``/ReLU modify
  outputs of hooked modules; the error is recorded);
* ``backpack_fx``: the same after ``extend(model, use_converter=True)``, BackPACK's
  torch.fx rewrite of the graph that makes residual networks work.

Every method sees the same model (a fresh copy of one initialisation), batch and labels.
Only Linear/Conv weights require grad (biases and norm parameters are frozen), the model
is in eval mode (BatchNorm uses running statistics, Dropout is off) and TF32 is allowed,
for all methods alike. Each method's per-sample, per-neuron squared norms
``||d l_n / d W[c]||^2`` are compared with those of the first method that produced them:
max relative error = max |a - ref| / max |ref| over all layers concatenated.

A method whose package is not importable, or a model whose library (torchvision, timm) is
not, is *skipped* with the reason; a method that fails records its *error*; neither stops
the run. Timing: per batch, median (and IQR) of CUDA-event timings after warm-up on GPU,
``time.perf_counter`` on CPU; ``budget_s`` cuts a slow method's repeats and
``time_limit_s`` skips what would start after it. Peak memory (GPU):
``torch.cuda.max_memory_allocated``, reset before each method; (CPU) the resident-set growth
during one call, measured for every method after all timings (:func:`cpu_memory_pass`).
``pairs`` (CPU) also times spurfast against plain in alternating rounds (:func:`paired_ratios`):
single-run ratios swing with the load of a shared machine, per-round ratios much less.

Example::

    >>> s = Settings(models=["mlp"], methods=["spurfast", "plain"], batch_sizes={"mlp": 4},
    ...              warmup=0, repeats=1, tiny=True, spurfast_backend="torch")
    >>> data = measure(s)
    >>> rows = data["results"]["mlp"]["methods"]
    >>> rows["spurfast"]["max_rel_err"], rows["plain"]["error"]
    (0.0, None)
"""
from __future__ import annotations

import copy
import gc
import math
import multiprocessing
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from spurfast.bench.environment import environment, error_string, select_device, set_tf32_flags, tf32_flags
from spurfast.bench.models import (
    ALL_MODELS,
    MODEL_SPECS,
    MissingDependency,
    build_model,
    prepare_model,
    tracked_layers,
)
from spurfast.bench.peers import ALL_METHODS, NUM_GROUPS, SETUPS, missing_peer
from spurfast.bench.timing import (
    PeakRSS,
    interleaved,
    median_iqr,
    mmap_large_allocations,
    peak_rss_supported,
    time_calls,
)

# Targets of the GPU issue for the spurfast scoring pass, relative to plain forward+backward.
TIME_TARGET, MEM_TARGET = 1.15, 1.2
ROW_FIELDS = ("time_ms_median", "time_ms_iqr", "samples_per_s", "peak_mem_bytes", "peak_mem_kind", "stats_bytes",
              "sample_bytes", "ratio_to_plain", "mem_ratio_to_plain", "max_rel_err", "repeats", "wall_s", "skipped", "error")
PAIRED_METHODS = ("spurfast", "spurfast_nogroup")  # timed against plain in alternation when Settings.pairs > 0


@dataclass
class Settings:
    """One throughput run. ``batch_sizes`` maps each model to its batch (default: the GPU
    issue's); ``allow_standin`` builds a model's torchvision-free stand-in when its library
    is missing (the CPU defaults), instead of skipping it."""

    models: List[str]
    methods: List[str] = field(default_factory=lambda: list(ALL_METHODS))
    device: str = "cpu"
    batch_sizes: Dict[str, int] = field(default_factory=dict)
    warmup: int = 5
    repeats: int = 20
    tiny: bool = False
    spurfast_backend: str = "auto"
    tf32: bool = True
    seed: int = 0
    budget_s: Optional[float] = None  # per method: cut repeats so the timed calls take about this
    time_limit_s: Optional[float] = None  # from the start: no model or method starts after this
    allow_standin: bool = False
    threads: Optional[int] = None  # torch.set_num_threads for the run (CPU), restored after; None: as set
    pairs: int = 0  # CPU: rounds of plain and spurfast steps in alternation, for per-round ratios (0: none)
    memory: bool = False  # CPU: the peak-memory pass after all timings (cpu_memory_pass; a process per model)
    verbose: bool = False  # every row to stderr (one line per method is always printed)
    quick: bool = False
    batch_size_override: Optional[str] = None  # the --batch-size text, so that --merge refuses mixtures
    argv: Optional[List[str]] = None

    def __post_init__(self):
        bad = [m for m in self.models if m not in MODEL_SPECS]
        if bad or not self.models:
            raise ValueError(f"--models must be a non-empty subset of {','.join(ALL_MODELS)}, got {self.models}")
        bad = [m for m in self.methods if m not in SETUPS]
        if bad or not self.methods:
            raise ValueError(f"--methods must be a non-empty subset of {','.join(ALL_METHODS)}, got {self.methods}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        for name, b in self.batch_sizes.items():
            if b < 1:
                raise ValueError(f"--batch-size must be positive, got {b} for {name}")
        if self.pairs < 0:
            raise ValueError(f"--pairs must be >= 0, got {self.pairs}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        for flag, v in (("--budget-s", self.budget_s), ("--time-limit-s", self.time_limit_s)):
            if v is not None and v <= 0:
                raise ValueError(f"{flag} must be positive, got {v}")

    def batch(self, model: str) -> int:
        return self.batch_sizes.get(model) or MODEL_SPECS[model].batch

    def record(self) -> dict:
        """The settings as the results file keeps them."""
        out = asdict(self)
        out.update(batch_sizes={m: self.batch(m) for m in self.models}, num_groups=NUM_GROUPS, dtype="float32",
                   argv=list(self.argv) if self.argv is not None else None)
        out.pop("verbose")
        return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def empty_row() -> dict:
    return {k: None for k in ROW_FIELDS}


def max_rel_err(grad_sq: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> float:
    """max |a - ref| / max |ref| over all layers concatenated (float64)."""
    if list(grad_sq) != list(ref):
        raise ValueError(f"layers differ: {list(grad_sq)} vs {list(ref)}")
    for n in ref:
        if grad_sq[n].shape != ref[n].shape:
            raise ValueError(f"layer {n}: shape {list(grad_sq[n].shape)} vs reference {list(ref[n].shape)}")
    a = torch.cat([grad_sq[n].flatten() for n in ref])
    b = torch.cat([ref[n].flatten() for n in ref])
    denom = b.abs().max().item()
    return (a - b).abs().max().item() / denom if denom > 0 else (a - b).abs().max().item()


def run_method(name: str, base_model, x, y, group_ids, device: torch.device,
               settings: Settings) -> Tuple[dict, Optional[dict]]:
    """Measure one method; returns (result row, grad_sq on CPU float64 or None)."""
    row = empty_row()
    reason = missing_peer(name)
    if reason is not None:
        row["skipped"] = reason
        return row, None
    grad_sq = None
    model = step = check = None
    start = time.perf_counter()
    try:
        model = copy.deepcopy(base_model).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        step, check = SETUPS[name](model, x, y, group_ids, settings.spurfast_backend)
        result = check()  # also the first call: compilation and autotuning happen here
        if result is not None:
            grad_sq = {n: t.detach().to("cpu", torch.float64) for n, t in result.items()}
        del result
        times = time_calls(step, settings.warmup, settings.repeats, device, settings.budget_s)
        median, iqr = median_iqr(times)
        row.update(time_ms_median=median, time_ms_iqr=iqr, samples_per_s=x.shape[0] / (median / 1e3),
                   repeats=len(times))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device))
            row["peak_mem_kind"] = "cuda_max_allocated"
    except MissingDependency as exc:
        row["skipped"] = str(exc)
        grad_sq = None
    except Exception as exc:  # OOM, unsupported layer, peer bug: record and go on
        row["error"] = error_string(exc)
        grad_sq = None
    finally:
        del model, step, check
        _free(device)
    row["wall_s"] = round(time.perf_counter() - start, 3)
    return row, grad_sq


def cpu_memory_pass(settings: Settings, data: dict) -> None:
    """CPU peak memory of every method that ran, after all timings: per model, a fresh process
    (spawned) in which glibc serves every allocation of 64 KiB or more by mmap and returns it
    at free; there each method runs one warm-up call on a fresh copy of the model, then one
    call whose resident-set growth is recorded, so that the growth is the memory that call's
    tensors held, not what a heap kept from earlier calls (a long-lived process reuses freed
    heap memory without growing). The statistics' own memory (:attr:`NeuronStats.nbytes`) is
    recorded beside spurfast's rows."""
    if not peak_rss_supported():
        return
    ctx = multiprocessing.get_context("spawn")
    for model_name, entry in data["results"].items():
        rows = {m: r for m, r in entry.get("methods", {}).items() if r.get("time_ms_median") is not None}
        if not rows:
            continue
        with ctx.Pool(1) as pool:
            measured = pool.apply(_memory_of_methods, (asdict(settings), model_name, list(rows)))
        for method, (peak, stats_bytes, sample_bytes, error) in measured.items():
            row = rows[method]
            if error is not None:
                row["error"] = f"memory pass: {error}"
                continue
            row.update(peak_mem_bytes=peak, peak_mem_kind="cpu_rss_growth", stats_bytes=stats_bytes,
                       sample_bytes=sample_bytes)
        _ratios_to_plain(rows)
        _log(f"[{model_name}] peak RSS growth: " + ", ".join(
            f"{m} {r['peak_mem_bytes'] / 2**20:.0f} MiB" for m, r in rows.items() if r.get("peak_mem_bytes") is not None))


def _memory_of_methods(settings_fields: dict, model_name: str, methods: List[str]) -> Dict[str, tuple]:
    """In the spawned process: ``{method: (peak RSS growth bytes, NeuronStats.nbytes, bytes of one batch's
    [B, C] statistics, error)}`` (None where not spurfast)."""
    mmap_large_allocations()
    settings = Settings(**settings_fields)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    base = prepare_model(build_model(model_name, settings.tiny, settings.allow_standin)[0])
    x, y, group_ids = make_batch(model_name, settings.batch(model_name), settings.tiny, torch.device("cpu"),
                                 settings.seed)
    out: Dict[str, tuple] = {}
    for method in methods:
        model = copy.deepcopy(base)
        step = None
        try:
            step, _ = SETUPS[method](model, x, y, group_ids, settings.spurfast_backend)
            step()
            with PeakRSS(True) as mem:
                step()
            stats = getattr(step, "stats", None)
            if stats is None:
                out[method] = (mem.delta_bytes, None, None, None)
            else:
                per_sample = [t for table in (stats.last_grad_sq, stats.last_act, stats.last_ablation) for t in table.values()]
                out[method] = (mem.delta_bytes, stats.nbytes, sum(t.numel() * t.element_size() for t in per_sample), None)
        except Exception as exc:  # measured before, so this is the memory pass's own failure
            out[method] = (None, None, None, error_string(exc))
        finally:
            del model, step
            gc.collect()
    return out


def paired_ratios(base_model, x, y, group_ids, settings: Settings, methods) -> Dict[str, dict]:
    """CPU: ``settings.pairs`` rounds of one plain step and one step of each of ``methods``
    (order rotated every round), so that load from other processes lands on all of them alike;
    per method the median and IQR of its per-round time over plain's in the same round."""
    fns, models = {}, []
    for name in ("plain",) + tuple(methods):
        model = copy.deepcopy(base_model)
        models.append(model)
        fns[name] = SETUPS[name](model, x, y, group_ids, settings.spurfast_backend)[0]
    times = interleaved(fns, repeats=settings.pairs, warmup=1)
    plain = times["plain"]["runs_ms"]
    out = {}
    for name in methods:
        ratios = sorted(t / p for t, p in zip(times[name]["runs_ms"], plain))
        q1, q3 = (statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else (ratios[0], ratios[0]))
        out[name] = {"ratio_median": statistics.median(ratios), "ratio_iqr": [q1, q3], "rounds": len(ratios),
                     "plain_ms_median": times["plain"]["median_ms"], "ms_median": times[name]["median_ms"]}
    del models, fns
    return out


def make_batch(model: str, batch: int, tiny: bool, device: torch.device, seed: int):
    spec = MODEL_SPECS[model]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + tuple(spec.input_shape(tiny)), generator=gen)
    y = torch.randint(0, spec.classes, (batch,), generator=gen)
    group_ids = torch.randint(0, NUM_GROUPS, (batch,), generator=gen)
    return x.to(device), y.to(device), group_ids.to(device)


def run_model(model_name: str, device: torch.device, settings: Settings, deadline: Optional[float] = None) -> dict:
    """Every method on one model: its results entry (rows per method, reference, wall time)."""
    spec = MODEL_SPECS[model_name]
    batch = settings.batch(model_name)
    entry = dict(source=spec.source, standin=False, batch_size=batch,
                 input_shape=list(spec.input_shape(settings.tiny)), num_classes=spec.classes,
                 reference_method=None, skipped=None, error=None, methods={})
    start = time.perf_counter()
    try:
        torch.manual_seed(settings.seed)
        built, entry["source"] = build_model(model_name, settings.tiny, settings.allow_standin)
        entry["standin"] = entry["source"] != spec.source
        base = prepare_model(built)
    except MissingDependency as exc:
        entry["skipped"] = str(exc)
        entry["wall_s"] = round(time.perf_counter() - start, 3)
        return entry
    except Exception as exc:
        entry["error"] = error_string(exc)
        for m in settings.methods:
            entry["methods"][m] = dict(empty_row(), error=f"model not built: {entry['error']}")
        entry["wall_s"] = round(time.perf_counter() - start, 3)
        return entry
    layers = tracked_layers(base)
    entry["num_tracked_layers"] = len(layers)
    entry["num_tracked_params"] = sum(m.weight.numel() for _, m in layers)
    x, y, group_ids = make_batch(model_name, batch, settings.tiny, device, settings.seed)
    ref = None
    for method in settings.methods:
        if deadline is not None and time.perf_counter() > deadline:
            row, grad_sq = dict(empty_row(), skipped=f"time limit: {settings.time_limit_s:g} s "
                                                      "(--time-limit-s) reached before it started"), None
        else:
            row, grad_sq = run_method(method, base, x, y, group_ids, device, settings)
        if grad_sq is not None:
            if ref is None:
                ref, entry["reference_method"] = grad_sq, method
                row["max_rel_err"] = 0.0
            else:
                try:
                    row["max_rel_err"] = max_rel_err(grad_sq, ref)
                except ValueError as exc:
                    row["error"] = f"grad_sq comparison failed: {exc}"
        entry["methods"][method] = row
        _log(f"[{model_name}] {method}: " + (str(row) if settings.verbose else _row_line(row)))
    paired = [m for m in PAIRED_METHODS if m in entry["methods"] and entry["methods"][m].get("time_ms_median")]
    if settings.pairs and device.type == "cpu" and paired and entry["methods"].get("plain", {}).get("time_ms_median") \
            and (deadline is None or time.perf_counter() < deadline):
        try:
            entry["paired"] = paired_ratios(base, x, y, group_ids, settings, paired)
            _log(f"[{model_name}] paired: " + ", ".join(
                f"{m} {r['ratio_median']:.2f}x [{r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f}]"
                for m, r in entry["paired"].items()))
        except Exception as exc:
            entry["paired_error"] = error_string(exc)
        _free(device)
    _ratios_to_plain(entry["methods"])
    del base, x, y, group_ids, ref
    _free(device)
    entry["wall_s"] = round(time.perf_counter() - start, 3)
    return entry


def _ratios_to_plain(rows: Dict[str, dict]) -> None:
    """Each row's time and peak memory over plain's, where both were measured."""
    plain = rows.get("plain")
    for row in rows.values():
        if plain and plain.get("time_ms_median") and row.get("time_ms_median"):
            row["ratio_to_plain"] = row["time_ms_median"] / plain["time_ms_median"]
        if plain and plain.get("peak_mem_bytes") and row.get("peak_mem_bytes") is not None:
            row["mem_ratio_to_plain"] = row["peak_mem_bytes"] / plain["peak_mem_bytes"]


def _row_line(row: dict) -> str:
    if row.get("skipped"):
        return f"skipped ({row['skipped']})"
    if row.get("error"):
        return f"error ({row['error'][:200]})"
    return f"{row['time_ms_median']:.2f} ms/batch, {row['repeats']} repeats, {row['wall_s']:.1f} s"


def summarize_results(data: dict) -> dict:
    """What a reader checks first: each peer's max relative error against the reference, and
    every skipped or failed model and method with its reason."""
    agreement, skipped, errors = {}, [], []
    for model, entry in data.get("results", {}).items():
        if entry.get("skipped"):
            skipped.append({"model": model, "method": None, "reason": entry["skipped"]})
        if entry.get("error"):
            errors.append({"model": model, "method": None, "error": entry["error"]})
        agreement[model] = {m: r["max_rel_err"] for m, r in entry.get("methods", {}).items()
                            if r.get("max_rel_err") is not None}
        for method, r in entry.get("methods", {}).items():
            if r.get("skipped"):
                skipped.append({"model": model, "method": method, "reason": r["skipped"]})
            elif r.get("error") and not entry.get("error"):
                errors.append({"model": model, "method": method, "error": r["error"]})
    return {
        "reference_method": {m: e.get("reference_method") for m, e in data.get("results", {}).items()},
        "max_rel_err_vs_reference": agreement,
        "wall_s_per_model": {m: e.get("wall_s") for m, e in data.get("results", {}).items()},
        "skipped": skipped,
        "errors": errors,
    }


def measure(settings: Settings, on_model: Optional[Callable[[dict], None]] = None) -> dict:
    """Run every model of ``settings``; ``on_model(data)`` after each (to write what was
    measured so far, so that a run cut off by a time limit keeps it). Returns the results."""
    start = time.perf_counter()
    deadline = start + settings.time_limit_s if settings.time_limit_s else None
    saved_tf32, saved_threads = tf32_flags(), torch.get_num_threads()
    try:
        device = select_device(settings.device, settings.tf32)
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        data = {"benchmark": "scoring_throughput", "environment": environment(device),
                "settings": settings.record(), "results": {}}
        with warnings.catch_warnings():
            # Opacus and BackPACK hook modules whose inputs need no grad (the first layer); harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            # torch.func on ViTs (no batching rule for CPU attention) and BackPACK on container modules: known, not ours.
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            warnings.filterwarnings("ignore", message="Extension saving to grad_batch does not have an extension")
            for model_name in settings.models:
                if deadline is not None and time.perf_counter() > deadline:
                    data["results"][model_name] = dict(
                        source=MODEL_SPECS[model_name].source, batch_size=settings.batch(model_name), methods={},
                        skipped=f"time limit: {settings.time_limit_s:g} s (--time-limit-s) reached before it started")
                else:
                    data["results"][model_name] = run_model(model_name, device, settings, deadline)
                entry = data["results"][model_name]
                _log(f"[{model_name}] done in {entry.get('wall_s') or 0:.1f} s" +
                     (f": skipped ({entry['skipped']})" if entry.get("skipped") else ""))
                data["wall_s"] = round(time.perf_counter() - start, 3)
                data["summary"] = summarize_results(data)
                if on_model is not None:
                    on_model(data)
            if device.type == "cpu" and settings.memory:
                cpu_memory_pass(settings, data)
                data["summary"] = summarize_results(data)
                if on_model is not None:
                    on_model(data)
    finally:
        set_tf32_flags(saved_tf32)
        torch.set_num_threads(saved_threads)
    return data


# ---------------------------------------------------------------------------- table
def _fmt(v, spec: str, none: str = "–") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _note(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def render_table(data: dict) -> str:
    """Markdown: a header (device, versions, settings), one row per model and method that
    ran (or failed), the wall time per model, and what was skipped, grouped by reason."""
    env = data.get("environment", {})
    s = data.get("settings", {})
    on_gpu = env.get("device_type") == "cuda"  # the targets are the GPU issue's
    warmup = f"up to {s['warmup']} warm-up calls" if s.get("warmup") else "no warm-up"
    threads = env.get("cpu_threads")
    lines = [
        f"**{env.get('device', '?')}** · torch {env.get('torch')} · triton {env.get('triton')} · "
        f"CUDA {env.get('cuda')} · spurfast {env.get('spurfast')} ({(env.get('spurfast_commit') or '')[:10]}) · "
        f"{env.get('date', '')}",
        "",
        f"fp32 with TF32 {'on' if s.get('tf32') else 'off'}, {s.get('num_groups')} groups, "
        f"{threads} CPU thread{'' if threads == 1 else 's'}; median of up to {s.get('repeats')} batches "
        f"after one untimed call and {warmup}"
        + (f", repeats cut to about {s['budget_s']:g} s per method" if s.get("budget_s") else "")
        + (", **tiny shapes (smoke test, not a benchmark)**" if s.get("tiny") else ""),
        "",
        "| model | B | method | ms / batch | IQR ms | samples/s | peak MiB | time × plain | mem × plain | max rel err | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    skipped: Dict[str, List[str]] = {}  # reason -> what it skipped
    results = data.get("results", {})
    for model, entry in results.items():
        label = f"{model} (stand-in)" if entry.get("standin") else model
        if entry.get("skipped"):
            skipped.setdefault(entry["skipped"], []).append(model)
            lines.append(f"| {label} | {entry.get('batch_size')} | – | – | – | – | – | – | – | – | skipped |")
            continue
        for method, r in entry.get("methods", {}).items():
            if r.get("skipped"):
                skipped.setdefault(r["skipped"], []).append(f"{model} / {method}")
                continue
            note = r.get("error") or ""
            if method == "spurfast" and on_gpu and r.get("ratio_to_plain") is not None and not note:
                ok_t = r["ratio_to_plain"] <= TIME_TARGET
                ok_m = r.get("mem_ratio_to_plain") is None or r["mem_ratio_to_plain"] <= MEM_TARGET
                note = f"target (≤{TIME_TARGET}x time, ≤{MEM_TARGET}x mem): {'met' if ok_t and ok_m else 'missed'}"
            mem = r.get("peak_mem_bytes")
            lines.append(
                f"| {label} | {entry.get('batch_size')} | {method} | {_fmt(r.get('time_ms_median'), '.2f')} | "
                f"{_fmt(r.get('time_ms_iqr'), '.2f')} | {_fmt(r.get('samples_per_s'), ',.0f')} | "
                f"{_fmt(mem / 2**20 if mem else None, ',.0f')} | {_fmt(r.get('ratio_to_plain'), '.3f')} | "
                f"{_fmt(r.get('mem_ratio_to_plain'), '.3f')} | {_fmt(r.get('max_rel_err'), '.1e')} | {_note(note)} |"
            )
    paired = {m: e["paired"] for m, e in results.items() if e.get("paired")}
    if paired:
        lines += ["", f"spurfast against plain in alternating rounds (median and IQR of the per-round ratio, "
                      f"{s.get('pairs')} rounds):", "",
                  "| model | B | method | plain ms | time × plain | IQR |", "|---|---:|---|---:|---:|---|"]
        for model, rows in paired.items():
            for method, r in rows.items():
                lines.append(f"| {model} | {results[model].get('batch_size')} | {method} | {r['plain_ms_median']:.1f} | "
                             f"{r['ratio_median']:.2f} | {r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f} |")
    walls = [f"{m} {e['wall_s']:.1f} s" for m, e in results.items() if e.get("wall_s") is not None]
    if walls:
        total = f" (run {data['wall_s']:.0f} s in all)" if data.get("wall_s") is not None else ""
        lines += ["", "Wall time per model: " + ", ".join(walls) + total + "."]
    standins = [f"* {m}: {e['source']}" for m, e in results.items() if e.get("standin")]
    if standins:
        lines += ["", "Stand-ins:", ""] + standins
    if skipped:
        lines += ["", "Skipped:", ""] + [f"* {', '.join(what)}: {reason}" for reason, what in skipped.items()]
    return "\n".join(lines)


#: issue 15's CPU targets: paired ratio to plain with every statistic on, and without group_grad
CPU_TARGETS = {"mlp": (1.5, 1.2), "resnet18": (2.0, 1.2), "resnet18_cifar": (1.3, 1.2)}
MEM_SLACK = 1.10  # spurfast's peak at most (plain's + the statistics' own memory) x this


def render_cpu_targets(data: dict) -> str:
    """Markdown: each CPU target against the paired ratio measured, and the memory rule: the
    peak above the model and batch is plain's resident growth for plain, and for spurfast its
    growth plus what the statistics hold (resident before the call); it may exceed plain's by
    the statistics' own memory (``NeuronStats.nbytes``) and one more batch's ``[B, C]``
    statistics (the new batch's, alive beside the last one's until it replaces them), plus
    ``MEM_SLACK`` of all that."""
    lines = ["| model | B | statistics | target (time × plain) | paired median [IQR] | time | "
             "peak MiB: plain / spurfast incl. statistics / allowed | memory |", "|---|---:|---|---:|---:|---|---:|---|"]
    results = data.get("results", {})
    for model, entry in results.items():
        paired = entry.get("paired") or {}
        rows = entry.get("methods", {})
        plain_mem = (rows.get("plain") or {}).get("peak_mem_bytes")
        targets = CPU_TARGETS.get(model, (None, None))
        for method, target, label in (("spurfast", targets[0], "all"), ("spurfast_nogroup", targets[1], "all but group_grad")):
            r = paired.get(method)
            row = rows.get(method) or {}
            if r is None:
                continue
            ok = "–" if target is None else ("met" if r["ratio_median"] <= target else "missed")
            mem = row.get("peak_mem_bytes")
            stats = row.get("stats_bytes") or 0
            if mem is None or plain_mem is None:
                mem_text, mem_ok = "–", "–"
            else:
                total = mem + stats
                allowed = MEM_SLACK * (plain_mem + stats + (row.get("sample_bytes") or 0))
                mem_text = f"{plain_mem / 2**20:,.0f} / {total / 2**20:,.0f} / {allowed / 2**20:,.0f}"
                mem_ok = "met" if total <= allowed else "missed"
            lines.append(f"| {model} | {entry.get('batch_size')} | {label} | {'–' if target is None else f'≤ {target}'} | "
                         f"{r['ratio_median']:.2f} [{r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f}] | {ok} | "
                         f"{mem_text} | {mem_ok} |")
    return "\n".join(lines)


def merge_results(old: dict, new: dict) -> dict:
    """``new`` plus the models of ``old`` it did not rerun; refuses (ValueError) to mix
    devices or settings."""
    for key in ("device", "torch"):
        if old["environment"].get(key) != new["environment"].get(key):
            raise ValueError(f"--merge: {key} differs ({old['environment'].get(key)!r} in the file, "
                             f"{new['environment'].get(key)!r} now); write to another --out")
    for key in ("warmup", "repeats", "tf32", "tiny", "spurfast_backend", "batch_size_override"):
        if old["settings"].get(key) != new["settings"].get(key):
            raise ValueError(f"--merge: setting {key} differs ({old['settings'].get(key)!r} in the file, "
                             f"{new['settings'].get(key)!r} now); write to another --out")
    results = {m: r for m, r in old["results"].items() if m not in new["results"]}
    results.update(new["results"])
    order = {m: i for i, m in enumerate(ALL_MODELS)}
    merged = dict(new, results=dict(sorted(results.items(), key=lambda kv: order.get(kv[0], len(order)))))
    runs = old["settings"].get("runs") or [old["settings"].get("argv")]
    merged["settings"] = dict(new["settings"], models=list(merged["results"]), runs=runs + [new["settings"]["argv"]])
    merged["summary"] = summarize_results(merged)
    return merged
