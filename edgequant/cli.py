"""The ``edgequant`` command line: a thin layer over the Python API."""
from __future__ import annotations

import importlib
import json
import sys
import time
import warnings
from pathlib import Path

import click
import torch

from .config.spec import PRESETS


def _batches(x: torch.Tensor, batch_size: int):
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


@torch.no_grad()
def _logits(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(b) for b in _batches(x, batch_size)])


def _write_report(out: Path, rows: list[dict], header: dict) -> None:
    from .io.encodings import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps({**header, "results": rows}, indent=2))
    lines = [f"# edgequant report: {header['model']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "model"]
    lines += ["", "| config | top-1 agreement | top-1 (confident) | top-5 overlap | logit SQNR (dB) | KL | size (MB) | calibration (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['top1']:.1%} | {r['top1_confident']:.1%} | {r['top5']:.1%} | {r['sqnr_db']:.2f} | "
                     f"{r['kl']:.4f} | {r['size_mb']:.2f} | {r['calibration_s']:.1f} |")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def _print_table(rows: list[dict]) -> None:
    click.echo(f"{'config':<18} {'top-1':>7} {'top-1 conf':>10} {'top-5':>7} {'SQNR dB':>8} {'KL':>8} {'size MB':>8} {'calib s':>8}")
    for r in rows:
        click.echo(f"{r['config']:<18} {r['top1']:>7.1%} {r['top1_confident']:>10.1%} {r['top5']:>7.1%} {r['sqnr_db']:>8.2f} "
                   f"{r['kl']:>8.4f} {r['size_mb']:>8.2f} {r['calibration_s']:>8.1f}")


def evaluate_configs(model, calib: torch.Tensor, evalset: torch.Tensor, configs, batch_size: int = 32, progress: bool = True):
    """Quantize ``model`` with each config, calibrate on ``calib``, compare with FP32 on ``evalset``."""
    from .metrics import fidelity
    from .sim.quantsim import QuantSim

    ref = _logits(model, evalset, batch_size)
    float_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    rows = [{"config": "fp32", **fidelity(ref, ref).as_dict(), "size_mb": float_mb, "calibration_s": 0.0}]
    sims = {}
    for cfg in configs:
        sim = QuantSim(model, calib[:1], config=cfg)
        rep = sim.calibrate(_batches(calib, batch_size), progress=progress)
        out = _logits(sim, evalset, batch_size)
        rows.append({"config": cfg, **fidelity(ref, out).as_dict(), "size_mb": sim.size_bytes()["quantized"] / 1e6,
                     "calibration_s": rep.seconds})
        sims[cfg] = sim
    return rows, sims


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgequant")
def main():
    """edgequant: quantize trained PyTorch networks to low-precision integers (INT8, INT4, mixed).

    \b
    edgequant demo                 real MobileNetV2, real photos: FP32 vs W8A8 fidelity report
    edgequant quantize ...         quantize your own model, calibrated on a folder of images
    """


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/demo"), show_default=True,
              help="Folder for report.md, report.json and the encodings files.")
@click.option("--calib", "n_calib", type=click.IntRange(1), default=96, show_default=True, help="Calibration crops.")
@click.option("--eval", "n_eval", type=click.IntRange(1), default=160, show_default=True, help="Evaluation crops (other photos).")
@click.option("--config", "configs", multiple=True, default=("w8a8", "w8a8_per_tensor"), show_default=True,
              type=click.Choice(sorted(PRESETS)), help="Presets to compare (repeat the option for several).")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Crops per forward pass (16 ran 1.5x faster per image than 32 on a 2-core machine: less memory traffic).")
def demo(out: Path, n_calib: int, n_eval: int, configs, threads, batch_size):
    """Quantize MobileNetV2 (real ImageNet weights) calibrated on real photo crops and report its fidelity
    to FP32 on crops of other photos: top-1 agreement, top-5 overlap, logit SQNR, KL, size, time."""
    from .data.photos import CALIBRATION_PHOTOS, EVALUATION_PHOTOS, calibration_crops, evaluation_crops
    from .models.mobilenet import mobilenet_v2_imagenet

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = mobilenet_v2_imagenet()
    click.echo(f"MobileNetV2 (ImageNet weights); {n_calib} calibration crops from {len(CALIBRATION_PHOTOS)} photos, "
               f"{n_eval} evaluation crops from {len(EVALUATION_PHOTOS)} other photos")
    calib, evalset = calibration_crops(n_calib), evaluation_crops(n_eval)
    rows, sims = evaluate_configs(model, calib, evalset, configs, batch_size=batch_size)
    _print_table(rows)
    header = {"model": "MobileNetV2 (torchvision IMAGENET1K_V1)", "calibration_crops": n_calib, "evaluation_crops": n_eval,
              "calibration_photos": list(CALIBRATION_PHOTOS), "evaluation_photos": list(EVALUATION_PHOTOS),
              "batch_norm": "not folded (conv weights are quantized before the BN)",
              "torch_threads": torch.get_num_threads(), "batch_size": batch_size, "total_seconds": round(time.perf_counter() - t0, 1)}
    _write_report(out, rows, header)
    for cfg, sim in sims.items():
        sim.save_encodings(out / f"mobilenet_v2.{cfg}.encodings.json")
    click.echo(f"report written to {out}/report.md ({header['total_seconds']} s)")


