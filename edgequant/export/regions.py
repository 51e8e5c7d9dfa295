"""Deploying a :class:`~edgequant.sim.RegionSim`: one ONNX file per region, and the model with its regions run by
ONNX Runtime (the code between them still in torch), to check the deployed model end to end."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..batches import as_args
from ..graph.patterns import set_submodule


def export_regions(sim, folder, **kwargs) -> dict[str, dict]:
    """Write each region of ``sim`` as ``<folder>/<region name>.onnx`` with its encodings beside it (the folder is
    created); ``kwargs`` go to :func:`~edgequant.export_onnx`. Returns ``{region: export_onnx's result}``."""
    from .onnx_qdq import export_onnx

    folder = Path(folder)
    if folder.suffix == ".onnx":
        raise ValueError(f"a RegionSim exports one file per region: give a folder, not {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    return {name: export_onnx(region, folder / f"{name}.onnx", **kwargs) for name, region in sim.regions.items()}


class OrtRegion(nn.Module):
    """One exported region run by ONNX Runtime: called like the region (tensors in the same nesting), returns its
    outputs in the region's structure (recorded on the region's own example inputs)."""

    def __init__(self, path, region, threads: int = 2):
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        args, kwargs = as_args(region._example_inputs)
        with torch.no_grad():
            out = region(*args, **kwargs)
        self.spec = pytree.tree_flatten(out)[1]

    def forward(self, *args, **kwargs):
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)]
        if len(leaves) != len(self.names):
            raise ValueError(f"the ONNX region takes {len(self.names)} tensors, got {len(leaves)}")
        outs = self.session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(self.names, leaves)})
        return pytree.tree_unflatten([torch.from_numpy(np.asarray(o)) for o in outs], self.spec)


def deployed(sim, paths: dict[str, dict], threads: int = 2) -> nn.Module:
    """A copy of ``sim.model`` whose regions run in ONNX Runtime from ``paths`` (:func:`export_regions`'s result)."""
    model = copy.deepcopy(sim.model)
    for name, region in sim.regions.items():
        set_submodule(model, name, OrtRegion(paths[name]["onnx"], region, threads))
    return model.eval()
