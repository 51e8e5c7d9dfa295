"""What the CLI reads: the model (a factory and a checkpoint), images (with the user's preprocessing),
the config. Every user mistake becomes one line that names the option and what to do."""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import click

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class UserError(click.UsageError):
    """A mistake in the user's input: one line naming the file or option and what to do (exit code 2)."""


def import_object(spec: str, option: str):
    """``MODULE:NAME`` -> the object (the current folder is importable)."""
    if ":" not in spec:
        raise click.BadParameter("use MODULE:NAME, e.g. torchvision.models:resnet18 (MODULE:FACTORY)", param_hint=option)
    mod_name, attr = spec.split(":", 1)
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 -- ImportError, SyntaxError, or whatever the module raises on import
        raise click.BadParameter(f"cannot import {mod_name!r}: {type(e).__name__}: {e}", param_hint=option) from None
    obj = getattr(mod, attr, None)
    if obj is None:
        raise click.BadParameter(f"{mod_name!r} has no attribute {attr!r}", param_hint=option)
    return obj


def build_model(spec: str):
    import torch

    factory = import_object(spec, "--model")
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001
        raise click.BadParameter(f"calling {spec}() failed: {type(e).__name__}: {e} (the factory must build the model "
                                 "with no arguments; wrap it in a function that passes them)", param_hint="--model") from None
    if not isinstance(model, torch.nn.Module):
        raise click.BadParameter(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module", param_hint="--model")
    return model


def _state_dict_of(obj, path: Path) -> dict:
    """The state_dict in a checkpoint: the dict itself, or under 'state_dict' / 'model_state_dict' / 'model';
    a 'module.' prefix (DataParallel) is removed."""
    import torch

    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise click.BadParameter(f"{path} holds a {type(obj).__name__}, not a state_dict of tensors", param_hint="--weights")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model, path: Path) -> None:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        pickled = "weights_only" in str(e) or "Unsupported global" in str(e)
        what = "a pickled object (a whole model?)" if pickled else "not a readable torch file"
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


def read_config(config_file: Optional[Path], recipe: str):
    from ..config.spec import QuantConfig

    if not config_file:
        return QuantConfig.preset(recipe)
    try:
        return QuantConfig.from_json(config_file.read_text())
    except (ValueError, TypeError) as e:
        raise click.BadParameter(f"{config_file}: {e}", param_hint="--config") from None


def check_writable(out: Path) -> None:
    """Fail before the long work if the output folder cannot be written."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} is a file, not a folder", param_hint="--out")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as e:
        raise click.BadParameter(f"cannot write in {parent}: {e.strerror or e}", param_hint="--out") from None


def float_list(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None


@dataclass
class Preprocess:
    """How an image file becomes a model input.

    Default: the largest centered square, resized to ``size`` (antialiased), scaled to [0, 1], normalized
    with ``mean``/``std`` (ImageNet's by default; their averages for one channel). With ``resize``: the
    shorter side is resized to ``resize`` first, then the centered ``size`` x ``size`` crop is taken.
    ``fn(PIL.Image) -> tensor (C, H, W)`` replaces all of it.
    """
    size: int = 224
    channels: int = 3
    resize: Optional[int] = None
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    fn: Optional[Callable] = None

    def __post_init__(self):
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) not in (1, self.channels):
                raise click.BadParameter(f"give 1 or {self.channels} values (one per channel), got {len(v)}",
                                         param_hint=f"--{name}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise click.BadParameter("standard deviations must be positive", param_hint="--std")
        if self.resize is not None and self.resize < self.size:
            raise click.BadParameter(f"--resize {self.resize} is smaller than the crop --input-size {self.size}",
                                     param_hint="--resize")

    def __call__(self, image):
        import numpy as np
        import torch
        import torch.nn.functional as F

        from ..data.photos import IMAGENET_MEAN, IMAGENET_STD

        if self.fn is not None:
            return torch.as_tensor(self.fn(image), dtype=torch.float32)
        arr = np.asarray(image.convert("RGB" if self.channels == 3 else "L"), dtype=np.float32) / 255
        img = torch.from_numpy(arr).reshape(arr.shape[0], arr.shape[1], self.channels).permute(2, 0, 1)
        h, w = img.shape[1:]
        if self.resize is not None:
            scale = self.resize / min(h, w)
            img = F.interpolate(img[None], size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                                mode="bilinear", antialias=True, align_corners=False)[0]
            h, w = img.shape[1:]
            side = self.size
        else:
            side = min(h, w)
        img = img[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        if self.resize is None:
            img = F.interpolate(img[None], size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)[0]
        mean = torch.tensor(self.mean or (IMAGENET_MEAN if self.channels == 3 else (sum(IMAGENET_MEAN) / 3,)))
        std = torch.tensor(self.std or (IMAGENET_STD if self.channels == 3 else (sum(IMAGENET_STD) / 3,)))
        return (img - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


def image_files(folder: Path, option: str) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise click.BadParameter(f"no .jpg/.png/.bmp/.webp images in {folder}", param_hint=option)
    return files


def load_images(files: list[Path], pre: Preprocess, option: str):
    """The preprocessed images, stacked; unreadable files are skipped with a warning naming them."""
    import torch
    from PIL import Image, UnidentifiedImageError

    out, bad = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(pre(im))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            bad.append(f"{f.name} ({type(e).__name__})")
    if bad:
        click.echo(f"warning: skipped {len(bad)} unreadable image(s): {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}",
                   err=True)
    if not out:
        raise click.BadParameter(f"none of the {len(files)} images could be read", param_hint=option)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise click.BadParameter(f"--preprocess returned tensors of different shapes {sorted(shapes)[:3]}", param_hint=option)
    return torch.stack(out)
