"""Tables of the localization benchmark (the dict :func:`spurfast.experiments.localization.run_localization`
returns); the README's localization tables are these functions' output on the committed JSON."""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional

from spurfast.report.tables import Table, _num


def _claim(summary: Dict, mode: str, sigma, k: int, split: str) -> Optional[Dict]:
    for c in summary["claims"]:
        if c["mode"] == mode and c["sigma"] == sigma and c["k"] == k and c["split"] == split:
            return c
    return None


def _ranks(ranks: List[Optional[int]]) -> str:
    return "/".join("-" if r is None else str(r) for r in ranks)


def score_table(results: Dict) -> Table:
    """Per score: how often its top unit is group-specific, Spearman with the oracle, ranks, drops, the claim."""
    minority = results["data"]["minority"]
    by_score: Dict[str, List[Dict]] = {}
    for s in results["summary"]:
        by_score.setdefault(s["score"], []).append(s)
    seconds: Dict[str, List[float]] = {}
    for seed in results["seeds"]:
        for name, value in seed["seconds"]["scores"].items():
            seconds.setdefault(name, []).append(value)
    rows = []
    for name, entries in by_score.items():
        entries = sorted(entries, key=lambda e: e["group"])
        cases = sum(e["seeds_with_specific_unit"] for e in entries)
        top1 = sum(e["top1_specific"] for e in entries)
        rhos = [e["spearman_mean"] for e in entries if e["spearman_mean"] is not None]
        claims = []
        for e in entries:
            c = _claim(e, "zero", None, 1, "train")
            claims.append("-" if c is None else f"{_num(c['target_drop'])}{' ✓' if c['claim_met'] else ''}")
        if name.endswith("_x1.5"):  # one pass per objective and flip scale serves its scores
            key = "ablation_margin_x1.5"
        else:
            key = next((k for k in ("ablation_loss", "ablation_margin") if name.startswith(k + "_")), name)
        secs = seconds.get(key)
        rows.append([
            name, f"{top1} / {cases}", _num(statistics.fmean(rhos), 2) if rhos else "-",
            "; ".join(f"g{e['group']}: {_ranks(e['rank_first_specific'])}" for e in entries),
            " / ".join(_num(e["top1_target_drop_mean"]) for e in entries),
            " / ".join(claims), _num(statistics.fmean(secs), 1) if secs else "-",
        ])
    groups = "/".join(f"g{t}" for t in minority)
    title = f"Scores against the exact oracle ({len(results['seeds'])} seeds x {len(minority)} minority groups)"
    pools = [seed["pool"] for seed in results["seeds"] if seed.get("pool")]
    if pools:
        cfg = results["config"]
        title += (f"; oracle over a pool of {round(statistics.fmean(p['units'] for p in pools))} of "
                  f"{pools[0]['eligible']} units, Spearman over the {pools[0]['drawn']} drawn uniformly, "
                  f"1st specific unit searched in each score's top {cfg['pool_top']} (verified: its "
                  f"{cfg['candidates']} candidates)")
    if results["seeds"] and results["seeds"][0].get("probe_group_counts"):
        title += f"; train readout on a probe, group counts {results['seeds'][0]['probe_group_counts']}"
    return Table(
        ["score", "top-1 group-specific (cases)", "mean Spearman", "rank of 1st specific unit (seeds)",
         f"top-1 train drop {groups} (pts)", f"claim k=1 zero, train drop {groups} (✓ met)", "score s"],
        rows, title)


def claim_table(results: Dict, score: str) -> Table:
    """The paper's claim for one score: drops (mean over seeds) of the target, majority and control."""
    rows = []
    for e in sorted((s for s in results["summary"] if s["score"] == score), key=lambda e: e["group"]):
        for c in e["claims"]:
            rows.append([
                str(e["group"]), c["mode"], "-" if c["sigma"] is None else str(c["sigma"]), str(c["k"]), c["split"],
                _num(c["target_drop"]), " / ".join(_num(v) for v in c["majority_drop"].values()),
                _num(c["control_target_drop"]), "yes" if c["claim_met"] else "no",
            ])
    return Table(["target", "mode", "sigma", "k", "split", "target drop", "majority drops", "control drop",
                  "claim met"], rows, f"The paper's claim with the {score} units (points, mean over seeds)")


def split_half_table(results: Dict) -> Table:
    """Selected and verified on half A of each group's training samples, read out on half B."""
    rows = []
    majority = results["data"]["majority"]
    for seed in results["seeds"]:
        for target, entry in (seed.get("split_half") or {}).items():
            t = int(target)
            for name in ("verified", "unverified"):
                e = entry[name]
                a, b = e["drop_on_a"][0], e["drop_on_b"][0]
                rows.append([
                    str(seed["seed"]), target, name, e["units"][0],
                    f"{_num(a[t])} / {_num(max(a[m] for m in majority))}",
                    f"{_num(b[t])} / {_num(max(b[m] for m in majority))}",
                    "yes" if e["top1_specific_on_b"] else "no",
                ])
    return Table(["seed", "target", "selection", "top-1 unit", "half A: target / worst majority drop",
                  "half B: target / worst majority drop", "specific on B"],
                 rows, "Split-half check: select (and verify) on half A, read out on half B")


def memorized_table(results: Dict) -> Table:
    """Per verified unit: samples flagged first-order, flipped exactly, precision and recall."""
    rows = []
    for seed in results["seeds"]:
        for target, units in seed.get("memorized", {}).items():
            for m in units:
                rows.append([
                    str(seed["seed"]), target, m["unit"], str(m["flagged"]), str(m["exact"]), str(m["confirmed"]),
                    _num(m["precision"], 2), _num(m["recall"], 2), " / ".join(str(c) for c in m["exact_groups"]),
                ])
    groups = "/".join(f"g{g}" for g in range(results["data"]["num_groups"]))
    return Table(["seed", "target", "unit", "flagged (1st order)", "flipped (exact)", "both", "precision", "recall",
                  f"exact flips {groups}"], rows, "Which training samples each verified unit holds")


def localization_tables(results: Dict) -> List[Table]:
    tables = [score_table(results)]
    if any(s["score"] == "verified" for s in results["summary"]):
        tables.append(claim_table(results, "verified"))
    if any(seed.get("split_half") for seed in results["seeds"]):
        tables.append(split_half_table(results))
    if any(seed.get("memorized") for seed in results["seeds"]):
        tables.append(memorized_table(results))
    return tables
