"""How spurfast's cost over a plain step changes with the batch size, on CPU: for each model and
batch, rounds of one plain step and one step of each spurfast variant in alternation
(:func:`spurfast.bench.throughput.paired_ratios`), so that every ratio is measured side by
side on a shared machine. Used by ``benchmarks/batch_sweep.py``.

Example::

    >>> data = sweep(["mlp"], [2, 4], pairs=2, tiny=True)
    >>> sorted(data["results"]["mlp"]), sorted(data["results"]["mlp"]["2"])
    (['2', '4'], ['spurfast', 'spurfast_nogroup'])
"""
from __future__ import annotations

import gc
import time
from typing import Dict, Optional, Sequence

import torch

from spurfast.bench.environment import environment
from spurfast.bench.models import MODEL_SPECS, build_model, prepare_model
from spurfast.bench.throughput import PAIRED_METHODS, Settings, make_batch, paired_ratios

__all__ = ["sweep", "render"]


def sweep(models: Sequence[str], batches: Sequence[int], pairs: int = 10, tiny: bool = False, seed: int = 0,
          time_limit_s: Optional[float] = None, on_result=None) -> Dict[str, object]:
    """``{"results": {model: {str(batch): {method: paired row}}}, ...}``; what would start after
    ``time_limit_s`` is recorded as skipped."""
    bad = [m for m in models if m not in MODEL_SPECS]
    if bad or not models:
        raise ValueError(f"--models must be a non-empty subset of {','.join(MODEL_SPECS)}, got {list(models)}")
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"--batches must be positive ints, got {list(batches)}")
    if pairs < 1:
        raise ValueError(f"--pairs must be >= 1, got {pairs}")
    start = time.perf_counter()
    data: Dict[str, object] = {"benchmark": "batch_sweep", "environment": environment(torch.device("cpu")),
                               "settings": {"models": list(models), "batches": list(batches), "pairs": pairs,
                                            "tiny": tiny, "seed": seed, "methods": list(PAIRED_METHODS)},
                               "sources": {}, "results": {}}
    for model_name in models:
        torch.manual_seed(seed)
        built, source = build_model(model_name, tiny, allow_standin=True)
        base = prepare_model(built)
        data["sources"][model_name] = source
        rows: Dict[str, object] = data["results"].setdefault(model_name, {})
        for batch in batches:
            if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                rows[str(batch)] = {"skipped": f"time limit {time_limit_s:g} s reached"}
                continue
            settings = Settings(models=[model_name], batch_sizes={model_name: batch}, pairs=pairs, tiny=tiny, seed=seed)
            x, y, group_ids = make_batch(model_name, batch, tiny, torch.device("cpu"), seed)
            rows[str(batch)] = paired_ratios(base, x, y, group_ids, settings, PAIRED_METHODS)
            gc.collect()
            data["wall_s"] = round(time.perf_counter() - start, 1)
            if on_result is not None:
                on_result(data)
    data["wall_s"] = round(time.perf_counter() - start, 1)
    return data


def render(data: Dict[str, object]) -> str:
    """Markdown: one row per model and batch, spurfast's paired ratio to plain with and without group sums."""
    env = data["environment"]
    lines = [f"**{env.get('device')}**, {env.get('cpu_threads')} threads, torch {env.get('torch')}; "
             f"median [IQR] over {data['settings']['pairs']} alternating rounds of the per-round ratio to plain",
             "", "| model | B | plain ms | spurfast × plain | without group_grad × plain |", "|---|---:|---:|---:|---:|"]
    for model, rows in data["results"].items():
        for batch, row in rows.items():
            if "skipped" in row:
                lines.append(f"| {model} | {batch} | – | skipped | {row['skipped']} |")
                continue
            a, b = row["spurfast"], row["spurfast_nogroup"]
            lines.append(f"| {model} | {batch} | {a['plain_ms_median']:.1f} | {a['ratio_median']:.2f} "
                         f"[{a['ratio_iqr'][0]:.2f}–{a['ratio_iqr'][1]:.2f}] | {b['ratio_median']:.2f} "
                         f"[{b['ratio_iqr'][0]:.2f}–{b['ratio_iqr'][1]:.2f}] |")
    return "\n".join(lines)
