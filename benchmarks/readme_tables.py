"""Regenerate (or check) the README's result tables from the committed results.

Each table in README.md sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``; NAME is
one of :data:`TABLES`, rendered by :mod:`spurfast.report.tables` (or the benchmark's own
markdown) from the JSON under ``benchmarks/results/`` that the command printed next to it wrote.

    python benchmarks/readme_tables.py           # rewrite the tables in README.md
    python benchmarks/readme_tables.py --check   # exit 1 if any table differs (run by the tests)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spurfast.bench import compiled as compile_bench  # noqa: E402
from spurfast.bench import cpu_backends  # noqa: E402
from spurfast.bench import masked_step  # noqa: E402
from spurfast.bench import profile as scoring_profile  # noqa: E402
from spurfast.bench import sweep as batch_sweep  # noqa: E402
from spurfast.bench import throughput  # noqa: E402
from spurfast.experiments import example_tied  # noqa: E402
from spurfast.report import localization as L  # noqa: E402
from spurfast.report import rare as rare_report  # noqa: E402
from spurfast.report import tables as T  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _study(name):
    return lambda: json.loads((RESULTS / name / "results.json").read_text())


def _json(name):
    return lambda: json.loads((RESULTS / name).read_text())


#: name -> (loader of the results, renderer of the markdown)
TABLES = {
    "demo_summary": (_study("demo"), lambda r: T.summary_table(r).to_markdown()),
    "demo_framework": (_study("demo"), lambda r: T.framework_table(r).to_markdown()),
    "demo_rare_score": (_study("demo"), lambda r: T.rare_tables(r)[0].to_markdown()),
    "demo_rare_localization": (_study("demo"), lambda r: T.rare_tables(r)[1].to_markdown()),
    "memorization_seeds": (_study("memorization_synth"), lambda r: T.seeds_table(r).to_markdown()),
    "memorization_train": (_study("memorization_synth"), lambda r: T.claim_table(r, "train").to_markdown()),
    "memorization_test": (_study("memorization_synth"), lambda r: T.claim_table(r, "test").to_markdown()),
    "memorization_oracle": (_study("memorization_synth"), lambda r: T.oracle_table(r).to_markdown()),
    "memorization_self_influence": (_study("memorization_synth"), lambda r: T.self_influence_table(r).to_markdown()),
    "localization_scores": (_json("localization_synth.json"), lambda r: L.score_table(r).to_markdown()),
    "localization_verified": (_json("localization_synth.json"), lambda r: L.claim_table(r, "verified").to_markdown()),
    "localization_split_half": (_json("localization_synth.json"), lambda r: L.split_half_table(r).to_markdown()),
    "localization_memorized": (_json("localization_synth.json"), lambda r: L.memorized_table(r).to_markdown()),
    "erm": (_json("erm_synth_waterbirds.json"), lambda r: r["table_markdown"]),
    "erm_textured_fashion": (_json("erm_textured_fashion.json"), lambda r: r["table_markdown"]),
    "localization_tf_scores": (_json("localization_textured_fashion.json"), lambda r: L.score_table(r).to_markdown()),
    "localization_tf_verified": (_json("localization_textured_fashion.json"),
                                 lambda r: L.claim_table(r, "verified").to_markdown()),
    "localization_tf_split_half": (_json("localization_textured_fashion.json"),
                                   lambda r: L.split_half_table(r).to_markdown()),
    "cpu_backends": (_json("cpu_backends.json"), lambda r: cpu_backends.render(r)),
    "cpu_backends_layers": (_json("cpu_backends.json"), lambda r: cpu_backends.render_layers(r)),
    "masked_step": (_json("masked_step/masked_step.json"), lambda r: masked_step.render(r)),
    "scoring_profile": (_json("scoring_profile/scoring_profile.json"), lambda r: scoring_profile.render(r)),
    "bench_cpu": (_json("bench_cpu/results.json"), lambda r: throughput.render_table(r)),
    "compile_cpu": (_json("compile_cpu.json"), lambda r: compile_bench.render(r)),
    "bench_cpu_targets": (_json("bench_cpu/results.json"), lambda r: throughput.render_cpu_targets(r)),
    "batch_sweep": (_json("batch_sweep/batch_sweep.json"), lambda r: batch_sweep.render(r)),
    "example_tied": (_study("example_tied"), lambda r: example_tied.markdown_tables(r).strip()),
    "silent_majority_synth": (_study("silent_majority_synth"), lambda r: r["table_markdown"].split("\n\n")[0]),
    "rare_spurious": (_study("rare_spurious"), lambda r: rare_report.rare_markdown(r)),
    "silent_majority_textured": (_study("silent_majority_textured"), lambda r: r["table_markdown"].split("\n\n")[0]),
}

# A region's body never contains another region's start, so an empty region cannot swallow the next.
_REGION = re.compile(r"(<!-- table: (?P<name>[a-z_]+) -->\n)(?P<body>(?:(?!<!-- table:).)*?)(<!-- /table -->)", re.S)


def render(name: str) -> str:
    load, to_markdown = TABLES[name]
    return to_markdown(load()).strip()


def update(text: str):
    """``(new text, names of the regions that changed, unknown names)``."""
    changed, unknown = [], []

    def replace(match):
        name = match.group("name")
        if name not in TABLES:
            unknown.append(name)
            return match.group(0)
        body = render(name)
        if body != match.group("body").strip():
            changed.append(name)
        return match.group(1) + body + "\n" + match.group(4)

    return _REGION.sub(replace, text), changed, unknown


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only check; exit 1 when a table differs")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    text = args.readme.read_text()
    new, changed, unknown = update(text)
    if unknown:
        print(f"unknown tables in {args.readme}: {unknown}", file=sys.stderr)
        return 1
    if args.check:
        if changed:
            print(f"README tables differ from the committed results: {changed}", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new)
    print(f"updated {changed or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
