"""NeuronStats on a ``torch.compile``'d model: what recording costs there, what compiling costs,
the graph breaks dynamo reports inside ``record`` and whether the statistics are eager's.

Per model (:data:`COMPILE_MODELS`), four steps of one forward and backward of a mean
cross-entropy on the same batch, each on its own copy of one initialisation:

* ``eager``: plain forward + backward (the reference of every ratio);
* ``eager_record``: the same inside ``NeuronStats.record`` (4 groups, every statistic on);
* ``compiled``: plain forward + backward of ``torch.compile(model, backend=...)``;
* ``compiled_record``: the compiled model inside ``record`` of a NeuronStats on it.

Measured, in one process:

* ``first_call_s``: wall time of each step's first call. The compiled ones start from a reset
  dynamo and an empty inductor cache (``torch._inductor.utils.fresh_cache``), so this is the
  cold compile a new machine pays: ``compiled_record`` first as the very first call, then
  (after another reset) ``compiled``, then ``compiled_record_after_compiled``: the first
  ``record`` on a model already compiled and run outside it (a recompile, see below);
* steady state: after ``warmup`` untimed rounds, ``repeats`` rounds of one call of each step
  (order rotated every round, :func:`spurfast.bench.timing.interleaved`), so that load from
  other processes lands on all four alike; per step the median and IQR in ms, and per pair of
  steps the median and IQR of the per-round ratio. ``compiled`` is timed twice: against
  ``eager`` alone before the compiled model ever ran inside ``record``
  (``steps_before_record``), and among the four after it did (``steps``): dynamo keeps the
  entries compiled inside ``record`` and may run them outside it too;
* ``compiled_code_run_per_step``: compiled forward graphs and dynamo regions one step runs
  (:func:`graphs_run`), for ``compiled`` before and after a ``record`` and for ``compiled_record``;
* ``dynamo``: what dynamo compiled and why it split or recompiled: graphs and frames counted
  by ``torch._dynamo.utils.counters``, graph breaks and recompiles as dynamo logs them
  (captured from its ``graph_breaks`` / ``recompiles`` log artifacts, not printed), during the
  first compiled ``record``, the switch from ``compiled`` to ``compiled_record`` and the timed
  rounds (``recompiled_during_timed_steps`` must be False), and ``torch._dynamo.explain`` of
  the compiled model's forward inside ``record``;
* ``exactness``: max relative difference (max |a - b| / max |b| over all layers) between the
  compiled and the eager NeuronStats after the same number of recorded steps, per table
  (``grad_sq_sum``, ``group_grad``, ``ablation_sum``, ``act_mean``, ``last_grad_sq``) and of
  the weights' ``.grad`` after one more recorded step.

Example::

    >>> s = Settings(models=["mlp"], quick=True, backend="eager", warmup=0, repeats=1)
    >>> entry = measure(s)["results"]["mlp"]
    >>> entry["exactness"]["max_rel_diff"]["grad_sq_sum"] < 1e-5, entry["dynamo"]["recompiled_during_timed_steps"]
    (True, False)
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from spurfast.bench.environment import environment, error_string, select_device
from spurfast.bench.models import MODEL_SPECS, BasicBlock, prepare_model
from spurfast.bench.peers import NUM_GROUPS
from spurfast.bench.throughput import max_rel_err
from spurfast.bench.timing import OtherLoad, interleaved, load_average, machine_info

VARIANTS = ("eager", "eager_record", "compiled", "compiled_record")
#: per-round ratios reported: (numerator, denominator)
RATIOS = (("eager_record", "eager"), ("compiled", "eager"), ("compiled_record", "eager"),
          ("compiled_record", "eager_record"))
EXACT_TABLES = ("grad_sq_sum", "group_grad", "ablation_sum", "act_mean", "last_grad_sq")
_ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ models
class SmallResNet(nn.Module):
    """A ResNet in miniature: conv-BN-ReLU stem, one :class:`~spurfast.bench.models.BasicBlock`
    per width in an ``nn.Sequential`` (stride 2 and a 1x1 conv-BN shortcut where the width
    changes), global average pool, Linear. Its forward is straight-line code calling an
    ``nn.Sequential`` stage, as torchvision's ResNet's is.

    Example::

        >>> model = SmallResNet((4, 8), num_classes=3).eval()
        >>> model(torch.zeros(2, 3, 8, 8)).shape, sum(isinstance(m, nn.Conv2d) for m in model.modules())
        (torch.Size([2, 3]), 6)
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, channels = [], widths[0]
        for width in widths:
            stride = 1 if width == channels else 2
            shortcut = None if width == channels else nn.Sequential(
                nn.Conv2d(channels, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            blocks.append(BasicBlock(channels, width, stride, shortcut))
            channels = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layers(x).mean((2, 3)))


@dataclass(frozen=True)
class CompileModel:
    """One model of the comparison; ``quick`` shrinks it for tests and rehearsals."""

    name: str
    source: str
    build: Callable[[bool], nn.Module]
    input_shape: Callable[[bool], Tuple[int, ...]]
    batch: Callable[[bool], int]
    classes: int


_MLP = MODEL_SPECS["mlp"]
COMPILE_MODELS: Dict[str, CompileModel] = {
    "mlp": CompileModel(
        "mlp", f"{_MLP.source} (the CPU benchmark's), an nn.Sequential; quick: 64-32-32-10",
        build=_MLP.build, input_shape=_MLP.input_shape, batch=lambda quick: 4 if quick else _MLP.cpu_batch,
        classes=_MLP.classes),
    "cnn": CompileModel(
        "cnn", "spurfast.bench.compiled.SmallResNet(widths=(16, 32, 64)) on 3x32x32; quick: widths (4, 8) on 3x8x8",
        build=lambda quick: SmallResNet((4, 8) if quick else (16, 32, 64), num_classes=10),
        input_shape=lambda quick: (3, 8, 8) if quick else (3, 32, 32), batch=lambda quick: 4 if quick else 32,
        classes=10),
}
ALL_MODELS = tuple(COMPILE_MODELS)


@dataclass
class Settings:
    """One run. ``backend``/``mode``: those of ``torch.compile``; ``fresh_cache``: first calls
    compile into an empty inductor cache (the cold cost), else whatever the cache holds."""

    models: List[str] = field(default_factory=lambda: list(ALL_MODELS))
    device: str = "cpu"
    backend: str = "inductor"
    mode: Optional[str] = None
    quick: bool = False
    warmup: int = 3
    repeats: int = 15
    seed: int = 0
    threads: Optional[int] = None  # torch.set_num_threads for the run, restored after; None: as set
    spurfast_backend: str = "auto"
    fresh_cache: bool = True
    nested_graph_breaks: bool = False  # torch._dynamo.config.nested_graph_breaks for the run
    command: Optional[str] = None

    def __post_init__(self):
        bad = [m for m in self.models if m not in COMPILE_MODELS]
        if bad or not self.models:
            raise ValueError(f"--models must be a non-empty subset of {','.join(ALL_MODELS)}, got {self.models}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")


# ------------------------------------------------------------------------------ dynamo's account
_ARTIFACTS = ("graph_breaks", "recompiles")
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)')
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _artifact_loggers() -> Dict[str, List[logging.Logger]]:
    """{artifact: the loggers dynamo writes it to}."""
    try:
        from torch._logging._internal import log_registry

        qnames = sorted(log_registry.artifact_log_qnames)
    except (ImportError, AttributeError):  # older torch: the names these modules register
        qnames = ["torch._dynamo.symbolic_convert.__graph_breaks", "torch._dynamo.guards.__recompiles"]
    return {a: [logging.getLogger(q) for q in qnames if q.endswith(f".__{a}")] for a in _ARTIFACTS}