class _UserError(click.UsageError):
    """A mistake in the user's input: one line naming the file or option and what to do (exit code 2)."""


def _load_images(folder: Path, size: int, channels: int = 3) -> torch.Tensor:
    """Center-cropped, resized, ImageNet-normalized images of ``folder``; unreadable files are skipped
    with a warning naming them."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image, UnidentifiedImageError

    from .data.photos import IMAGENET_MEAN, IMAGENET_STD

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"})
    if not files:
        raise click.BadParameter(f"no .jpg/.png/.bmp/.webp images in {folder}", param_hint="--calib")
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    if channels == 1:
        mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
    out, bad = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255
        except (OSError, UnidentifiedImageError, ValueError) as e:
            bad.append(f"{f.name} ({type(e).__name__})")
            continue
        img = torch.from_numpy(arr).reshape(arr.shape[0], arr.shape[1], channels).permute(2, 0, 1)
        h, w = img.shape[1:]
        side = min(h, w)
        img = img[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        img = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append((img - mean.view(-1, 1, 1)) / std.view(-1, 1, 1))
    if bad:
        click.echo(f"warning: skipped {len(bad)} unreadable image(s) in {folder}: {', '.join(bad[:5])}"
                   f"{', ...' if len(bad) > 5 else ''}", err=True)
    if not out:
        raise click.BadParameter(f"none of the {len(files)} images in {folder} could be read", param_hint="--calib")
    return torch.stack(out)


def _load_factory(spec: str):
    if ":" not in spec:
        raise click.BadParameter("use MODULE:FACTORY, e.g. torchvision.models:resnet18", param_hint="--model")
    mod_name, attr = spec.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 -- ImportError, SyntaxError, or whatever the module raises on import
        raise click.BadParameter(f"cannot import {mod_name!r}: {type(e).__name__}: {e}", param_hint="--model") from None
    factory = getattr(mod, attr, None)
    if factory is None:
        raise click.BadParameter(f"{mod_name!r} has no attribute {attr!r}", param_hint="--model")
    return factory


def _build_model(spec: str) -> torch.nn.Module:
    factory = _load_factory(spec)
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001
        raise click.BadParameter(f"calling {spec}() failed: {type(e).__name__}: {e} (the factory must build the model "
                                 "with no arguments; wrap it in a function that passes them)", param_hint="--model") from None
    if not isinstance(model, torch.nn.Module):
        raise click.BadParameter(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module", param_hint="--model")
    return model


def _state_dict_of(obj, path: Path) -> dict:
    """The state_dict in a checkpoint: the dict itself, or under 'state_dict' / 'model' / 'model_state_dict';
    a 'module.' prefix (DataParallel) is removed."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise click.BadParameter(f"{path} holds a {type(obj).__name__}, not a state_dict of tensors", param_hint="--weights")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        what = "a pickled object (a whole model?)" if "weights_only" in str(e) or "Unsupported global" in str(e) else "not a readable torch file"
        raise click.BadParameter(f"{path} is {what}: save weights with torch.save(model.state_dict(), path)",
                                 param_hint="--weights") from None
    state = _state_dict_of(obj, path)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise click.BadParameter(
            f"{path} does not fit the model: {len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}, {len(wrong)} of another shape {wrong[:3]}; is it the checkpoint of this model?",
            param_hint="--weights")
    model.load_state_dict(state, strict=True)


def _check_writable(out: Path) -> None:
    """Fail before the long work if the output folder cannot be written."""
    import tempfile

    parent = out.resolve().parent
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} is a file, not a folder", param_hint="--out")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as e:
        raise click.BadParameter(f"cannot write in {parent}: {e.strerror or e}", param_hint="--out") from None


def _read_config(config_file, recipe):
    from .config.spec import QuantConfig

    if not config_file:
        return QuantConfig.preset(recipe)
    try:
        return QuantConfig.from_json(config_file.read_text())
    except (ValueError, TypeError) as e:
        raise click.BadParameter(f"{config_file}: {e}", param_hint="--config") from None


