"""One self-contained HTML page of a study: tables and figures inline (PNG as data URIs, CSS in
the page, no script), so it opens from disk with no network and can be mailed as one file."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from spurfast.report.tables import Table

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #1d1d1f; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.82em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } tr:nth-child(even) td { background: #fafafa; }
figure { margin: 0.8em 0 1.6em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85em; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
"""

#: Section titles and the figure each section shows, in page order.
FIGURE_CAPTIONS = {
    "training": "Training loss and per-group accuracy per epoch (first seed): the minority groups are fit late, by memorization.",
    "trace_train": "Train accuracy change per group after intervening on the top-k units (solid) and on random units (dashed).",
    "trace_test": "The same on the balanced test set.",
    "oracle": "Each eligible unit zeroed alone: the study's score (x) against the measured drop of the target group (y).",
    "self_influence": "Per-sample TracIn self-influence by group: memorized minority samples carry more.",
    "top_samples": "The training images that load each minority group's first localized unit most.",
    "framework": "ERM vs framework: test accuracy per group of the ERM model, the control, the dense/masked "
                 "framework fine-tuned from it and DFR.",
    "rare": "Rare patterns: the spurious score against the number of poisoned training images, per pattern "
            "(n = 0: the model trained on clean data).",
}


def _image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_report(
    path: Path,
    title: str,
    tables: Sequence[Table],
    figures: Mapping[str, Path],
    meta: Optional[Dict[str, object]] = None,
    intro: str = "",
) -> Path:
    """Write the page to ``path``: a header with ``meta`` (settings, versions, timings), every
    table, then every figure with its caption."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    if meta:
        items = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(_short(v))}</li>" for k, v in meta.items())
        parts.append(f'<ul class="meta">{items}</ul>')
    for table in tables:
        parts.append(f"<h2>{html.escape(table.title)}</h2>" + table.to_html())
    if figures:
        parts.append("<h2>Figures</h2>")
    for name, fig_path in figures.items():
        caption = FIGURE_CAPTIONS.get(name, name)
        parts.append(f"<figure>{_image_tag(fig_path, name)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _short(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)