def _short_path(path: str) -> str:
    path = path.replace("\\", "/")
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1]
    try:
        return str(Path(path).resolve().relative_to(_ROOT))
    except ValueError:
        return Path(path).name


def _site(frames: List[Tuple[str, int, str]]) -> Optional[str]:
    """The innermost frame of a user stack that is not nn.Module's call machinery or dynamo's own."""
    for file, line, name in reversed(frames):
        short = _short_path(file)
        if short.startswith(("torch/nn/modules/module.py", "torch/_dynamo/")):
            continue
        return f"{short}:{line} in {name}"
    return None


def _reason(text: str) -> str:
    """The first lines of a dynamo graph-break reason (its type and explanation), addresses removed."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith("Encountered graph break when attempting to trace"):
        lines = lines[1:]  # the bytecode it stopped at, not why
    kept = [ln for ln in lines[:2] if not ln.startswith(("Hint:", "Developer debug context", "For more details"))]
    return _ADDRESS.sub("", " ".join(kept)) or "(no reason given)"


def parse_graph_break(message: str) -> dict:
    """``{"reason", "site"}`` of one message of dynamo's ``graph_breaks`` log: the reason's type and
    explanation, and the innermost user frame (``file:line in function``) outside nn.Module's call."""
    body = message.split("Graph Break Reason:", 1)[1] if "Graph Break Reason:" in message else message
    reason_text, _, traceback = body.partition("User code traceback:")
    frames = [(m["file"], int(m["line"]), m["name"]) for m in _FRAME.finditer(traceback)]
    site = _site(frames)
    if site is None:  # the short form logged for a repeated break names only where it happened
        where = re.search(r"in user code at (?P<file>\S+):(?P<line>\d+)", message)
        site = f"{_short_path(where['file'])}:{where['line']}" if where else None
    return {"reason": _reason(reason_text), "site": site}


