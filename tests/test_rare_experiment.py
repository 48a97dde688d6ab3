"""The rare-pattern experiment: FashionMNIST, pattern_units / zero_units_effect, the study, its
files, the benchmark and ``spurfast rare``. Tiny settings: seconds each."""
import csv
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from spurfast import cli
from spurfast.attribution import Unit
from spurfast.data import DatasetFileError, FashionMNIST, textured
from spurfast.experiments.rare import (
    CSV_FIELDS, RareStudyConfig, estimate_seconds, markdown_tables, run_rare_study, summarize, tiny_config,
)
from spurfast.rare import add_pattern
from spurfast.rare import localize as rare_localize
from spurfast.rare.localize import pattern_units, zero_units_effect
from spurfast.report.rare import plot_score_vs_n, write_rare_run

pytestmark = pytest.mark.usefixtures("one_thread")

FASHION_FILES = [f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def fashion_files():
    missing = [f for f in FASHION_FILES if not os.path.isfile(os.path.join(textured.FASHION_MNIST_DIR, f))]
    if missing:
        pytest.skip(f"Fashion-MNIST not installed ({missing[0]} missing): apt-get install dataset-fashion-mnist")


# --------------------------------------------------------------------------------------------
# FashionMNIST
# --------------------------------------------------------------------------------------------


def test_fashion_subset_is_balanced_shaped_and_read_from_the_files(fashion_files):
    ds = FashionMNIST("train", n=105, seed=3)
    assert ds.images.shape == (105, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.group_counts().tolist() == [11] * 5 + [10] * 5
    assert torch.equal(ds.group_ids, ds.labels) and ds.num_groups == ds.num_classes == 10
    raw_images, raw_labels = textured.load_fashion_mnist("train")
    assert torch.equal(ds.labels, raw_labels[ds.source_indices])
    assert torch.equal(ds.images[:, 0], raw_images[ds.source_indices].float() / 255)
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0 and float(ds.images.max()) > 0.9
    assert ds.source_indices.unique().numel() == 105 and bool((ds.source_indices.diff() > 0).all())
    image, label, group = ds[7]
    assert image.shape == (1, 28, 28) and int(label) == int(group)


def test_fashion_subset_is_a_function_of_split_n_and_seed(fashion_files):
    a, b = FashionMNIST("test", n=50, seed=1), FashionMNIST("test", n=50, seed=1)
    assert torch.equal(a.source_indices, b.source_indices) and torch.equal(a.images, b.images)
    assert not torch.equal(a.source_indices, FashionMNIST("test", n=50, seed=2).source_indices)
    assert not torch.equal(a.source_indices, FashionMNIST("train", n=50, seed=1).source_indices)
    whole = FashionMNIST("test")
    assert len(whole) == 10_000 and whole.group_counts().tolist() == [1000] * 10
    assert whole.group_names[0] == "T-shirt/top" and whole.group_names[9] == "Ankle boot"


def test_fashion_checks_its_arguments_and_names_the_package(tmp_path):
    with pytest.raises(ValueError, match="split"):
        FashionMNIST("val")
    with pytest.raises(ValueError, match="n must be"):
        FashionMNIST("test", n=5)
    with pytest.raises(DatasetFileError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST("test", n=20, root=str(tmp_path))


# --------------------------------------------------------------------------------------------
# pattern_units / zero_units_effect on a model with a planted pattern unit
# --------------------------------------------------------------------------------------------

PLANTED = Unit("1", 5)


def _planted_model(push=0.6):
    """fc1 unit 5 reads only the bottom-right pixel (S1's) and adds ``3 * push`` to class 0's logit;
    it is silent on clean images, whose corner pixel stays below 0.2. The other units are random."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.mul_(0.5)
        model[1].weight[5].zero_()
        model[1].weight[5, 35] = 4.0
        model[1].bias[5] = -1.0
        model[3].weight[:, 5] = torch.tensor([push, 0.0, 0.0])
    return model


def _clean_images(n=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=gen)
    x[..., -1, -1] *= 0.2
    return x, torch.arange(n) % 3


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_pattern_units_ranks_the_planted_unit_first():
    model = _planted_model()
    x, y = _clean_images()
    assert add_pattern(x, "S1")[..., -1, -1].eq(1).all()  # the pixel the unit reads
    scores = pattern_units(model, x, y, target_class=0, pattern="S1", batch_size=16)
    ranked = scores.extra["ranked"]
    assert ranked[0] == PLANTED
    assert scores.extra["n_images"] == 40 and all(u.layer == "1" for u in ranked)  # classifier excluded
    assert scores.extra["ranked_scores"][0] > 10 * abs(scores.extra["ranked_scores"][1])
    # it is silent on clean images: all of its score comes from the patterned copies
    assert float(scores.extra["clean_drop"]["1"][5]) == 0.0 and float(scores.extra["patterned_drop"]["1"][5]) > 0
    assert "3" in {u.layer for u in pattern_units(model, x, y, 0, "S1", exclude=()).extra["ranked"]}
    assert pattern_units(model, x, y, 0, "S1", objective="margin").extra["ranked"][0] == PLANTED


def test_a_saturating_planted_unit_is_found_by_the_margin():
    model = _planted_model(push=3.0)  # the pattern drives p_0 to 0.9998: the probability's slope vanishes
    x, y = _clean_images()
    assert pattern_units(model, x, y, 0, "S1", objective="margin").extra["ranked"][0] == PLANTED


def test_pattern_units_leaves_the_model_as_it_was():
    model = _planted_model().train()
    model[1].weight.grad = torch.ones_like(model[1].weight)
    before = _state(model)
    x, y = _clean_images()
    pattern_units(model, x, y, 0, "S1")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[1].weight.grad, torch.ones_like(model[1].weight)) and model[3].weight.grad is None
    with pytest.raises(ValueError, match="target_class"):
        pattern_units(model, x, y, 7, "S1")
    with pytest.raises(ValueError, match="objective"):
        pattern_units(model, x, y, 0, "S1", objective="loss")


def test_zeroing_the_planted_unit_removes_the_spurious_score_and_random_units_do_not():
    model = _planted_model()
    x, y = _clean_images(90, seed=1)
    ranked = pattern_units(model, *_clean_images(), 0, "S1")
    before = _state(model)
    out = zero_units_effect(model, ranked, x, y, 0, "S1", ks=(1, 2), random_repeats=3)
    assert out["before"]["spurious_score"] > 0.9
    k1 = out["rows"][0]
    assert k1["units"] == [["1", 5]] and k1["spurious_score"] == 0.0
    assert k1["random_spurious_score"] > 0.9  # random fc1 units never include the planted one
    assert 0.0 <= k1["clean_acc"] <= 1.0 and len(out["rows"]) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="ks"):
        zero_units_effect(model, ranked, x, y, 0, "S1", ks=(100,))


def test_zero_units_effect_restores_the_model_after_an_exception(monkeypatch):
    model = _planted_model().train()
    before = _state(model)
    x, y = _clean_images()
    calls = []
    real = rare_localize.spurious_score

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # inside the first intervention
            assert float(model[1].weight[5].detach().abs().sum()) == 0.0
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(rare_localize, "spurious_score", failing)
    with pytest.raises(RuntimeError, match="boom"):
        zero_units_effect(model, [PLANTED], x, y, 0, "S1", ks=(1,), random_repeats=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


def _tiny(**changes):
    cfg = tiny_config(RareStudyConfig("synth", "mlp"))
    return dataclasses.replace(cfg, patterns=("S3", "R3"), localization_cases=None, deletion_cases=(("R3", 3),),
                               **changes)


@pytest.fixture(scope="module")
def tiny_study():
    cfg = _tiny()
    with torch.random.fork_rng():
        return run_rare_study(cfg)


def test_config_validates_and_derives_cases():
    cfg = RareStudyConfig("synth", "small_cnn", ns=(10, 0, 3))
    assert cfg.ns == (0, 3, 10) and cfg.target_class == 1 and cfg.n_train == 2000
    assert cfg.localization_cases == (("S1", 10), ("S3", 10), ("R3", 10))
    assert cfg.deletion_cases == (("S3", 10), ("R3", 10))  # R3 at 10 and at max(ns) = 10: once
    for field, value in (("ns", (-1,)), ("patterns", ("S9",)), ("seeds", ()), ("epochs", 0), ("lr", 0.0),
                         ("threshold", 1.5), ("data", "mnist"), ("model", "vit")):
        with pytest.raises(ValueError, match=field):
            RareStudyConfig(**{field: value})
    with pytest.raises(ValueError, match="deletion_cases"):
        RareStudyConfig(ns=(0, 3), deletion_cases=(("S3", 100),))
    with pytest.raises(ValueError, match="only 464 of class 1"):  # Waterbirds' proportions: 23 + 441
        RareStudyConfig("synth", ns=(0, 465))
    assert RareStudyConfig("synth", ns=(0, 464)).ns == (0, 464)
    with pytest.raises(ValueError, match="target_class must lie in"):
        RareStudyConfig("fashion", target_class=10)


def test_tiny_study_rows_and_control(tiny_study):
    runs = tiny_study["runs"]
    assert [(r["kind"], r["pattern"], r["n"]) for r in runs] == [
        ("control", "S3", 0), ("control", "R3", 0), ("poisoned", "S3", 3), ("poisoned", "R3", 3)]
    control = [r for r in runs if r["n"] == 0]
    # one clean model scored with every pattern: same accuracy and training time, no poisoned images
    assert control[0]["test_acc"] == control[1]["test_acc"] and control[0]["seconds"] == control[1]["seconds"]
    assert all(r["poisoned_train_acc"] is None for r in control)
    assert all(0.0 <= r["poisoned_train_acc"] <= 1.0 for r in runs if r["n"] > 0)
    assert runs[0]["pattern_l2"] == runs[2]["pattern_l2"] and runs[1]["pattern_l2"] > runs[0]["pattern_l2"]
    assert all(0.0 <= r["spurious_score"] <= 1.0 for r in runs)
    assert [(s["pattern"], s["n"]) for s in tiny_study["summary"]] == [("S3", 0), ("R3", 0), ("S3", 3), ("R3", 3)]
    loc = tiny_study["localization"]
    assert [(r["pattern"], r["n"]) for r in loc] == [("S3", 3), ("R3", 3)]
    assert [r["k"] for r in loc[0]["rows"]] == [1, 2]
    (deletion,) = tiny_study["deletion"]
    assert set(deletion["methods"]) == {"poisoned", "incremental", "scratch", "influence", "control"}
    assert deletion["methods"]["influence"]["scale"] in RareStudyConfig().influence_scales
    assert deletion["methods"]["control"]["test_acc"] == control[1]["test_acc"]


def test_tiny_study_writes_json_csv_markdown_and_plot(tiny_study, tmp_path):
    paths = write_rare_run({"studies": [tiny_study]}, tmp_path, meta={"command": "test"})
    data = json.loads(paths["results"].read_text())  # strict JSON
    assert set(data) == {"studies", "meta"} and data["meta"]["command"] == "test"
    keys = {"config", "data", "runs", "summary", "localization", "deletion", "deletion_summary"}
    assert keys <= set(data["studies"][0])
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_FIELDS
    assert [r["kind"] for r in rows] == ["control", "control", "poisoned", "poisoned", "incremental", "scratch",
                                         "influence"]
    text = paths["markdown"].read_text()
    assert "| R3 |" in text and "n = 0 (control)" in text and "group influence" in text and "top k zeroed" in text
    assert paths["figure"].stat().st_size > 5000
    two = plot_score_vs_n([tiny_study, tiny_study], tmp_path / "two.png")  # one panel each
    assert two.stat().st_size > paths["figure"].stat().st_size


def test_markdown_and_summary_report_means_over_seeds():
    runs = [{"pattern": "S1", "n": n, "seed": s, "spurious_score": v, "test_acc": 0.9, "poisoned_train_acc": None,
             "pattern_l2": 1.0, "seconds": 1.0} for n, s, v in ((0, 0, 0.0), (0, 1, 0.1), (3, 0, 0.5), (3, 1, 0.7))]
    study = {"config": dataclasses.asdict(RareStudyConfig("synth", "mlp", ns=(0, 3), patterns=("S1",))),
             "data": {"n_train": 2000, "target_train_count": 464}, "runs": runs}
    s = summarize(study)
    assert [round(r["spurious_score"]["mean"], 3) for r in s] == [0.05, 0.6]
    assert round(s[1]["spurious_score"]["std"], 3) == 0.1
    assert "| S1 | 1.00 | 0.050 ± 0.050 | 0.600 ± 0.100 |" in markdown_tables(study)


def test_estimate_extrapolates_every_stage():
    est = estimate_seconds(_tiny())
    assert est["trained_models"] == 3 and est["expected_seconds"] > 0
    assert {"epoch", "measure", "localization", "influence_step", "influence_fixed"} <= set(est["pieces_seconds"])


# --------------------------------------------------------------------------------------------
# The benchmark and the command
# --------------------------------------------------------------------------------------------


def test_benchmark_tiny_writes_a_fresh_folder(tmp_path):
    spec = importlib.util.spec_from_file_location("rare_spurious", BENCHMARKS / "rare_spurious.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["rare_spurious"] = module
    spec.loader.exec_module(module)
    out = tmp_path / "bench"
    with torch.random.fork_rng():
        results = module.main(["--tiny", "--data", "synth", "--threads", "1", "--out", str(out)])
    assert [s["config"]["model"] for s in results["studies"]] == ["small_cnn"]
    assert {p.name for p in out.iterdir()} == {"results.json", "runs.csv", "results.md", "score_vs_n.png"}


def test_cli_rare_tiny_runs_and_prints_the_tables(tmp_path, capsys):
    out = tmp_path / "cli"
    with torch.random.fork_rng():
        code = cli.main(["rare", "--tiny", "--data", "synth", "--models", "mlp", "--threads", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "n = 0 (control)" in printed and str(out / "results.json") in printed
    assert json.loads((out / "results.json").read_text())["meta"]["command"].startswith("spurfast rare --tiny")


@pytest.mark.parametrize("argv, message", [
    (["--ns", "-1", "3"], "ns must be"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--data", "synth", "--tiny", "--target-class", "5", "--threads", "1"], "target_class must lie in [0, 2)"),
])
def test_cli_rare_bad_input_is_one_line(argv, message, capsys, tmp_path):
    assert cli.main(["rare", *argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spurfast rare: error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
