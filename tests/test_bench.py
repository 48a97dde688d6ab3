"""spurfast.bench: the `spurfast bench` command and the measurement behind it, on CPU at tiny
sizes. Plumbing, the per-sample norm conventions (every installed peer must agree with
spurfast) and the reporting of what was skipped; no test asserts on a timing."""
import argparse
import doctest
import importlib
import json
import platform
import sys

import pytest
import torch

import spurfast.bench as bench
from spurfast.bench import command, peers, throughput, timing
from spurfast.bench.models import ALL_MODELS, MissingDependency, ResNet18, import_optional

PEER_PACKAGES = {"opacus": "opacus", "backpack": "backpack", "backpack_fx": "backpack"}


def _importable(module):
    try:
        import_optional(module)
    except MissingDependency:
        return False
    return True


def _args(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def _tiny(models=("mlp",), methods=("spurfast", "plain"), **kw):
    kw.setdefault("batch_sizes", {m: 2 for m in models})
    return throughput.Settings(models=list(models), methods=list(methods), warmup=0, repeats=1, tiny=True,
                               allow_standin=True, **kw)


def _check_rows_agree(entry, tol=1e-3):
    """spurfast is the reference; each peer that ran agrees with it, each missing one is skipped."""
    assert entry["reference_method"] == "spurfast"
    rows = entry["methods"]
    assert rows["spurfast"]["max_rel_err"] == 0.0 and rows["spurfast"]["error"] is None
    for method, row in rows.items():
        assert set(row) >= set(throughput.ROW_FIELDS), method
        package = PEER_PACKAGES.get(method)
        if package is not None and not _importable(package):
            assert row["skipped"] and "not importable" in row["skipped"], (method, row)
            assert row["time_ms_median"] is None
            continue
        if method == "backpack" and entry.get("num_tracked_layers", 0) > 3:
            continue  # plain extend() fails on ResNets' in-place additions: recorded, checked below
        assert row["error"] is None and row["skipped"] is None, (method, row)
        assert isinstance(row["time_ms_median"], float) and row["repeats"] >= 1
        if method != "plain":
            assert row["max_rel_err"] < tol, (method, row["max_rel_err"])


def test_run_quick_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    threads = torch.get_num_threads()
    assert bench.run(_args("--quick", "--models", "mlp", "--out", str(out))) == 0
    assert torch.get_num_threads() == threads  # the run's one thread is not left behind
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"] == "scoring_throughput" and data["environment"]["torch"] == torch.__version__
    assert data["environment"]["cpu_threads"] == 1
    cpu = data["environment"]["cpu"]  # what tells two CPUs of one model name apart
    if hasattr(torch.backends, "cpu") and hasattr(torch.backends.cpu, "get_cpu_capability"):
        assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()
        assert cpu["capability"] in data["environment"]["device"]
    if sys.platform.startswith("linux") and platform.machine() == "x86_64":
        assert cpu["model_name"] and isinstance(cpu["simd"], list)
    s = data["settings"]
    assert s["quick"] and s["tiny"] and s["models"] == ["mlp"] and s["methods"] == list(peers.ALL_METHODS)
    entry = data["results"]["mlp"]
    assert entry["batch_size"] == command.QUICK_BATCH and entry["num_tracked_layers"] == 3
    assert entry["wall_s"] is not None and not entry["standin"]
    _check_rows_agree(entry)
    assert data["summary"]["max_rel_err_vs_reference"]["mlp"]["func"] < 1e-3
    skipped = {r["method"] for r in data["summary"]["skipped"]}
    assert skipped == {m for m, p in PEER_PACKAGES.items() if not _importable(p)}
    table = (out / "results.md").read_text()
    b = command.QUICK_BATCH
    assert "| model | B | method |" in table
    assert f"| mlp | {b} | spurfast |" in table and f"| mlp | {b} | func |" in table
    printed = capsys.readouterr().out
    assert f"| mlp | {b} | spurfast |" in printed and str(out / "results.json") in printed


def test_resnet18_peers_agree_on_convs(tmp_path, one_thread):
    """The conv path, on torchvision's ResNet-18 or its stand-in (the results say which)."""
    data = throughput.measure(_tiny(("resnet18",), ("spurfast", "plain", "func", "opacus", "backpack", "backpack_fx")))
    entry = data["results"]["resnet18"]
    assert entry["num_tracked_layers"] == 21  # 20 convs + fc
    assert entry["standin"] == (not _importable("torchvision"))
    if entry["standin"]:
        assert "stand-in" in entry["source"] and "torchvision is not importable" in entry["source"]
        assert "resnet18 (stand-in)" in throughput.render_table(data)
    _check_rows_agree(entry)
    if _importable("backpack"):
        assert "modified inplace" in entry["methods"]["backpack"]["error"]


def test_missing_model_library_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "timm", None)
    data = throughput.measure(_tiny(("resnet50", "vit_small", "mlp"), ("plain",)))
    entry = data["results"]["resnet50"]  # no stand-in: skipped
    assert entry["skipped"].startswith("torchvision is not importable") and entry["methods"] == {}
    vit = data["results"]["vit_small"]  # its timm-free stand-in, saying why
    assert vit["standin"] and "timm is not importable" in vit["source"] and vit["methods"]["plain"]["error"] is None
    assert data["results"]["mlp"]["methods"]["plain"]["error"] is None
    assert {r["model"] for r in data["summary"]["skipped"]} == {"resnet50"}
    table = throughput.render_table(data)
    assert "| resnet50 | 2 | – |" in table and "* resnet50: torchvision is not importable" in table


