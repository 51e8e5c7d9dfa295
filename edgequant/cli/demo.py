"""``edgequant demo``: the whole flow on real MobileNetV2 and real photos, in a few minutes on 2 cores."""
from __future__ import annotations

import time
from pathlib import Path

import click

from . import main
from .report import batches, latency_ms, logits, onnx_runtime, ort_agreement, print_table, row, sensitivity, write_report


def _sim_row(name, sim, ref, evalset, batch_size, seconds, **extra):
    return row(name, ref, logits(sim, evalset, batch_size), sim.size_bytes()["quantized"] / 1e6, seconds, **extra)


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/demo"), show_default=True,
              help="Folder for report.md, report.json, model.onnx and the encodings.")
@click.option("--calib", "n_calib", type=click.IntRange(2), default=96, show_default=True, help="Calibration crops.")
@click.option("--eval", "n_eval", type=click.IntRange(1), default=160, show_default=True, help="Evaluation crops (other photos).")
@click.option("--adaround-iterations", type=click.IntRange(0), default=40, show_default=True,
              help="Adam steps per layer for the W4A8 AdaRound row (0 leaves the row out); the library default is 800.")
@click.option("--adaround-crops", type=click.IntRange(1), default=32, show_default=True,
              help="Calibration crops AdaRound learns from (its time grows with them: one pass per layer).")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch and ONNX Runtime CPU threads (default: torch's choice).")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Crops per forward pass (16 ran 1.5x faster per image than 32 on a 2-core machine: less memory traffic).")
def demo(out: Path, n_calib: int, n_eval: int, adaround_iterations: int, adaround_crops: int, threads, batch_size):
    """Quantize MobileNetV2 (real ImageNet weights), calibrated on real photo crops, and report its fidelity to
    FP32 on crops of other photos: W8A8 with batch norms folded, the one-call edgequant.quantize(ptq="auto"),
    W4A8 with AdaRound, and the exported ONNX model run in ONNX Runtime (agreement and speed against FP32)."""
    import torch

    from ..data.photos import CALIBRATION_PHOTOS, EVALUATION_PHOTOS, calibration_crops, evaluation_crops
    from ..models.mobilenet import mobilenet_v2_imagenet
    from ..ptq import quantize
    from ..sim.quantsim import QuantSim

    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    model = mobilenet_v2_imagenet().eval()
    click.echo(f"MobileNetV2 (ImageNet weights); {n_calib} calibration crops from {len(CALIBRATION_PHOTOS)} photos, "
               f"{n_eval} evaluation crops from {len(EVALUATION_PHOTOS)} other photos")
    calib, evalset = calibration_crops(n_calib), evaluation_crops(n_eval)
    cal = batches(calib, batch_size)
    ref = logits(model, evalset, batch_size, desc="evaluating FP32")
    rows = [row("fp32", ref, ref, sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6, 0.0)]
    click.echo("1/4 W8A8, batch norms folded (as an integer runtime runs it)")
    t = time.perf_counter()
    w8 = QuantSim(model, calib[:1], "w8a8")  # folds the batch norms (fold_bn=True)
    w8.calibrate(cal)
    seconds = time.perf_counter() - t
    w8_out = logits(w8, evalset, batch_size, desc="evaluating w8a8")
    rows.append(row("w8a8 (BN folded)", ref, w8_out, w8.size_bytes()["quantized"] / 1e6, seconds))
    click.echo('2/4 edgequant.quantize(model, data, "w8a8", ptq="auto")')
    t = time.perf_counter()
    auto = quantize(model, cal, recipe="w8a8", ptq="auto")
    kept = "+".join(s.name for s in auto.report.stages[1:] if s.kept) or "calibration only"
    rows.append(_sim_row(f"w8a8 ptq=auto ({kept})", auto.sim, ref, evalset, batch_size, time.perf_counter() - t))
    if adaround_iterations:
        n_ada = min(adaround_crops, n_calib)
        click.echo(f"3/4 W4A8 with AdaRound, {adaround_iterations} iterations per layer on {n_ada} crops")
        t = time.perf_counter()
        ada = quantize(model, batches(calib[:n_ada], batch_size), recipe="w4a8", ptq=["bn_fold", "adaround"],
                       adaround_iterations=adaround_iterations)
        rows.append(_sim_row(f"w4a8 AdaRound ({adaround_iterations} it/layer, {n_ada} crops)", ada.sim, ref, evalset,
                             batch_size, time.perf_counter() - t))
    click.echo("4/4 ONNX export of the W8A8 model, run in ONNX Runtime")
    header = {"model": "MobileNetV2 (torchvision IMAGENET1K_V1)", "calibration_crops": n_calib, "evaluation_crops": n_eval,
              "calibration_photos": list(CALIBRATION_PHOTOS), "evaluation_photos": list(EVALUATION_PHOTOS),
              "torch_threads": torch.get_num_threads(), "batch_size": batch_size}
    out.mkdir(parents=True, exist_ok=True)
    _onnx_rows(out, w8, w8_out, ref, evalset, batch_size, threads or torch.get_num_threads(), rows, header)
    header["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(rows)
    w8.save_encodings(out / "mobilenet_v2.w8a8.encodings.json")
    click.echo("sensitivity of the W8A8 model's quantizers on 4 evaluation crops, for report.html")
    analysis, hists = sensitivity(w8, [evalset[:4]])
    page = write_report(out, rows, header, sim=w8, analysis=analysis, histograms=hists)
    click.echo(f"report written to {out}/report.md and {page} ({header['total_seconds']} s); ONNX model: {out}/model.onnx")


def _onnx_rows(out: Path, sim, sim_out, ref, evalset, batch_size: int, threads: int, rows: list, header: dict) -> None:
    """Export the sim (and its float twin), run both in ONNX Runtime: fidelity, agreement with the sim, speed."""
    import tempfile

    from ..export import export_onnx

    t = time.perf_counter()
    info = export_onnx(sim, out / "model.onnx")
    ort_out = onnx_runtime(out / "model.onnx", evalset, batch_size, threads)
    agree = ort_agreement(ort_out, sim_out)
    rows.append(row("ONNX Runtime int8 (model.onnx)", ref, ort_out, (out / "model.onnx").stat().st_size / 1e6,
                    time.perf_counter() - t, **agree))
    with tempfile.TemporaryDirectory() as tmp, sim.quantization_disabled():
        fp32_path = export_onnx(sim, Path(tmp) / "fp32.onnx")["onnx"]
        x1 = evalset[:1]
        ms_fp32, ms_int8 = latency_ms(fp32_path, x1, threads), latency_ms(out / "model.onnx", x1, threads)
    header["onnx"] = f"model.onnx (opset {info['opset']}, weights {info['weight_dtype']})"
    header["onnx_runtime_batch1_ms"] = {"fp32": round(ms_fp32, 2), "int8": round(ms_int8, 2),
                                        "speed-up": round(ms_fp32 / ms_int8, 2)}
    click.echo(f"ONNX Runtime, batch 1, {threads} threads: FP32 {ms_fp32:.1f} ms, int8 {ms_int8:.1f} ms "
               f"({ms_fp32 / ms_int8:.2f}x)")
