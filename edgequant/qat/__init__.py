"""Quantization-aware training: trainable grids (LSQ / LSQ+) or fixed ones, and a fine-tuning loop.

>>> import torch
>>> from torch import nn
>>> from edgequant import QuantSim
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
>>> sim = QuantSim(model, torch.randn(1, 3, 8, 8), "w4a8")
>>> _ = sim.calibrate([torch.randn(8, 3, 8, 8)], progress=False)
>>> sorted(prepare_qat(sim))[:2]
['0.weight', '1']
>>> report = finetune(sim, [torch.randn(8, 3, 8, 8) for _ in range(4)], steps=3, lr=1e-3, progress=False)
>>> report.steps, len(report.sqnr_db)
(3, 3)
"""
from .augment import light_augment
from .bn import BnFolding, fold_simulated_bn, simulate_bn_folding
from .finetune import QATReport, distillation_loss, finetune
from .prepare import prepare_qat, project_, quantizer_parameters

__all__ = ["prepare_qat", "finetune", "QATReport", "distillation_loss", "project_", "quantizer_parameters", "light_augment",
           "simulate_bn_folding", "fold_simulated_bn", "BnFolding"]
