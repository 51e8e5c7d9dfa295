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