@main.command()
@click.option("--model", "model_spec", required=True, help="MODULE:FACTORY that returns the float nn.Module, e.g. torchvision.models:mobilenet_v2.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A checkpoint to load: a state_dict, or a dict holding one under 'state_dict' / 'model' ('module.' prefixes are removed).")
@click.option("--calib", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="Folder of calibration images.")
@click.option("--recipe", default="w8a8", show_default=True, type=click.Choice(sorted(PRESETS)), help="Quantization preset.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A QuantConfig JSON file (overrides --recipe).")
@click.option("--input-size", type=click.IntRange(8), default=224, show_default=True, help="Square input size the images are resized to.")
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True, help="Image channels the model takes (1: grayscale).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--ptq", default="none", show_default=True,
              help="Post-training techniques: 'auto' (fold BN, CLE, high-bias absorption, then AdaRound for <= 4-bit "
                   "weights or bias correction, each kept only if it helps), 'none' (calibration only), or a "
                   "comma-separated list of: bn_fold,cle,hba,adaround,bias_correction,loss_aware.")
@click.option("--adaround-iterations", type=click.IntRange(1), default=800, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder (replaced whole at the end): encodings (edgequant and AIMET formats), the saved sim "
                   "(sim/, read it with edgequant.load), plan, config, summary, PTQ report.")
@click.option("--debug", is_flag=True, help="Show the full Python traceback of an error.")
def quantize(model_spec, weights, calib, recipe, config_file, input_size, channels, batch_size, ptq, adaround_iterations,
             out, debug):
    """Quantize your own image model, calibrated on a folder of images.

    With --ptq other than 'none', the sim is built from the transformed float model (batch norms
    folded, layers equalized); that float model, which goes with the encodings, is saved as
    float_model_ptq.pt (state_dict) and inside sim/.
    """
    try:
        _quantize(model_spec, weights, calib, recipe, config_file, input_size, int(channels), batch_size, ptq,
                  adaround_iterations, out)
    except click.ClickException:
        raise
    except Exception as e:  # noqa: BLE001 -- one line for the user; the traceback with --debug
        if debug:
            raise
        from .errors import EdgequantError

        kind = "" if isinstance(e, EdgequantError) else f"{type(e).__name__}: "
        raise _UserError(f"{kind}{e}".splitlines()[0] + " (run with --debug for the traceback)") from None


def _quantize(model_spec, weights, calib, recipe, config_file, input_size, channels, batch_size, ptq, adaround_iterations, out):
    from .errors import DataError
    from .sim.quantsim import QuantSim

    _check_writable(out)
    model = _build_model(model_spec)
    if weights:
        _load_weights(model, weights)
    model.eval()
    config = _read_config(config_file, recipe)
    images = _load_images(calib, input_size, channels)
    click.echo(f"{len(images)} calibration images from {calib}")
    stages = ptq if ptq in ("auto", "none") else [s.strip() for s in ptq.split(",") if s.strip()]
    result = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if stages == "none":
                sim = QuantSim(model, images[:1], config=config)
                rep = sim.calibrate(_batches(images, batch_size))
            else:
                from .ptq import quantize as run_ptq

                result = run_ptq(model, _batches(images, batch_size), recipe=config, ptq=stages,
                                 adaround_iterations=adaround_iterations)
                sim = result.sim
        except DataError as e:
            raise _UserError(f"{e} (check --input-size / --channels against what the model takes)") from None
        except ValueError as e:
            raise _UserError(str(e)) from None
    for w in {str(w.message) for w in caught}:
        click.echo(f"warning: {w}", err=True)
    if result is not None:
        click.echo(result.report.to_markdown())
    _write_outputs(out, sim, config, result)
    sizes = sim.size_bytes()
    if result is None:
        click.echo(f"calibrated {rep.quantizers} quantizers on {rep.batches} batches in {rep.seconds:.1f} s")
    click.echo(f"weights {sizes['float'] / 1e6:.2f} MB -> {sizes['quantized'] / 1e6:.2f} MB")
    click.echo(f"wrote {out}/: encodings.json, encodings.aimet.json, config.json, plan.json, summary.txt, sim/")


def _write_outputs(out: Path, sim, config, result) -> None:
    """Everything into a fresh folder beside ``out``, swapped in at the end (a failed run changes nothing)."""
    from .io.encodings import atomic_write_text, replace_folder

    def write(tmp: Path):
        if result is not None:
            atomic_write_text(tmp / "ptq_report.md", result.report.to_markdown() + "\n")
            atomic_write_text(tmp / "ptq_report.json", json.dumps(result.report.to_dict(), indent=2))
            torch.save(result.model.state_dict(), tmp / "float_model_ptq.pt")
        sim.save_encodings(tmp / "encodings.json")
        sim.save_encodings(tmp / "encodings.aimet.json", format="aimet")
        atomic_write_text(tmp / "config.json", config.to_json())
        atomic_write_text(tmp / "plan.json", sim.plan.to_json())
        atomic_write_text(tmp / "summary.txt", sim.summary() + "\n")
        torch.save(sim.state_dict(), tmp / "sim_state_dict.pt")
        sim.save(tmp / "sim")

    replace_folder(out, write)


if __name__ == "__main__":
    main()
