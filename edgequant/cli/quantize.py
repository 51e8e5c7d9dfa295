"""``edgequant quantize``: a deployable model, its encodings, the saved sim and a fidelity verdict."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import click

from . import PRESET_NAMES, main
from .inputs import (Preprocess, UserError, build_model, check_writable, float_list, image_files, import_object,
                     load_images, load_weights, read_config)
from .report import batches, logits, onnx_runtime, ort_agreement, print_table, row, sensitivity, write_report

PREPROCESS_HELP = ("Default preprocessing: the largest centered square of each image, resized to --input-size, RGB "
                   "(or grayscale with --channels 1), scaled to [0, 1], normalized with ImageNet's mean/std.")


@main.command(epilog=PREPROCESS_HELP)
@click.option("--model", "model_spec", required=True, help="MODULE:FACTORY that returns the float nn.Module, e.g. torchvision.models:mobilenet_v2.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A checkpoint to load: a state_dict, or a dict holding one under 'state_dict' / 'model' ('module.' prefixes are removed).")
@click.option("--calib", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="Folder of calibration images.")
@click.option("--eval", "eval_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of evaluation images for the verdict (default: --holdout of the --calib images, never calibrated on).")
@click.option("--holdout", type=click.FloatRange(0, 0.9), default=0.25, show_default=True,
              help="Without --eval: the share of the --calib images held apart for the verdict.")
@click.option("--recipe", default="w8a8", show_default=True, type=click.Choice(PRESET_NAMES), help="Quantization preset.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A QuantConfig JSON file (overrides --recipe).")
@click.option("--input-size", type=click.IntRange(8), default=224, show_default=True, help="Square model input (the crop) in pixels.")
@click.option("--resize", type=click.IntRange(8), default=None, help="Resize the shorter side to this first, then center-crop --input-size (e.g. 256 for 224).")
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True, help="Image channels the model takes (1: grayscale).")
@click.option("--mean", default=None, help="Per-channel mean, comma-separated (default: ImageNet's 0.485,0.456,0.406).")
@click.option("--std", default=None, help="Per-channel std, comma-separated (default: ImageNet's 0.229,0.224,0.225).")
@click.option("--preprocess", "preprocess_spec", default=None, help="MODULE:FN, FN(PIL.Image) -> tensor (C, H, W): replaces all of the above.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Images per forward pass.")
@click.option("--ptq", default="none", show_default=True,
              help="Post-training techniques: 'auto' (fold BN, CLE, high-bias absorption, then AdaRound for <= 4-bit "
                   "weights or bias correction, each kept only if it helps), 'none' (calibration only), or a "
                   "comma-separated list of: bn_fold,cle,hba,adaround,bias_correction,loss_aware.")
@click.option("--adaround-iterations", type=click.IntRange(1), default=800, show_default=True, help="Adam steps per layer for AdaRound.")
@click.option("--qat-steps", type=click.IntRange(0), default=0, show_default=True,
              help="Quantization-aware training after PTQ: this many steps of distillation from the float model on "
                   "the calibration images (lightly augmented: random crops of 80-100%, flips), learned scales and offsets.")
@click.option("--qat-lr", type=click.FloatRange(0, min_open=True), default=1e-5, show_default=True,
              help="Adam learning rate of the QAT steps for the weights (scales and offsets: a tenth of it; cosine decay to zero).")
@click.option("--eval-fn", "eval_fn_spec", default=None, help="MODULE:FN, FN(model) -> float (higher is better, e.g. your accuracy): "
              "reported for the float model and the quantized one, and used to pick PTQ stages.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the model runs.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch and ONNX Runtime CPU threads (default: their choice).")
@click.option("--onnx/--no-onnx", default=True, show_default=True, help="Write model.onnx (QDQ) and check it in ONNX Runtime.")
@click.option("--dynamic-size", is_flag=True,
              help="Write model.onnx with symbolic height and width (one file for every image size), where the graph "
                   "allows it (checked by building it at a second size); otherwise a warning and the --input-size.")
@click.option("--compress-macs", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Compress the model to this fraction of its MACs before quantizing (per-layer ratios chosen on the "
                   "calibration images; see --compress-method).")
@click.option("--compress-method", type=click.Choice(["svd", "prune"]), default="svd", show_default=True,
              help="svd: weight SVD of linear/1x1 layers and spatial SVD of kxk convs; prune: channel pruning with "
                   "least-squares reconstruction.")
@click.option("--analyze", "analyze_report", is_flag=True,
              help="Add the per-quantizer sensitivity ranking and histograms of the worst tensors to report.html "
                   "(two forward passes per quantizer on one batch of the verdict images: minutes on large models).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder (replaced whole at the end): model.onnx + model.encodings.json, encodings (edgequant and "
                   "AIMET formats), the saved sim (sim/, read it with edgequant.load), plan, config, report, summary.")
@click.option("--debug", is_flag=True, help="Show the full Python traceback of an error.")
def quantize(debug, **opts):
    """Quantize your own image model, calibrated on a folder of images, and check the result.

    Writes a deployable ONNX model and prints (and writes) a verdict: fidelity to the float model on
    images not used for calibration, size, and ONNX Runtime's agreement with the sim.
    """
    try:
        _run(**opts)
    except click.ClickException:
        raise
    except Exception as e:  # noqa: BLE001 -- one line for the user; the traceback with --debug
        if debug:
            raise
        from ..errors import EdgequantError

        kind = "" if isinstance(e, EdgequantError) else f"{type(e).__name__}: "
        raise UserError(f"{kind}{e}".splitlines()[0] + " (run with --debug for the traceback)") from None


def _setup(device: str, threads):
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine (torch.cuda.is_available() is False)",
                                 param_hint="--device")
    return torch.device(device)


def _data(calib: Path, eval_dir, holdout: float, pre: Preprocess):
    """``(calibration images, evaluation images or None, note)``; held-out images are never calibrated on."""
    files = image_files(calib, "--calib")
    if eval_dir is not None:
        return load_images(files, pre, "--calib"), load_images(image_files(eval_dir, "--eval"), pre, "--eval"), \
            f"evaluation: {eval_dir}"
    n_eval = int(len(files) * holdout)
    if n_eval < 2 or len(files) - n_eval < 2:
        return load_images(files, pre, "--calib"), None, "no evaluation images (too few to hold some out): no verdict"
    step = len(files) / n_eval  # spread the held-out images over the folder
    held = {int(i * step) for i in range(n_eval)}
    ev = [f for i, f in enumerate(files) if i in held]
    cal = [f for i, f in enumerate(files) if i not in held]
    return load_images(cal, pre, "--calib"), load_images(ev, pre, "--calib"), \
        f"evaluation: {len(ev)} of the {len(files)} --calib images, held apart from calibration"


def _quantize_model(model, calib, config, recipe_name, ptq, batch_size, adaround_iterations, eval_fn, device):
    """``(sim, ptq result or None)``; data mistakes become one line."""
    from ..errors import DataError
    from ..sim.quantsim import QuantSim

    stages = ptq if ptq in ("auto", "none") else [s.strip() for s in ptq.split(",") if s.strip()]
    try:
        if stages == "none":
            sim = QuantSim(model, calib[:1].to(device), config=config)
            sim.calibrate(batches(calib, batch_size))
            return sim, None
        from ..ptq import quantize as run_ptq

        # one sim, one model.onnx: a model that captures only region by region stays in leaf mode here (the Python
        # API's edgequant.quantize quantizes its regions: a RegionSim exported as one file per region)
        result = run_ptq(model, batches(calib, batch_size), recipe=config, ptq=stages, eval_fn=eval_fn,
                         adaround_iterations=adaround_iterations, recipe_name=recipe_name, regions=None)
        return result.sim, result
    except DataError as e:
        raise UserError(f"{e} (check --input-size / --channels / --preprocess against what the model takes)") from None
    except ValueError as e:
        raise UserError(str(e)) from None


def _run(model_spec, weights, calib, eval_dir, holdout, recipe, config_file, input_size, resize, channels, mean, std,
         preprocess_spec, batch_size, ptq, adaround_iterations, qat_steps, qat_lr, eval_fn_spec, device, threads, onnx, dynamic_size, out,
         analyze_report=False, compress_macs=None, compress_method="svd"):
    t0 = time.perf_counter()
    dev = _setup(device, threads)
    check_writable(out)
    model = build_model(model_spec)
    if weights:
        load_weights(model, weights)
    model.eval().to(dev)
    config = read_config(config_file, recipe)
    pre = Preprocess(input_size, int(channels), resize, float_list(mean, "--mean"), float_list(std, "--std"),
                     import_object(preprocess_spec, "--preprocess") if preprocess_spec else None)
    eval_fn = import_object(eval_fn_spec, "--eval-fn") if eval_fn_spec else None
    calib_x, eval_x, data_note = _data(calib, eval_dir, holdout, pre)
    click.echo(f"{len(calib_x)} calibration images from {calib}; {data_note}")
    compressed = original = None
    if compress_macs is not None:
        from ..compress import compress
        compressed = compress(model, batches(calib_x.to(dev), batch_size), target=compress_macs, method=compress_method)
        click.echo(str(compressed))
        original, model = model, compressed.model  # quantized from here on; the verdict still compares with the original
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim, result = _quantize_model(model, calib_x, config, recipe if not config_file else config_file.name, ptq,
                                      batch_size, adaround_iterations, eval_fn, dev)
    for w in {str(w.message) for w in caught}:
        click.echo(f"warning: {w}", err=True)
    if result is not None:
        click.echo(result.report.to_markdown())
    header = {"model": model_spec, "weights": str(weights) if weights else None, "recipe": recipe if not config_file else str(config_file),
              "ptq": ptq, "calibration_images": len(calib_x), "data": data_note, "preprocess": _describe(pre)}
    if compressed is not None:
        header["compression"] = f"{compress_method}, {compressed}"
    qat = _qat(model, sim, calib_x, qat_steps, qat_lr, batch_size) if qat_steps else None
    if qat is not None:
        header["qat"] = str(qat)
        click.echo(str(qat))
    verdict = _verdict(model, sim, eval_x, eval_fn, batch_size, dev, original)
    extra_html = {"sim": sim, "compressed": compressed}
    if analyze_report:
        extra_html["analysis"], extra_html["histograms"] = sensitivity(sim, batches((eval_x if eval_x is not None else calib_x)[:batch_size], batch_size))
    _write_outputs(out, sim, config, result, verdict, header, onnx, eval_x, batch_size, threads, qat, extra_html,
                   dynamic_size)
    header["total_seconds"] = round(time.perf_counter() - t0, 1)
    rows, extra = verdict[:2]
    print_table(rows, extra)
    onnx_files = "model.onnx, model.encodings.json, " if (out / "model.onnx").exists() else ""
    click.echo(f"wrote {out}/: {onnx_files}encodings.json, encodings.aimet.json, sim/, plan.json, config.json, report.md, "
               f"summary.txt, report.html ({header['total_seconds']} s)")


def _qat(model, sim, calib_x, steps: int, lr: float, batch_size: int):
    """Distillation from ``model`` on the (augmented, shuffled) calibration images; returns the QATReport."""
    import torch

    from ..qat import finetune, light_augment, prepare_qat

    g = torch.Generator().manual_seed(0)
    order = calib_x[torch.randperm(len(calib_x), generator=g)]
    data = [b for b in order.split(batch_size) if len(b) > 1] or [order]
    prepare_qat(sim)
    return finetune(sim, data, steps=steps, lr=lr, teacher=model, augment=lambda x: light_augment(x, g))


def _describe(pre: Preprocess) -> str:
    if pre.fn is not None:
        return f"custom ({pre.fn.__module__}:{pre.fn.__name__})"
    crop = f"resize shorter side to {pre.resize}, center crop {pre.size}" if pre.resize else f"largest centered square -> {pre.size}"
    return f"{crop}, {'RGB' if pre.channels == 3 else 'grayscale'}, mean {pre.mean or 'ImageNet'}, std {pre.std or 'ImageNet'}"


def _verdict(model, sim, eval_x, eval_fn, batch_size, device, original=None):
    """``(rows, extra columns, FP32 logits, the sim's logits)`` of the verdict on the evaluation images; after
    compression (``original``: the model before it) fidelity is to the original model, with a row for the
    compressed float model."""
    sizes = sim.size_bytes()
    extra = ("eval_fn",) if eval_fn is not None else ()
    f_score = float(eval_fn(model)) if eval_fn is not None else None
    q_score = float(eval_fn(sim)) if eval_fn is not None else None
    if eval_x is None:
        return ([{"config": "fp32", "size_mb": sizes["float"] / 1e6, "eval_fn": f_score},
                 {"config": "quantized (sim)", "size_mb": sizes["quantized"] / 1e6, "eval_fn": q_score}], extra, None, None)
    t = time.perf_counter()
    ref = logits(model, eval_x, batch_size, device, "evaluating FP32")
    t_float = time.perf_counter() - t
    rows = [row("fp32", ref, ref, sizes["float"] / 1e6, t_float, eval_fn=f_score)]
    if original is not None:
        small = ref
        ref = logits(original, eval_x, batch_size, device, "evaluating the original FP32")
        size = sum(p.numel() * p.element_size() for p in original.parameters()) / 1e6
        o_score = float(eval_fn(original)) if eval_fn is not None else None
        rows = [row("fp32 (original)", ref, ref, size, t_float, eval_fn=o_score),
                row("fp32 compressed", ref, small, sizes["float"] / 1e6, t_float, eval_fn=f_score)]
    t = time.perf_counter()
    out = logits(sim, eval_x, batch_size, device, "evaluating the sim")
    rows.append(row("quantized (sim)", ref, out, sizes["quantized"] / 1e6, time.perf_counter() - t, eval_fn=q_score))
    return rows, extra, ref, out


def _write_outputs(out: Path, sim, config, result, verdict, header, onnx: bool, eval_x, batch_size, threads, qat=None,
                   extra_html=None, dynamic_size: bool = False) -> None:
    """Everything into a fresh folder beside ``out``, swapped in at the end (a failed run changes nothing)."""
    import torch

    from ..io.encodings import atomic_write_text, replace_folder

    rows, extra, ref, sim_out = verdict

    def write(tmp: Path):
        if result is not None:
            atomic_write_text(tmp / "ptq_report.md", result.report.to_markdown() + "\n")
            atomic_write_text(tmp / "ptq_report.json", json.dumps(result.report.to_dict(), indent=2))
            torch.save(result.model.state_dict(), tmp / "float_model_ptq.pt")
        if qat is not None:
            qat.save(tmp / "qat")  # report.json and the loss / SQNR plot
        sim.save_encodings(tmp / "encodings.json")
        sim.save_encodings(tmp / "encodings.aimet.json", format="aimet")
        atomic_write_text(tmp / "config.json", config.to_json())
        atomic_write_text(tmp / "plan.json", sim.plan.to_json())
        atomic_write_text(tmp / "summary.txt", sim.summary() + "\n")
        sim.save(tmp / "sim")
        if onnx:
            _export_and_check(tmp, sim, rows, header, ref, sim_out, eval_x, batch_size, threads, dynamic_size)
        write_report(tmp, rows, header, extra, **(extra_html or {}))

    replace_folder(out, write)


def _export_and_check(tmp: Path, sim, rows, header, ref, sim_out, eval_x, batch_size, threads, dynamic=False) -> None:
    """model.onnx + model.encodings.json (with ``dynamic``: symbolic height and width where the graph allows); ONNX
    Runtime's outputs on the evaluation images: their fidelity to FP32 (what deploys) and their agreement with the sim."""
    import warnings

    from ..errors import ExportError
    from ..export import export_onnx

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = export_onnx(sim, tmp / "model.onnx", dynamic_size=None if dynamic else False)
    except ExportError as e:
        header["onnx"] = f"not written: {e}"
        click.echo(f"warning: ONNX export failed (the other files are written): {e}", err=True)
        return
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    size = "any height and width" if info["dynamic_size"] else "the input size"
    header["onnx"] = (f"model.onnx (opset {info['opset']}, weights {info['weight_dtype']}, {size}), "
                      "model.encodings.json")
    if eval_x is None:
        return
    t = time.perf_counter()
    ort_out = onnx_runtime(tmp / "model.onnx", eval_x, batch_size, threads or 0)
    seconds = time.perf_counter() - t
    size_mb = (tmp / "model.onnx").stat().st_size / 1e6
    rows.append(row("ONNX Runtime (model.onnx)", ref, ort_out, size_mb, seconds, **ort_agreement(ort_out, sim_out)))
