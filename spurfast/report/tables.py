"""Tables of a memorization study's results (the dict :func:`spurfast.experiments.memorization.run_study`
returns), each as a :class:`Table` that renders to Markdown (README, terminal) and HTML (report).

The README's tables are these functions' output on the committed results, so a test can check
that the README shows what the command printed next to it produces.
"""
from __future__ import annotations

import html
import math
from typing import Dict, List, Optional, Sequence


class Table:
    """A header and rows of already-formatted cells."""

    def __init__(self, header: Sequence[str], rows: Sequence[Sequence[str]], title: str = ""):
        self.header, self.rows, self.title = list(header), [list(r) for r in rows], title

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{_md_to_html(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_to_html(cell: str) -> str:
    text = html.escape(cell)
    if text.startswith("**") and text.endswith("**") and len(text) > 4:
        return f"<strong>{text[2:-2]}</strong>"
    return text


def _num(x: Optional[float], digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _accs(values: Sequence[Optional[float]]) -> str:
    return " / ".join(_num(v) for v in values)


def _sigma(s) -> str:
    return "-" if s is None else str(s)


def _group(results: Dict, g: int) -> str:
    return f"{g} ({results['data']['group_names'][g]})"


def seeds_table(results: Dict) -> Table:
    """Per seed: accuracy per group before any intervention, and the localized units."""
    rows = []
    for run in results["runs"]:
        units = "; ".join(f"g{t}: {', '.join(us)}" for t, us in run["localized"].items())
        rows.append([str(run["seed"]), _accs(run["before_group_acc"]["train"]), _accs(run["before_group_acc"]["test"]), units])
    groups = "/".join(f"g{g}" for g in range(results["data"]["num_groups"]))
    return Table(["seed", f"train acc {groups} (%)", f"test acc {groups} (%)", "localized units, best first (layer:channel)"],
                 rows, "Accuracy before intervening, and the units localized for each minority group")


def claim_table(results: Dict, split: str) -> Table:
    """Drops of the target, the majority groups and the random control, mean over seeds."""
    majority = results["data"]["majority"]
    rows = []
    for s in results["summary"]:
        if s["split"] != split:
            continue
        rows.append([
            str(s["target"]), s["mode"], _sigma(s["sigma"]), str(s["k"]),
            f"{_num(s['target_drop'])} ± {_num(s['target_drop_std_over_seeds'])}",
            " / ".join(_num(d, 0) for d in s["target_drop_per_seed"]),
            " / ".join(_num(s["majority_drop"][str(g)]) for g in majority),
            ", ".join(_num(v) for v in s["other_minority_drop"].values()) or "-",
            _num(s["control_target_drop"]),
            "**yes**" if s["claim_met"] else "no",
        ])
    maj = " / ".join(f"g{g}" for g in majority)
    return Table(
        ["target", "mode", "σ", "k", "target drop (pts, mean ± sd over seeds)", "per seed", f"majority drops {maj}",
         "other minority drop", "random-units drop of target", "claim met"],
        rows, f"{split.capitalize()} accuracy drops after intervening on the top-k units (positive = accuracy fell)",
    )


def oracle_table(results: Dict) -> Optional[Table]:
    """Where the score ranks the units whose removal alone hurts one minority group."""
    rows = []
    for run in results["runs"]:
        if not run["oracle"]:
            continue
        for target, o in run["oracle"]["targets"].items():
            best = "; ".join(
                f"{b['unit']}: {'/'.join(_num(d, 0) for d in b['drop'])} (#{b['score_rank'] + 1})" for b in o["best_specific"][:3]
            ) or "none"
            top = ", ".join(_num(t["drop"][int(target)]) for t in o["score_top3"])
            rows.append([str(run["seed"]), target, f"{o['group_specific_units']} / {o['units']}", best, top,
                         _num(o["spearman_score_vs_target_drop"], 2)])
    if not rows:
        return None
    groups = "/".join(f"g{g}" for g in range(results["data"]["num_groups"]))
    return Table(
        ["seed", "target", "group-specific units / eligible", f"best specific units: drops {groups} (rank by score)",
         "score's top-3: target drop each", "Spearman(score, target drop)"],
        rows, "Exact ablation oracle: every eligible unit zeroed alone (train accuracy)",
    )


def self_influence_table(results: Dict) -> Optional[Table]:
    rows = []
    minority = results["data"]["minority"]
    for run in results["runs"]:
        si = run["self_influence"]
        if not si:
            continue
        per_target = " / ".join(_num(si["auroc_per_target_vs_majority"][str(t)], 3) for t in minority)
        restricted = " / ".join(_num(si["unit_restricted"][str(t)]["auroc_target_vs_majority"], 3) for t in minority)
        held = " / ".join(
            _num(100 * _mean([v["fraction_in_target"] for v in si["unit_restricted"][str(t)]["top_samples"].values()]), 0)
            for t in minority
        )
        rows.append([str(run["seed"]), _num(si["auroc_minority_vs_majority"], 3), _num(si["auroc_final_checkpoint_only"], 3),
                     per_target, restricted, held])
    if not rows:
        return None
    mins = " / ".join(f"g{t}" for t in minority)
    return Table(
        ["seed", "AUROC minority vs majority (TracIn, all checkpoints)", "final checkpoint only",
         f"{mins} vs majority", f"restricted to the group's units: {mins}",
         f"top samples of the units that are in the group (%): {mins}"],
        rows, "Per-sample self-influence: do memorized (minority) samples stand out?",
    )


def summary_table(results: Dict) -> Table:
    """The short table the CLI prints at the end: per minority group, the best-supported result."""
    rows = []
    data = results["data"]
    for target in data["minority"]:
        entries = [s for s in results["summary"] if s["target"] == target and s["split"] == "train"]
        best = max(entries, key=lambda s: (s["claim_met"], s["target_drop"] - max(s["majority_drop"].values())))
        units = results["runs"][0]["localized"][str(target)]
        worst_majority = max(best["majority_drop"].values())
        aurocs = [r["self_influence"]["auroc_per_target_vs_majority"][str(target)] for r in results["runs"] if r["self_influence"]]
        rows.append([
            _group(results, target), str(data["train_group_counts"][target]), ", ".join(units),
            f"{best['mode']}{'' if best['sigma'] is None else ' σ=' + str(best['sigma'])}, k={best['k']}",
            _num(best["target_drop"]), _num(worst_majority), _num(best["control_target_drop"]),
            "**yes**" if best["claim_met"] else "no", _num(_mean(aurocs), 3) if aurocs else "-",
        ])
    return Table(
        ["minority group", "train n", "localized units (seed %d)" % results["runs"][0]["seed"], "best intervention",
         "target drop (pts)", "worst majority drop", "random-units drop", "claim met", "self-influence AUROC vs majority"],
        rows, "Summary (train accuracy; means over seeds)",
    )


#: What each method of the "ERM vs framework" section is, for the report's reader.
FRAMEWORK_METHODS = {
    "erm": "the demo's ERM model",
    "erm_continued": "control: ERM continued as long, same optimizer and rate",
    "framework_features": "dense/masked framework, NT-Xent on penultimate features (the paper's text)",
    "framework_softmax": "dense/masked framework, NT-Xent on softmax outputs (the paper's code)",
    "framework_logits": "dense/masked framework, NT-Xent on logits",
    "dfr": "reference: last layer refit on group-balanced validation data (uses its group labels)",
}


def framework_table(results: Dict) -> Optional[Table]:
    """ERM against the dense/masked framework fine-tuned from it (and the control, DFR): test
    accuracy per group, average and worst group, and the minority groups' memorization gap."""
    section = results.get("framework")
    if not section:
        return None
    groups = "/".join(f"g{g}" for g in range(results["data"]["num_groups"]))
    rows = []
    for name, row in section["rows"].items():
        rows.append([name, FRAMEWORK_METHODS.get(name, ""), _num(row["test_avg_acc"]), _num(row["test_worst_group_acc"]),
                     _accs(row["test_group_acc"]), _accs(row["train_group_acc"]), _num(row["minority_gap"]),
                     _num(row["seconds"], 0)])
    minority = " / ".join(f"g{g}" for g in section["minority_groups"])
    return Table(
        ["method", "what", "test avg (%)", "test worst group (%)", f"test acc {groups} (%)", f"train acc {groups} (%)",
         f"memorization gap {minority} (train - test, pts)", "s"],
        rows, f"ERM vs framework (seed {section['seed']}; {section['config']['epochs']} fine-tuning epochs, "
              f"{100 * section['config']['prune_fraction']:g} % of weights masked per epoch)",
    )


def rare_tables(results: Dict) -> List[Table]:
    """The "rare patterns" section (one seed of :mod:`spurfast.experiments.rare`): the spurious
    score against the number of poisoned images per pattern, and the score with the units that
    carry the pattern zeroed against random units of the same layers."""
    rare = results.get("rare")
    if not rare:
        return []
    cfg = rare["config"]
    ns = sorted({r["n"] for r in rare["runs"]})
    by_case = {(r["pattern"], r["n"]): r for r in rare["runs"]}
    rows = []
    for pattern in cfg["patterns"]:
        runs = [by_case[(pattern, n)] for n in ns if (pattern, n) in by_case]
        rows.append([pattern, _num(runs[0]["pattern_l2"], 2)]
                    + [_num(by_case[(pattern, n)]["spurious_score"], 3) if (pattern, n) in by_case else "-" for n in ns]
                    + [_num(100 * by_case[(pattern, max(ns))]["test_acc"])])
    score = Table(["pattern", "l2 norm"] + ["n = 0 (clean control)" if n == 0 else f"n = {n}" for n in ns]
                  + [f"test acc at n = {max(ns)} (%)"], rows,
                  f"Rare patterns: spurious score against n poisoned images of class {cfg['target_class']} "
                  f"(SynthWaterbirds, {rare['data']['n_train']} training images, {cfg['epochs']} epochs, "
                  f"seed {cfg['seeds'][0]})")
    tables = [score]
    rows = []
    for rec in rare.get("localization", []):
        rows.append([rec["pattern"], str(rec["n"]), "0", _num(rec["before"]["spurious_score"], 3), "-",
                     _num(100 * rec["before"]["clean_acc"]), "-"])
        for r in rec["rows"]:
            rows.append([rec["pattern"], str(rec["n"]), str(r["k"]), _num(r["spurious_score"], 3),
                         _num(r["random_spurious_score"], 3), _num(100 * r["clean_acc"]),
                         _num(100 * r["random_clean_acc"])])
    if rows:
        tables.append(Table(["pattern", "n", "k units zeroed", "spurious score, top k", "random k",
                             "test acc, top k (%)", "random k (%)"], rows,
                            "Rare patterns: where the pattern sits (top-k units by the first-order removal effect on "
                            "the target probability of patterned vs clean images, zeroed)"))
    return tables


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def all_tables(results: Dict) -> List[Table]:
    tables = [summary_table(results), seeds_table(results), claim_table(results, "train"), claim_table(results, "test")]
    tables += [t for t in (oracle_table(results), self_influence_table(results), framework_table(results))
               if t is not None]
    tables += rare_tables(results)
    return tables
