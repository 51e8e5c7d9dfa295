"""Graph capture: one path, ``torch.fx`` symbolic tracing, with a readable error when it fails."""
from __future__ import annotations

import os
import traceback

import torch
from torch import fx, nn

from ..errors import GraphCaptureError
from .ops import is_leaf_module


class _Tracer(fx.Tracer):
    """Keeps every known torch layer (and its subclasses, which keep their own forward) as one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_leaf_module(m):
            return True
        return super().is_leaf_module(m, qualname)


def capture(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` sharing its submodules.

    Raises :class:`GraphCaptureError` naming the user source line where tracing stopped.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure becomes one clear error
        raise GraphCaptureError(_describe_failure(e)) from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.train(model.training)
    return gm


def _describe_failure(e: BaseException) -> str:
    """``'<file>:<line> in <function>: `<code>`: <error>'`` for the innermost frame of user code."""
    frames = traceback.extract_tb(e.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    own_dir = os.path.dirname(os.path.dirname(__file__))
    user = [f for f in frames if not f.filename.startswith((torch_dir, own_dir)) and "<eval_with_key>" not in f.filename]
    where = "unknown location"
    if user:
        f = user[-1]
        where = f"{f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"
    return f"graph capture failed at {where}: {type(e).__name__}: {e}"