def test_resnet18_without_torchvision_is_a_standin_on_cpu_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    entry = throughput.measure(_tiny(("resnet18",), ("plain",)))["results"]["resnet18"]
    assert entry["standin"] and entry["methods"]["plain"]["error"] is None
    # the GPU run's rule: no stand-in, the model is skipped
    gpu_rule = throughput.measure(throughput.Settings(models=["resnet18"], methods=["plain"], tiny=True, warmup=0,
                                                      repeats=1, batch_sizes={"resnet18": 2}, allow_standin=False))
    assert gpu_rule["results"]["resnet18"]["skipped"].startswith("torchvision is not importable")


def test_missing_peer_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)
    data = throughput.measure(_tiny(methods=("spurfast", "opacus")))
    row = data["results"]["mlp"]["methods"]["opacus"]
    assert row["skipped"].startswith("opacus is not importable") and row["error"] is None
    assert {"model": "mlp", "method": "opacus", "reason": row["skipped"]} in data["summary"]["skipped"]
    assert "* mlp / opacus: opacus is not importable" in throughput.render_table(data)


def test_method_errors_are_recorded(monkeypatch):
    def broken(*args):
        raise RuntimeError("peer exploded")

    monkeypatch.setitem(peers.SETUPS, "func", broken)
    rows = throughput.measure(_tiny(methods=("plain", "func", "spurfast")))["results"]["mlp"]["methods"]
    assert rows["func"]["error"] == "RuntimeError: peer exploded" and rows["func"]["time_ms_median"] is None
    assert rows["spurfast"]["error"] is None and rows["spurfast"]["max_rel_err"] == 0.0


def test_time_limit_skips_what_would_start_after_it(monkeypatch):
    class Clock:  # the run's clock, advanced only by the slow method below
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(throughput, "time", clock)

    def slow_plain(*args):
        clock.now += 10.0
        return peers.setup_plain(*args)

    monkeypatch.setitem(peers.SETUPS, "plain", slow_plain)
    data = throughput.measure(_tiny(("mlp", "resnet18"), ("plain", "spurfast"), time_limit_s=5.0))
    assert data["results"]["mlp"]["methods"]["plain"]["error"] is None
    assert data["results"]["mlp"]["methods"]["spurfast"]["skipped"].startswith("time limit")
    assert data["results"]["resnet18"]["skipped"].startswith("time limit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"^--device cuda: torch.cuda.is_available\(\) is False"):
        bench.run(_args("--device", "cuda", "--out", str(out)))
    assert not out.exists()  # refused before a run folder is made
    with pytest.raises(SystemExit):
        _args("--device", "tpu")


@pytest.mark.parametrize("argv,flag", [
    (["--models", "resnet19"], "--models"), (["--methods", "spurfast,jax"], "--methods"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "mlp=x"], "--batch-size"),
    (["--repeats", "0"], "--repeats"), (["--budget-s", "-1"], "--budget-s"),
])
def test_bad_arguments_name_the_flag(argv, flag, tmp_path):
    with pytest.raises(ValueError, match=f"^{flag}"):
        bench.run(_args(*argv, "--out", str(tmp_path / "x")))


def test_configurations():
    """--quick rehearses every model and method of the GPU run; the GPU run has the issue's sizes."""
    quick, gpu, cpu = (command.settings_from_args(_args(*a)) for a in (["--quick"], ["--device", "cuda"], []))
    assert quick.models == gpu.models == list(ALL_MODELS) and quick.methods == gpu.methods == list(peers.ALL_METHODS)
    assert quick.tiny and not gpu.tiny and quick.allow_standin and not gpu.allow_standin
    assert quick.threads == 1 and gpu.threads is None and cpu.threads is None
    assert gpu.batch_sizes == {"resnet18": 256, "resnet18_cifar": 256, "resnet50": 64, "vit_small": 64, "vit_base": 32,
                               "mlp": 512}
    assert gpu.time_limit_s and gpu.time_limit_s < 8 * 60 and gpu.budget_s and gpu.tf32
    assert cpu.batch_sizes == {"resnet18": 32, "resnet18_cifar": 32, "vit_small": 16, "mlp": 128} and not cpu.tiny
    assert (cpu.pairs, quick.pairs, gpu.pairs) == (20, 3, 0)
    custom = command.settings_from_args(_args("--device", "cuda", "--models", "mlp", "--batch-size", "mlp=64",
                                              "--repeats", "7", "--time-limit-s", "100"))
    assert custom.batch_sizes == {"mlp": 64} and custom.repeats == 7 and custom.time_limit_s == 100