def parse_recompile(message: str) -> dict:
    """``{"function", "guard_failures"}`` of one message of dynamo's ``recompiles`` log."""
    head = re.search(r"Recompiling function (?P<fn>\S+) in (?P<file>\S+):(?P<line>\d+)", message)
    function = f"{head['fn']} ({_short_path(head['file'])}:{head['line']})" if head else message.splitlines()[0]
    failures = [m.group(1).split("  #")[0].strip()
                for m in re.finditer(r"^\s*- \d+/\d+: (.+)$", message, re.M)]
    return {"function": function, "guard_failures": failures}


def _group(items: List[dict]) -> List[dict]:
    """Equal items counted, in order of first appearance."""
    counted: Dict[tuple, dict] = {}
    for item in items:
        key = tuple(sorted((k, str(v)) for k, v in item.items()))
        counted.setdefault(key, dict(item, count=0))["count"] += 1
    return list(counted.values())


def _counters() -> Dict[str, int]:
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


class _LogEvery:
    """Stands in for dynamo's duplicate-graph-break filter: every break is new."""

    def add(self, item) -> bool:
        return True

    def reset(self) -> None:
        pass


class DynamoEvents(contextlib.AbstractContextManager):
    """What dynamo did while the block ran: the growth of its counters (frames it started,
    graphs it compiled, graph breaks) and its ``graph_breaks`` and ``recompiles`` log messages,
    captured (not printed) and parsed into reasons and sites (:meth:`summary`)."""

    def __init__(self):
        self.messages: Dict[str, List[str]] = {a: [] for a in _ARTIFACTS}
        self.counts: Dict[str, int] = {}
        self._saved: List[tuple] = []

    def __enter__(self) -> "DynamoEvents":
        events = self

        class _Capture(logging.Handler):
            def __init__(self, artifact):
                super().__init__(logging.DEBUG)
                self.artifact = artifact

            def emit(self, record):
                try:
                    events.messages[self.artifact].append(record.getMessage())
                except Exception:  # a message that does not format is dropped, never raised into dynamo
                    pass

        for artifact, loggers in _artifact_loggers().items():
            handler = _Capture(artifact)
            for logger in loggers:
                self._saved.append((logger, logger.level, logger.propagate, handler))
                logger.setLevel(logging.DEBUG)
                logger.propagate = False  # to our handler only, not torch's stderr one
                logger.addHandler(handler)
        self._enabled = []  # dynamo formats a recompile's reasons only when its artifact is enabled
        with contextlib.suppress(ImportError, AttributeError):
            from torch._logging._internal import log_state

            self._enabled = [a for a in _ARTIFACTS if not log_state.is_artifact_enabled(a)]
            for artifact in self._enabled:
                log_state.enable_artifact(artifact)
        # dynamo logs a break it saw before (same kind, same innermost location: every tracked
        # layer's break is at nn.Module's call) in a short form without the user stack: log all in full
        try:
            from torch._dynamo import symbolic_convert

            self._checker = symbolic_convert.graph_break_dup_warning_checker
            symbolic_convert.graph_break_dup_warning_checker = _LogEvery()
        except (ImportError, AttributeError):
            self._checker = None
        self._before = _counters()
        return self

    def __exit__(self, *exc) -> None:
        after = _counters()
        self.counts = {k: after[k] - self._before[k] for k in after}
        for logger, level, propagate, handler in self._saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        self._saved = []
        if self._enabled:
            from torch._logging._internal import log_state

            log_state.artifact_names.difference_update(self._enabled)
            self._enabled = []
        if self._checker is not None:
            from torch._dynamo import symbolic_convert

            symbolic_convert.graph_break_dup_warning_checker = self._checker
            self._checker = None

    def summary(self) -> dict:
        breaks = [parse_graph_break(m) for m in self.messages["graph_breaks"]]
        recompiles = [parse_recompile(m) for m in self.messages["recompiles"]]
        return {
            "frames_started": self.counts.get("frames"), "graphs_compiled": self.counts.get("graphs"),
            "graph_breaks": self.counts.get("graph_breaks"), "graph_break_reasons": _group(breaks),
            "recompiles": len(recompiles), "recompile_reasons": _group(recompiles),
        }


