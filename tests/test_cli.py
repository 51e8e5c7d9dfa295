"""The command line, end to end (real MobileNetV2 and photos for `demo`)."""
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgequant.cli import main


def test_help_documents_commands():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "demo" in r.output and "quantize" in r.output
    r = CliRunner().invoke(main, ["quantize", "--help"])
    assert "--recipe" in r.output and "MODULE:FACTORY" in r.output


@pytest.mark.slow
def test_demo_writes_report(tmp_path):
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--calib", "16", "--eval", "16", "--threads", "2",
                                  "--adaround-iterations", "2", "--adaround-crops", "8", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "report.json").read_text())
    rows = {row["config"].split(" (")[0] if row["config"].startswith("w4a8") else row["config"]: row for row in rep["results"]}
    assert rows["fp32"]["top1"] == 1.0
    w8 = rows["w8a8 (BN folded)"]
    assert w8["sqnr_db"] > 5 and w8["top1"] > 0.5  # real 8-bit fidelity floor
    assert w8["size_mb"] < rows["fp32"]["size_mb"] / 3
    auto = next(v for k, v in rows.items() if k.startswith("w8a8 ptq=auto"))
    assert auto["sqnr_db"] > 5 and "w4a8 AdaRound" in rows
    ort = rows["ONNX Runtime int8 (model.onnx)"]
    assert ort["ort_top1_same_as_sim"] > 0.8 and ort["sqnr_db"] > 5 and (tmp_path / "model.onnx").exists()
    assert rep["onnx_runtime_batch1_ms"]["int8"] > 0
    assert "top-1 agreement with FP32" in r.output and (tmp_path / "report.md").read_text().count("|") > 20
    page = (tmp_path / "report.html").read_text()  # opened in a browser in tests/analysis/test_html_report.py
    assert page.count("<svg") >= 2 and "Sensitivity ranking" in page and "Cost model" in page and "model.onnx" in page


def test_help_answers_without_importing_torch():
    import subprocess
    import sys

    code = "import sys; import edgequant.cli; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "ok"
    from edgequant.cli import PRESET_NAMES
    from edgequant.config import PRESETS
    assert PRESET_NAMES == tuple(sorted(PRESETS))
    r = CliRunner().invoke(main, ["quantize", "--help"])
    for opt in ("--eval", "--holdout", "--resize", "--channels", "--mean", "--std", "--preprocess", "--eval-fn", "--device",
                "--threads", "--batch-size", "--adaround-iterations", "--no-onnx", "Default preprocessing"):
        assert opt in r.output, opt


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 3))


def _image_folder(path, n, seed):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def test_quantize_own_model(tmp_path, monkeypatch):
    imgs = _image_folder(tmp_path / "imgs", 5, seed=0)
    weights = tmp_path / "w.pt"
    torch.save(make_model().state_dict(), weights)
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["quantize", "--model", "tests.test_cli:make_model", "--weights", str(weights),
                                  "--calib", str(imgs), "--recipe", "w4a8", "--input-size", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    enc = json.loads((out / "encodings.json").read_text())
    assert enc["params"]["0.weight"]["bits"] == 4
    assert json.loads((out / "encodings.aimet.json").read_text())["version"] == "1.0.0"
    assert "QuantSim" in (out / "summary.txt").read_text()
    from edgequant import QuantPlan
    plan = QuantPlan.from_json((out / "plan.json").read_text())  # the plan the sim was built from
    assert plan["0.weight"].spec.bits == 4 and set(enc["params"]) == set(plan.quantized("weight"))
    # errors are clear
    r = CliRunner().invoke(main, ["quantize", "--model", "nocolon", "--calib", str(imgs), "--out", str(out)])
    assert r.exit_code != 0 and "MODULE:FACTORY" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["quantize", "--model", "tests.test_cli:make_model", "--calib", str(empty), "--out", str(out)])
    assert r.exit_code != 0 and "no .jpg/.png" in r.output


def make_wide_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 3))


