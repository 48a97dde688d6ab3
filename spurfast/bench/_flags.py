"""Parsing of the list-valued flags the benchmark commands share; errors are ValueError
naming the flag, so that a command can print them as one line. Also their ``--render``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence


def parse_list(text: Optional[str], allowed: Sequence[str], flag: str) -> Optional[List[str]]:
    """``"a,b"`` -> ``["a", "b"]``, each checked against ``allowed`` (None stays None)."""
    if text is None:
        return None
    items = [v.strip() for v in str(text).split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError(f"{flag} must be a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return items


def parse_batch_sizes(text: Optional[str], models: Sequence[str], flag: str = "--batch-size") -> Dict[str, int]:
    """``"64"`` (every model) or ``"name=64,other=8"`` -> {model: batch}; {} for None."""
    if not text:
        return {}
    try:
        if "=" not in str(text):
            sizes = {m: int(text) for m in models}
        else:
            sizes = {}
            for part in str(text).split(","):
                name, _, value = part.partition("=")
                name = name.strip()
                if name not in models:
                    raise ValueError(f"{flag}: {name!r} is not among the models run ({','.join(models)})")
                sizes[name] = int(value)
    except ValueError as exc:
        if str(exc).startswith(flag):
            raise
        raise ValueError(f"{flag} must be an int or name=int pairs, got {text!r}") from None
    bad = {m: b for m, b in sizes.items() if b < 1}
    if bad:
        raise ValueError(f"{flag} must be positive, got {bad}")
    return sizes


def render_file(path: Path, render: Callable[[dict], str]) -> dict:
    """``--render JSON``: print the table of a results file; return its data."""
    data = json.loads(Path(path).read_text())
    print(render(data))
    return data
