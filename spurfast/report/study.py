"""Write a study's outputs into its run folder: ``results.json`` (every number), ``tables.md``,
the PNG figures and one self-contained ``report.html``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional

from spurfast.report.html import write_report
from spurfast.report.plots import make_figures
from spurfast.report.tables import all_tables


def json_safe(value):
    """``value`` with NaN/Inf replaced by ``None``, so that the file is strict JSON any reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_study(results: Dict, out_dir: Path, *, title: str, train=None, meta: Optional[Dict] = None,
                intro: str = "") -> Dict[str, Path]:
    """Write everything; returns ``{"results": ..., "tables": ..., "report": ..., <figure name>: ...}``.

    ``train``: the training set, for the figures that show its samples (images and group ids).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = group_ids = None
    if train is not None:
        from spurfast.attribution.scores import as_tensors

        images, _, group_ids = as_tensors(train, "train")
    figures = make_figures(results, out_dir, images, group_ids)
    tables = all_tables(results)
    results = dict(results, figures={k: p.name for k, p in figures.items()}, meta=meta or {})
    paths = {"results": out_dir / "results.json", "tables": out_dir / "tables.md", "report": out_dir / "report.html"}
    paths["results"].write_text(json.dumps(json_safe(results), indent=1, allow_nan=False) + "\n")
    paths["tables"].write_text("\n\n".join(f"**{t.title}**\n\n{t.to_markdown()}" for t in tables) + "\n")
    write_report(paths["report"], title, tables, figures, meta=meta, intro=intro)
    return dict(paths, **figures)
