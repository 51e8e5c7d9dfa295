"""The command line, end to end (real MobileNetV2 and photos for `demo`)."""
import json

import numpy as np
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
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--calib", "32", "--eval", "32", "--threads", "2"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "report.json").read_text())
    rows = {row["config"]: row for row in rep["results"]}
    assert rows["fp32"]["top1"] == 1.0
    assert rows["w8a8"]["sqnr_db"] > 5 and rows["w8a8"]["top1"] > 0.5  # real 8-bit fidelity floor
    assert rows["w8a8"]["size_mb"] < rows["fp32"]["size_mb"] / 3
    assert (tmp_path / "report.md").read_text().count("|") > 20
    assert (tmp_path / "mobilenet_v2.w8a8.encodings.json").exists()


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