def explain_summary(explained) -> dict:
    """``torch._dynamo.explain(...)(...)``'s output as JSON: counts and each break's reason and site."""
    reasons = []
    for r in explained.break_reasons:
        frames = [(f.filename, f.lineno, f.name) for f in r.user_stack]
        reasons.append({"reason": _reason(r.reason), "site": _site(frames)})
    return {"graph_count": explained.graph_count, "graph_break_count": explained.graph_break_count,
            "op_count": explained.op_count, "break_reasons": reasons}


# ------------------------------------------------------------------------------ measurement
def _fresh_cache(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    from torch._inductor import utils as inductor_utils

    fresh = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache  # named so before 2.7
    return fresh()


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 4)


def _ratio(num: List[float], den: List[float]) -> dict:
    """Median and quartiles of per-round ratios (the rounds of :func:`interleaved` line up), and
    the ratio of the total times (``of_totals``: counts a cost paid every few steps, which the
    median skips)."""
    ratios = [a / b for a, b in zip(num, den)]
    q1, q3 = statistics.quantiles(ratios, n=4, method="inclusive")[::2] if len(ratios) > 1 else (ratios[0],) * 2
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "iqr": q3 - q1, "rounds": len(ratios),
            "of_totals": sum(num) / sum(den)}


def _tables(stats) -> Dict[str, Dict[str, torch.Tensor]]:
    out = {"grad_sq_sum": stats.grad_sq_sum, "group_grad": stats.group_grad, "ablation_sum": stats.ablation_sum,
           "act_mean": stats.act_mean, "last_grad_sq": stats.last_grad_sq}
    return {t: {n: v.detach().to("cpu", torch.float64) for n, v in table.items()} for t, table in out.items()}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def graphs_run(fn: Callable[[], object]) -> dict:
    """What one call of ``fn`` ran of compiled code, from a CPU profile: ``regions`` (dynamo
    cache entries entered, the "Torch-Compiled Region" scopes) and ``graphs`` (AOTAutograd
    forward graphs run, "CompiledFunction"; none with ``backend="eager"``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return {"regions": sum(n.startswith("Torch-Compiled Region") for n in names),
            "graphs": sum(n == "CompiledFunction" for n in names)}


def _recorded_steps(stats, batch: int) -> int:
    return int(stats.group_count.sum()) // batch


def measure_model(name: str, settings: Settings, device: torch.device) -> dict:
    """The four steps on one model: its results entry (see the module docstring)."""
    import torch._dynamo as dynamo

    from spurfast import NeuronStats

    spec = COMPILE_MODELS[name]
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    base = prepare_model(spec.build(settings.quick)).to(device)
    batch = spec.batch(settings.quick)
    gen = torch.Generator().manual_seed(settings.seed)
    x = torch.randn((batch,) + tuple(spec.input_shape(settings.quick)), generator=gen).to(device)
    y = torch.randint(0, spec.classes, (batch,), generator=gen).to(device)
    group_ids = torch.randint(0, NUM_GROUPS, (batch,), generator=gen).to(device)

    eager, target = copy.deepcopy(base), copy.deepcopy(base)
    compiled = torch.compile(target, backend=settings.backend, mode=settings.mode)
    eager_stats = NeuronStats(eager, NUM_GROUPS, backend=settings.spurfast_backend)
    compiled_stats = NeuronStats(compiled, NUM_GROUPS, backend=settings.spurfast_backend)  # as a user would
    if compiled_stats.layer_names != eager_stats.layer_names:
        raise RuntimeError(f"compiled model tracked as {compiled_stats.layer_names}, "
                           f"eager as {eager_stats.layer_names}")
    entry = {"source": spec.source, "batch_size": batch, "input_shape": list(spec.input_shape(settings.quick)),
             "layer_names": eager_stats.layer_names, "num_tracked_layers": len(eager_stats.layer_names)}

    def step(model, stats):
        def run():
            if stats is None:
                F.cross_entropy(model(x), y).backward()
            else:
                with stats.record(group_ids):
                    F.cross_entropy(model(x), y).backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return run

    fns = {"eager": step(eager, None), "eager_record": step(eager, eager_stats),
           "compiled": step(compiled, None), "compiled_record": step(compiled, compiled_stats)}

    def zero():
        eager.zero_grad(set_to_none=True)
        target.zero_grad(set_to_none=True)

    def once(variant):
        seconds = _seconds(fns[variant])
        zero()
        return seconds

    def rounds(names):
        """Warm-up rounds, then timed interleaved rounds, watching dynamo."""
        for _ in range(settings.warmup):
            for n in names:
                fns[n]()
                zero()
        with DynamoEvents() as events, OtherLoad() as load:
            times = interleaved({n: fns[n] for n in names}, repeats=settings.repeats, warmup=0, between=zero)
        return times, events, load.cores

    # First calls: each compiled one from a reset dynamo and an empty inductor cache.
    first_s, report, ran = {}, {}, {}
    dynamo.reset()
    with _fresh_cache(settings.fresh_cache), DynamoEvents() as events:
        first_s["compiled_record"] = once("compiled_record")
    report["first_compiled_record"] = events.summary()
    dynamo.reset()
    with _fresh_cache(settings.fresh_cache):
        with DynamoEvents() as events:
            first_s["compiled"] = once("compiled")
        report["first_compiled"] = events.summary()
        first_s["eager"] = once("eager")
        # The compiled model before it ever ran inside record, against eager.
        before, events, load_before = rounds(["eager", "compiled"])
        report["timed_steps_before_record"] = events.summary()
        ran["compiled_before_record"] = graphs_run(fns["compiled"])
        zero()
        with DynamoEvents() as events:
            first_s["compiled_record_after_compiled"] = once("compiled_record")
        report["first_record_after_compiled"] = events.summary()
    first_s["eager_record"] = once("eager_record")
    ran["compiled_record"] = graphs_run(fns["compiled_record"])
    ran["compiled_after_record"] = graphs_run(fns["compiled"])
    zero()
    # Both NeuronStats at the same step count, so that their periodic flushes of the deferred
    # group sums (every few steps) fall in the same rounds and per-round ratios compare like with like.
    while _recorded_steps(eager_stats, batch) < _recorded_steps(compiled_stats, batch):
        fns["eager_record"]()
        zero()
    entry["first_call_s"] = first_s
    entry["compiled_code_run_per_step"] = ran
    _log(f"[{name}] first calls (s): " + ", ".join(f"{k} {v:.2f}" for k, v in first_s.items()))

    # Steady state of the four steps (the compiled model has now run inside record).
    times, events, load_after = rounds(list(VARIANTS))
    report["timed_steps"] = events.summary()
    watched = (report["timed_steps_before_record"], report["timed_steps"])
    report["recompiled_during_timed_steps"] = any(w["frames_started"] or w["graphs_compiled"] or w["recompiles"]
                                                  for w in watched)
    entry["steps"] = times
    entry["steps_before_record"] = before
    entry["other_load_cores"] = {"before_record": load_before, "four_steps": load_after}
    entry["ratios"] = {f"{a}/{b}": _ratio(times[a]["runs_ms"], times[b]["runs_ms"]) for a, b in RATIOS}
    entry["ratios"]["compiled_before_record/eager"] = _ratio(before["compiled"]["runs_ms"], before["eager"]["runs_ms"])
    _log(f"[{name}] " + ", ".join(f"{k} {r['median']:.2f}x [{r['q1']:.2f}-{r['q3']:.2f}]"
                                  for k, r in entry["ratios"].items()))

    # Exactness: after as many recorded steps on both, then one more each with .grad kept.
    steps_recorded = _recorded_steps(eager_stats, batch)
    if steps_recorded != _recorded_steps(compiled_stats, batch):
        raise RuntimeError(f"recorded steps differ: eager {steps_recorded}, "
                           f"compiled {_recorded_steps(compiled_stats, batch)}")
    want, got = _tables(eager_stats), _tables(compiled_stats)
    diffs = {t: max_rel_err(got[t], want[t]) for t in EXACT_TABLES if want[t]}
    fns["eager_record"]()
    fns["compiled_record"]()
    params = [dict(m.named_parameters()) for m in (target, eager)]
    names = [n for n, p in params[1].items() if p.grad is not None]
    diffs["weight_grad"] = max_rel_err(*({n: p[n].grad.detach().to("cpu", torch.float64) for n in names}
                                         for p in params))
    zero()
    entry["exactness"] = {"max_rel_diff": diffs, "max_rel_diff_grad_sq_sum": diffs["grad_sq_sum"],
                          "recorded_steps": steps_recorded}

    # explain() of the compiled forward inside record (it resets dynamo: last).
    with compiled_stats.record(group_ids):
        explained = dynamo.explain(compiled)(x)
    report["explain_in_record"] = explain_summary(explained)
    entry["dynamo"] = report
    entry["graph_breaks"] = {
        "count": report["first_compiled_record"]["graph_breaks"],
        "reasons": [f"{r['reason']} [{r['site']}] x{r['count']}"
                    for r in report["first_compiled_record"]["graph_break_reasons"]],
    }
    entry["wall_s"] = round(time.perf_counter() - start, 3)
    return entry


def measure(settings: Settings, on_model: Optional[Callable[[dict], None]] = None) -> dict:
    """Every model of ``settings`` (a failing model records its error and the run goes on);
    ``on_model(data)`` after each, so that a run cut short keeps what it measured."""
    start = time.perf_counter()
    saved_threads, saved_nested = torch.get_num_threads(), None
    try:
        device = select_device(settings.device)
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        import torch._dynamo.config as dynamo_config

        if settings.nested_graph_breaks and not hasattr(dynamo_config, "nested_graph_breaks"):
            raise ValueError(f"--nested-graph-breaks: torch {torch.__version__} has no "
                             "torch._dynamo.config.nested_graph_breaks")
        saved_nested = getattr(dynamo_config, "nested_graph_breaks", None)
        if saved_nested is not None:
            dynamo_config.nested_graph_breaks = settings.nested_graph_breaks
        data = {"benchmark": "compile_overhead", "command": settings.command, "environment": environment(device),
                "machine": machine_info(), "settings": dict(asdict(settings), num_groups=NUM_GROUPS, dtype="float32"),
                "results": {}}
        data["environment"]["command"] = settings.command
        for name in settings.models:
            try:
                data["results"][name] = measure_model(name, settings, device)
            except Exception as exc:  # record and go on to the next model
                data["results"][name] = {"source": COMPILE_MODELS[name].source, "error": error_string(exc)}
            _log(f"[{name}] done in {data['results'][name].get('wall_s') or 0:.1f} s")
            data["wall_s"] = round(time.perf_counter() - start, 3)
            data["load_average_after"] = load_average()
            if on_model is not None:
                on_model(data)
    finally:
        torch.set_num_threads(saved_threads)
        if saved_nested is not None:
            import torch._dynamo.config as dynamo_config

            dynamo_config.nested_graph_breaks = saved_nested
    return data


# ------------------------------------------------------------------------------ table
def _cell(r: Optional[dict]) -> str:
    return "–" if not r else f"{r['median']:.2f} [{r['q1']:.2f}–{r['q3']:.2f}]"


def _break_notes(model: str, reasons: List[dict]) -> List[str]:
    """One line per kind of break: how many, and where (``file:line`` x count)."""
    kinds: Dict[str, List[dict]] = {}
    for r in reasons:
        kinds.setdefault(r["reason"], []).append(r)
    lines = []
    for reason, rows in kinds.items():
        where = ", ".join(f"`{r['site']}` ×{r['count']}" for r in rows)
        lines.append(f"* {model}: {sum(r['count'] for r in rows)} × {reason.split(' Explanation:')[0]}, at {where}")
    return lines


def render(data: dict) -> str:
    """Markdown: one row per model (per-round ratios, first-call seconds, compiled graphs run,
    graph breaks, recompiles, exactness), then each model's graph breaks, and a header line."""
    env, s = data.get("environment", {}), data.get("settings", {})
    lines = [
        f"**{env.get('device', '?')}** · torch {env.get('torch')} · {env.get('cpu_threads')} threads · "
        f"torch.compile(backend={s.get('backend')!r}{', mode=' + repr(s['mode']) if s.get('mode') else ''})"
        f"{' · nested_graph_breaks' if s.get('nested_graph_breaks') else ''} · "
        f"spurfast {env.get('spurfast')} ({(env.get('spurfast_commit') or '')[:10]}) · {env.get('date', '')}",
        "",
        f"Time ratios: median [IQR] of per-round ratios over {s.get('repeats')} interleaved rounds after "
        f"{s.get('warmup')} warm-up rounds; first calls compile into an empty inductor cache; graphs: "
        "compiled forward graphs run in one step"
        + (", **quick sizes (smoke test, not a benchmark)**" if s.get("quick") else "") + ".",
        "",
        "| model | B | layers | eager ms | eager+record × eager | compiled × eager, before any record | "
        "compiled × eager, after a record | compiled+record × eager | compiled+record × eager+record | "
        "first call s: compiled / compiled+record / record after compiled | "
        "graphs: compiled before record / in record / compiled after | graph breaks in record | "
        "recompiles in timed steps | max rel diff grad_sq_sum |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    notes = []
    for model, e in data.get("results", {}).items():
        if e.get("error"):
            lines.append(f"| {model} |" + " – |" * 12 + f" error: {e['error'][:100]} |")
            continue
        r, f, d, ran = e["ratios"], e["first_call_s"], e["dynamo"], e["compiled_code_run_per_step"]
        graphs = " / ".join(str(ran[k]["graphs"]) for k in ("compiled_before_record", "compiled_record",
                                                             "compiled_after_record"))
        lines.append(
            f"| {model} | {e['batch_size']} | {e['num_tracked_layers']} | {e['steps']['eager']['median_ms']:.1f} | "
            f"{_cell(r.get('eager_record/eager'))} | {_cell(r.get('compiled_before_record/eager'))} | "
            f"{_cell(r.get('compiled/eager'))} | {_cell(r.get('compiled_record/eager'))} | "
            f"{_cell(r.get('compiled_record/eager_record'))} | "
            f"{f['compiled']:.1f} / {f['compiled_record']:.1f} / {f['compiled_record_after_compiled']:.1f} | "
            f"{graphs} | "
            f"{e['graph_breaks']['count']} | {'yes' if d['recompiled_during_timed_steps'] else 'no'} | "
            f"{e['exactness']['max_rel_diff_grad_sq_sum']:.1e} |")
        notes += _break_notes(model, d["first_compiled_record"]["graph_break_reasons"])
    if notes:
        lines += ["", "Graph breaks dynamo logged in the first compiled `record` step:", ""] + notes
    return "\n".join(lines)
