"""``edgequant analyze``: which quantizers cost the most fidelity, and what to do about them."""
from __future__ import annotations

import json
from pathlib import Path

import click

from . import PRESET_NAMES, main
from .inputs import Preprocess, UserError, build_model, check_writable, image_files, load_images, load_weights, read_config
from .report import batches


@main.command()
@click.option("--model", "model_spec", required=True, help="MODULE:FACTORY that returns the float nn.Module.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A checkpoint to load (as for quantize).")
@click.option("--calib", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="Folder of calibration images.")
@click.option("--recipe", default="w8a8", show_default=True, type=click.Choice(PRESET_NAMES), help="Quantization preset.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A QuantConfig JSON file.")
@click.option("--input-size", type=click.IntRange(8), default=224, show_default=True, help="Square model input in pixels.")
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True, help="Image channels the model takes.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--top", type=click.IntRange(1), default=20, show_default=True, help="Rows of the ranking to print.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for analysis.md, analysis.json and report.html (ranking chart, histograms, cost model).")
def analyze(model_spec, weights, calib, recipe, config_file, input_size, channels, batch_size, top, out):
    """Rank the quantizers of your model by the fidelity each one costs (with only it quantized, and with all
    but it), with the clipping, per-channel range spread and a suggested fix for each."""
    from ..analysis import analyze as run
    from ..analysis import html_report, tensor_histograms
    from ..sim.quantsim import QuantSim
    from ..errors import DataError
    from ..io.encodings import atomic_write_text

    check_writable(out)
    model = build_model(model_spec)
    if weights:
        load_weights(model, weights)
    model.eval()
    config = read_config(config_file, recipe)
    x = load_images(image_files(calib, "--calib"), Preprocess(input_size, int(channels)), "--calib")
    data = batches(x, batch_size)
    try:
        sim = QuantSim(model, data[0][:1], config)
        sim.calibrate(data)
        report = run(sim, None, eval_data=data[:2])
    except DataError as e:
        raise UserError(f"{e} (check --input-size / --channels against what the model takes)") from None
    click.echo(report.to_markdown(top))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "analysis.md", report.to_markdown(len(report.quantizers)) + "\n")
    atomic_write_text(out / "analysis.json", json.dumps(report.to_dict(), indent=2))
    hists = tensor_histograms(sim, [q.name for q in report.worst(6)], data[:2])
    files = ["analysis.md", "analysis.json", "report.html"]
    page = html_report(f"edgequant analyze: {model_spec}", header={"recipe": recipe, "calibration images": len(x)},
                       analysis=report, histograms=hists, sim=sim, files=files)
    atomic_write_text(out / "report.html", page)
    click.echo(f"wrote {out}/analysis.md, analysis.json, report.html")
