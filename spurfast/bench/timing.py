"""Timing helpers shared by the benchmarks: per-call timers (CUDA events on GPU,
``perf_counter`` on CPU), repeat counts cut to a time budget, interleaved CPU repeats,
quantile summaries, per-call peak RSS, and how busy the machine was (on a small shared
CPU a neighbour's process moves every number)."""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"
MIN_REPEATS = 3


def repeats_within(budget_s: Optional[float], call_s: float, repeats: int) -> int:
    """`repeats`, cut so that the timed calls take about `budget_s` (never below
    MIN_REPEATS): keeps a slow method from dominating the run time."""
    if budget_s is None or call_s <= 0:
        return repeats
    return max(min(repeats, MIN_REPEATS), min(repeats, int(budget_s / call_s)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device,
               budget_s: Optional[float] = None) -> List[float]:
    """Milliseconds per call of ``fn`` after ``warmup`` untimed calls: CUDA events on GPU
    (launched back to back, one synchronisation at the end), ``perf_counter`` on CPU.

    With ``budget_s``, warm-up stops once it has taken half the budget, and ``repeats`` is
    cut by :func:`repeats_within` from the warm-up calls' mean duration.

    Example::

        >>> times = time_calls(lambda: sum(range(100)), warmup=1, repeats=4, device=torch.device("cpu"))
        >>> len(times), all(t >= 0 for t in times)
        (4, True)
    """
    calls, start = 0, time.perf_counter()
    for _ in range(warmup):
        fn()
        calls += 1
        if budget_s is not None:
            _sync(device)  # so that the elapsed time is the GPU's too
            if time.perf_counter() - start > budget_s / 2:
                break
    _sync(device)
    if calls and budget_s is not None:
        repeats = repeats_within(budget_s, (time.perf_counter() - start) / calls, repeats)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start_event, end_event in zip(starts, ends):
            start_event.record()
            fn()
            end_event.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def median_iqr(times_ms: Sequence[float]) -> Tuple[float, float]:
    """(median, interquartile range) in ms, quartiles by linear interpolation."""
    t = torch.tensor(list(times_ms), dtype=torch.float64)
    q25, q50, q75 = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return q50, q75 - q25


def summarize(times_ms: List[float], cpu_ms: Optional[List[float]] = None) -> Dict[str, object]:
    """Median, quartiles and IQR of repeat times in ms (quartiles by the 'inclusive' rule, so
    that three repeats give min/median/max); `cpu_ms`, the process CPU time of the same calls
    (all threads), adds its median: less moved than wall time by other processes' load.

    Example::

        >>> s = summarize([3.0, 1.0, 2.0])
        >>> s["median_ms"], s["q1_ms"], s["q3_ms"], s["repeats"]
        (2.0, 1.5, 2.5, 3)
    """
    if len(times_ms) > 1:
        q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    else:
        q1 = q3 = times_ms[0]
    return {
        "median_ms": statistics.median(times_ms),
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": min(times_ms),
        "repeats": len(times_ms),
        "cpu_median_ms": statistics.median(cpu_ms) if cpu_ms else None,
        "runs_ms": [round(t, 3) for t in times_ms],
    }


# ------------------------------------------------------------------------- CPU memory
def _status_kib(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_supported() -> bool:
    """Linux lets a process reset its own RSS high-water mark (VmHWM) by writing 5 to
    clear_refs; without that, peak RSS would be a process-lifetime figure, useless per call."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def mmap_large_allocations(threshold_bytes: int = 1 << 16) -> bool:
    """Tell glibc to serve allocations of ``threshold_bytes`` or more by mmap and to give the
    memory back at free (and to trim the heap top early), for this process from now on, so that
    the resident set tracks the tensors alive. Returns False where this is not glibc. By
    default glibc raises its mmap threshold after large frees and keeps freed memory in the
    heap: a call that reuses it shows no growth at all."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, threshold_bytes)) and bool(mallopt(m_trim_threshold, threshold_bytes))


class PeakRSS:
    """Peak resident memory of the process above its level at entry, in bytes, for one call.
    torch's CPU allocator hands large blocks straight back to the OS, so this tracks tensors."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.delta_bytes: Optional[int] = None

    def __enter__(self) -> "PeakRSS":
        if self.enabled:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
            self._start_kib = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.delta_bytes = max(0, (_status_kib("VmHWM") - self._start_kib) * 1024)


def time_call(fn: Callable[[], object], measure_memory: bool = False) -> Tuple[float, float, Optional[int]]:
    """(wall ms, process CPU ms, peak RSS above the start in bytes or None) of one call."""
    with PeakRSS(measure_memory) as mem:
        cpu_start = time.process_time()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        cpu_elapsed = time.process_time() - cpu_start
    return elapsed * 1e3, cpu_elapsed * 1e3, mem.delta_bytes


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    measure_memory: bool = False,
    between: Optional[Callable[[], object]] = None,
    budget_s: Optional[float] = None,
) -> Dict[str, Dict[str, object]]:
    """Time every function `repeats` times after `warmup` untimed calls, running them in
    rounds (one call of each per round, order rotated every round) so that a load change on
    the machine hits all of them alike instead of biasing whichever ran during it.

    `between` runs untimed after every call (e.g. zeroing .grad). With `measure_memory`,
    each entry also gets `peak_rss_delta_bytes`: the largest over its timed calls. With
    `budget_s`, the last warm-up round's duration sets `repeats_within(budget_s, ...)`."""
    names = list(fns)
    round_s = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        for name in names:
            fns[name]()
            if between is not None:
                between()
        round_s = time.perf_counter() - start
    repeats = repeats_within(budget_s, round_s, repeats)
    times: Dict[str, List[float]] = {name: [] for name in names}
    cpu: Dict[str, List[float]] = {name: [] for name in names}
    peaks: Dict[str, int] = {name: 0 for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            wall_ms, cpu_ms, peak = time_call(fns[name], measure_memory)
            times[name].append(wall_ms)
            cpu[name].append(cpu_ms)
            if peak is not None:
                peaks[name] = max(peaks[name], peak)
            if between is not None:
                between()
    out = {}
    for name in names:
        out[name] = summarize(times[name], cpu[name])
        out[name]["peak_rss_delta_bytes"] = peaks[name] if measure_memory else None
    return out


# ------------------------------------------------------------------------- machine load
class OtherLoad:
    """Average number of CPU cores kept busy by *other* processes while the block ran, from
    /proc/stat (all CPUs) minus this process's own ticks; None where /proc is missing."""

    def __init__(self):
        self.cores: Optional[float] = None

    @staticmethod
    def _ticks():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        with open("/proc/self/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        own = int(stat[11]) + int(stat[12])  # utime + stime of this process, all threads
        return sum(fields[:8]), sum(fields[:8]) - idle, own

    def __enter__(self) -> "OtherLoad":
        try:
            self._start = self._ticks()
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        total, busy, own = (b - a for a, b in zip(self._start, self._ticks()))
        if total > 0:
            self.cores = round(max(0, busy - own) / total * (os.cpu_count() or 1), 2)


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> Dict[str, object]:
    """The CPU side of the machine, with its load average at the time of the call."""
    return {
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_parallel_info": torch.__config__.parallel_info(),
        "load_average_1_5_15min": load_average(),
    }
