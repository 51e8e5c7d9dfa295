"""Real photos that ship offline (scikit-image, scikit-learn), cut into ImageNet-style crops.

Calibration and evaluation crops come from disjoint sets of photos, so a calibration can never see
an evaluation image. Crops are random (seeded): a square of 30-100% of the shorter side, optionally
flipped, resized to ``size`` with antialiasing, normalized with the ImageNet mean and std.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: photos used only for calibration / only for evaluation (never both)
CALIBRATION_PHOTOS = ("astronaut", "rocket", "immunohistochemistry", "camera", "brick", "gravel", "moon", "china", "colorwheel")
EVALUATION_PHOTOS = ("chelsea", "coffee", "hubble_deep_field", "retina", "coins", "grass", "clock", "flower",
                     "stereo_motorcycle", "horse")


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> torch.Tensor:
    """A bundled photo as a uint8 tensor (3, H, W); grey photos are repeated over 3 channels."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"scikit-image has no bundled photo {name!r}")
        img = loader()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
            img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous()


def photo_crops(photos, n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``n`` normalized crops (n, 3, size, size), drawn round-robin from ``photos``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(n, 3, size, size)
    imgs = [load_photo(p) for p in photos]
    for i in range(n):
        img = imgs[i % len(imgs)]
        _, h, w = img.shape
        side = int(min(h, w) * (0.3 + 0.7 * torch.rand((), generator=g).item()))
        y = int(torch.randint(0, h - side + 1, (), generator=g))
        x = int(torch.randint(0, w - side + 1, (), generator=g))
        crop = img[:, y:y + side, x:x + side].float().div_(255)
        if torch.rand((), generator=g).item() < 0.5:
            crop = crop.flip(-1)
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out[i] = (crop.clamp_(0, 1) - mean) / std
    return out


def calibration_crops(n: int = 256, size: int = 224, seed: int = 0) -> torch.Tensor:
    return photo_crops(CALIBRATION_PHOTOS, n, size, seed)


def evaluation_crops(n: int = 512, size: int = 224, seed: int = 1) -> torch.Tensor:
    return photo_crops(EVALUATION_PHOTOS, n, size, seed)