def test_quantize_after_compression(tmp_path, monkeypatch):
    imgs = _image_folder(tmp_path / "imgs", 8, seed=3)
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["quantize", "--model", "tests.test_cli:make_wide_model", "--calib", str(imgs),
                                  "--input-size", "32", "--compress-macs", "0.6", "--compress-method", "prune", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    configs = [row["config"] for row in rep["results"]]
    assert configs[:3] == ["fp32 (original)", "fp32 compressed", "quantized (sim)"] and "prune" in rep["compression"]
    sim = __import__("edgequant").load(out / "sim")
    assert sim.model.get_submodule("2").in_channels < 16  # what was saved and exported is the compressed model
    page = (out / "report.html").read_text()
    section = page[page.index("<h2>Compression</h2>"):]
    assert "<svg" in section and "ratio" in section  # the selection curves and the per-layer choice


def test_quantize_with_ptq_auto(tmp_path, monkeypatch):
    imgs = _image_folder(tmp_path / "imgs", 12, seed=1)
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["quantize", "--model", "tests.test_cli:make_model", "--calib", str(imgs), "--recipe",
                                  "w8a8_per_tensor", "--input-size", "32", "--batch-size", "4", "--ptq", "auto",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "ptq_report.json").read_text())
    assert report["stages"][0]["name"] == "calibrate (no PTQ)" and len(report["stages"]) >= 3
    assert (out / "float_model_ptq.pt").exists() and (out / "encodings.json").exists()
    r = CliRunner().invoke(main, ["quantize", "--model", "tests.test_cli:make_model", "--calib", str(imgs),
                                  "--input-size", "32", "--ptq", "cle,nonsense", "--out", str(out)])
    assert r.exit_code != 0 and "unknown PTQ stage" in r.output


def test_quantize_with_qat_steps(tmp_path, monkeypatch):
    """--qat-steps: distillation from the float model on the augmented calibration images; the sim saved and
    exported is the trained one."""
    imgs = _image_folder(tmp_path / "imgs", 12, seed=2)
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["quantize", "--model", "tests.test_cli:make_model", "--calib", str(imgs), "--recipe", "w4a8",
                                  "--input-size", "32", "--batch-size", "4", "--qat-steps", "6", "--qat-lr", "1e-3",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "qat" / "report.json").read_text())
    assert rep["steps"] == 6 and len(rep["sqnr_db"]) == 6 and (out / "qat" / "qat.png").exists()
    assert "QAT: 6 steps" in r.output and "qat" in (out / "report.md").read_text().lower()
    import edgequant
    sim = edgequant.load(out / "sim")  # the trained grids come back (learned scales and offsets)
    assert sim.plan["0.weight"].spec.learn == "scale_offset" and (out / "model.onnx").exists()


def needs_args(width):
    return make_model()


def not_a_model():
    return {"a": 1}


def gray_model():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 3))


