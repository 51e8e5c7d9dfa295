"""The ``edgequant`` command line: a thin layer over the Python API.

Importing this package imports neither torch nor the rest of edgequant (``edgequant --help`` answers
at once); each command imports what it needs when it runs.
"""
from __future__ import annotations

import click

#: the preset names (kept here so that ``--help`` does not import torch; a test checks them against PRESETS)
PRESET_NAMES = ("w4a16", "w4a8", "w4a8_per_tensor", "w7a8", "w8a16", "w8a8", "w8a8_per_tensor", "w8a8_transformer")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgequant")
def main():
    """edgequant: quantize trained PyTorch networks to low-precision integers (INT8, INT4, mixed).

    \b
    edgequant demo                 real MobileNetV2 on real photos: FP32, W8A8, PTQ, W4A8 AdaRound, ONNX Runtime
    edgequant quantize ...         quantize your own image model: ONNX, encodings, saved sim, fidelity verdict
    edgequant analyze ...          which quantizers cost the most fidelity, and what to do about them
    """


from . import analyze as _analyze  # noqa: E402,F401  (registers the command)
from . import demo as _demo  # noqa: E402,F401
from . import quantize as _quantize  # noqa: E402,F401

__all__ = ["main", "PRESET_NAMES"]