def test_merge_refuses_other_settings():
    a = throughput.measure(_tiny(methods=("plain",)))
    b = dict(a, settings=dict(a["settings"], repeats=99))
    with pytest.raises(ValueError, match="^--merge: setting repeats differs"):
        throughput.merge_results(a, b)
    merged = throughput.merge_results(a, dict(a, results={}))
    assert list(merged["results"]) == ["mlp"] and len(merged["settings"]["runs"]) == 2


def test_standin_is_torchvision_resnet18():
    try:
        torchvision = import_optional("torchvision")
    except MissingDependency as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    want = torchvision.models.resnet18(num_classes=10).state_dict()
    torch.manual_seed(0)
    got = ResNet18(num_classes=10).state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_time_calls_cuts_repeats_to_the_budget():
    calls = []
    times = timing.time_calls(lambda: calls.append(1) or __import__("time").sleep(0.02), warmup=5, repeats=50,
                              device=torch.device("cpu"), budget_s=0.01)
    assert len(times) == timing.MIN_REPEATS  # warm-up stopped after one call, repeats cut to the floor
    assert len(calls) == 1 + timing.MIN_REPEATS
    assert timing.repeats_within(None, 1.0, 7) == 7 and timing.repeats_within(10.0, 1.0, 50) == 10


@pytest.mark.parametrize("name", ["timing", "models", "command", "throughput", "gemm"])
def test_docstring_examples(name):
    module = importlib.import_module(f"spurfast.bench.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0


def test_no_device_query_or_peer_import_at_import():
    code = ("import sys, torch; calls = []; torch.cuda.is_available = lambda: calls.append(1) or False; "
            "import spurfast.bench, spurfast.bench.gemm, spurfast.bench.cpu_backends; "
            "assert not calls, 'device queried at import'; "
            "assert not {'opacus', 'backpack', 'torchvision', 'timm'} & set(sys.modules), 'peer imported'")
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


def test_paired_rounds_give_per_round_ratios_and_a_table():
    data = throughput.measure(_tiny(methods=("spurfast", "spurfast_nogroup", "plain"), pairs=3, memory=True))
    paired = data["results"]["mlp"]["paired"]
    assert set(paired) == {"spurfast", "spurfast_nogroup"}
    for row in paired.values():
        assert row["rounds"] == 3 and row["ratio_iqr"][0] <= row["ratio_median"] <= row["ratio_iqr"][1]
        assert row["ratio_median"] > 0 and row["plain_ms_median"] > 0
    assert "| mlp | 2 | spurfast_nogroup |" in throughput.render_table(data)
    rows = data["results"]["mlp"]["methods"]  # the memory pass (a spawned process) filled these
    assert rows["spurfast"]["stats_bytes"] > rows["spurfast_nogroup"]["stats_bytes"] > 0  # group_grad's G x |W|
    assert all(r["peak_mem_kind"] == "cpu_rss_growth" and r["peak_mem_bytes"] >= 0 for r in rows.values())
    with pytest.raises(ValueError, match="--pairs"):
        _tiny(pairs=-1)


def test_cpu_targets_table_judges_time_and_memory():
    mib = 2 ** 20
    paired = {"spurfast": {"ratio_median": 1.4, "ratio_iqr": [1.3, 1.5]},
              "spurfast_nogroup": {"ratio_median": 1.25, "ratio_iqr": [1.2, 1.3]}}
    methods = {"plain": {"peak_mem_bytes": 100 * mib},
               "spurfast": {"peak_mem_bytes": 105 * mib, "stats_bytes": 50 * mib, "sample_bytes": 0},  # 155 <= 165
               "spurfast_nogroup": {"peak_mem_bytes": 130 * mib, "stats_bytes": 1 * mib, "sample_bytes": mib}}  # 131 > 112.2
    table = throughput.render_cpu_targets({"results": {"mlp": {"batch_size": 128, "paired": paired, "methods": methods}}})
    assert "| mlp | 128 | all | ≤ 1.5 | 1.40 [1.30–1.50] | met | 100 / 155 / 165 | met |" in table
    assert "| mlp | 128 | all but group_grad | ≤ 1.2 | 1.25 [1.20–1.30] | missed | 100 / 131 / 112 | missed |" in table