def test_quantize_user_mistakes_get_one_line(tmp_path, monkeypatch):
    """Each of these ended in a Python traceback of 7-18 frames."""
    imgs = _image_folder(tmp_path / "imgs", 4, seed=2)
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_mod.py").write_text("def f(:\n")
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    whole = tmp_path / "whole.pt"
    torch.save(make_model(), whole)
    bad_cfg = tmp_path / "cfg.json"
    bad_cfg.write_text('{"schema_version": 1, "weight": {"bits": 99}}')
    blocker = tmp_path / "file"
    blocker.write_text("x")
    base = ["quantize", "--calib", str(imgs), "--input-size", "32", "--out", str(tmp_path / "out")]
    cases = {
        "needs_args": (["--model", "tests.test_cli:needs_args"], "no arguments"),
        "not_a_model": (["--model", "tests.test_cli:not_a_model"], "not a torch.nn.Module"),
        "syntax": (["--model", "broken_mod:f"], "SyntaxError"),
        "other_weights": (["--model", "tests.test_cli:make_model", "--weights", str(other)], "does not fit the model"),
        "whole_model": (["--model", "tests.test_cli:make_model", "--weights", str(whole)], "state_dict"),
        "bad_config": (["--model", "tests.test_cli:make_model", "--config", str(bad_cfg)], "bits"),
        "gray": (["--model", "tests.test_cli:gray_model"], "--channels"),
        "out_is_file": (["--model", "tests.test_cli:make_model", "--out", str(blocker / "out")], "--out"),
    }
    for name, (args, expect) in cases.items():
        r = CliRunner().invoke(main, base + args)
        assert r.exit_code == 2, (name, r.output, r.exception)
        assert "Traceback" not in r.output and expect in r.output, (name, r.output)
        assert len([ln for ln in r.output.splitlines() if ln.startswith("Error")]) == 1, (name, r.output)
    assert not (tmp_path / "out").exists()  # nothing written by a failed run


def test_quantize_reads_common_checkpoints_and_skips_corrupt_images(tmp_path, monkeypatch):
    imgs = _image_folder(tmp_path / "imgs", 4, seed=3)
    (imgs / "broken.png").write_bytes(b"not an image")
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in make_model().state_dict().items()}}, ckpt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    r = CliRunner().invoke(main, ["quantize", "--model", "tests.test_cli:make_model", "--weights", str(ckpt), "--calib",
                                  str(imgs), "--input-size", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "skipped 1 unreadable image(s)" in r.output and "broken.png" in r.output
    assert not (out / "stale.txt").exists() and (out / "sim" / "manifest.json").exists()  # the folder is replaced whole
    import edgequant
    sim = edgequant.load(out / "sim")
    assert "0.weight" in sim.quantizers()


def scale_only(image):
    """A --preprocess function: grayscale-free 3-channel [0, 1] at 32 x 32, no normalization."""
    import numpy as np

    arr = np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)


def accuracy_like(model):
    """A --eval-fn: any number the user cares about (here the mean logit on fixed inputs)."""
    torch.manual_seed(1)
    with torch.no_grad():
        return float(model(torch.randn(4, 3, 32, 32)).mean())


def test_quantize_writes_a_deployable_model_and_a_verdict(tmp_path, monkeypatch):
    imgs = _image_folder(tmp_path / "imgs", 12, seed=4)
    evals = _image_folder(tmp_path / "evals", 4, seed=5)
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    out = tmp_path / "out"
    base = ["quantize", "--model", "tests.test_cli:make_model", "--calib", str(imgs), "--input-size", "32"]
    r = CliRunner().invoke(main, base + ["--out", str(out), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "3 of the 12 --calib images, held apart" in r.output and "top-1 agreement with FP32" in r.output
    rep = json.loads((out / "report.json").read_text())
    names = [row["config"] for row in rep["results"]]
    assert names == ["fp32", "quantized (sim)", "ONNX Runtime (model.onnx)"]
    ort_row = rep["results"][2]
    assert ort_row["ort_top1_same_as_sim"] >= 0.5 and ort_row["ort_vs_sim_sqnr_db"] > 10  # ORT runs what the sim simulates
    assert (out / "model.onnx").exists() and (out / "model.encodings.json").exists() and (out / "sim").is_dir()
    assert rep["calibration_images"] == 9
    # preprocessing the user controls, an evaluation folder, the user's metric, no ONNX
    r = CliRunner().invoke(main, base + ["--eval", str(evals), "--resize", "40", "--mean", "0.5", "--std", "0.25",
                                         "--eval-fn", "tests.test_cli:accuracy_like", "--no-onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["calibration_images"] == 12 and "resize shorter side to 40" in rep["preprocess"]
    assert all(row["eval_fn"] is not None for row in rep["results"]) and not (out / "model.onnx").exists()
    r = CliRunner().invoke(main, base + ["--dynamic-size", "--holdout", "0.5", "--out", str(out)])  # one file, any size
    assert r.exit_code == 0, r.output
    dims = [d.dim_param or d.dim_value for d in onnx.load(out / "model.onnx").graph.input[0].type.tensor_type.shape.dim]
    assert dims[2:] == ["input_dim2", "input_dim3"] and "any height and width" in (out / "report.md").read_text()
    r = CliRunner().invoke(main, base + ["--preprocess", "tests.test_cli:scale_only", "--out", str(out)])
    assert r.exit_code == 0 and "custom (tests.test_cli:scale_only)" in (out / "report.md").read_text()
    r = CliRunner().invoke(main, base + ["--mean", "0.1,0.2", "--out", str(out)])
    assert r.exit_code == 2 and "--mean" in r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, base + ["--device", "cuda", "--out", str(out)])
        assert r.exit_code == 2 and "CUDA is not available" in r.output


def test_analyze_ranks_the_quantizers(tmp_path, monkeypatch):
    imgs = _image_folder(tmp_path / "imgs", 6, seed=6)
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    r = CliRunner().invoke(main, ["analyze", "--model", "tests.test_cli:make_model", "--calib", str(imgs), "--input-size",
                                  "32", "--recipe", "w4a8", "--top", "3", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "a" / "analysis.json").read_text())
    names = [q["name"] for q in rep["quantizers"]]
    assert "0.weight" in names and "4.weight" in names and r.output.count("| ") >= 3
    only = [q["only_sqnr_db"] for q in rep["quantizers"]]
    assert only == sorted(only)  # worst first
    page = (tmp_path / "a" / "report.html").read_text()
    assert page.count("<svg") >= 2 and names[0] in page and "Cost model" in page
