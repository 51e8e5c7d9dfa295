"""Graph capture: ``torch.fx`` symbolic tracing, then ``torch.export`` raised to layer level, with a readable
error when both fail."""
from __future__ import annotations

import os
import traceback
from typing import Optional

import torch
from torch import fx, nn

from ..errors import GraphCaptureError
from ..core.attention import attention_softmax
from ..nn.attention import mha_mask
from ..nn.registry import lookup
from .exported import capture_exported
from .ops import add_mask, is_leaf_module, put_values


class _Tracer(fx.Tracer):
    """Keeps every known torch layer (and its subclasses, which keep their own forward) as one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_leaf_module(m):
            return True
        return super().is_leaf_module(m, qualname)


def capture(model: nn.Module, args: Optional[tuple] = None, kwargs: Optional[dict] = None) -> fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` sharing its submodules.

    ``torch.fx`` symbolic tracing first; when it fails and example inputs are given, ``torch.export``
    raised back to layer level (:mod:`edgequant.graph.exported`: Hugging Face transformers and other
    models whose Python inspects sizes or values). Raises :class:`GraphCaptureError` naming the user
    source line where tracing stopped, and why ``torch.export`` failed too.
    """
    # each stays one node when a captured graph is traced again
    tracer = _Tracer(autowrap_functions=(add_mask, attention_softmax, mha_mask, put_values))
    try:
        concrete = _defaults_left(model, args, kwargs)
        graph = tracer.trace(model, concrete_args=concrete)
        if concrete:
            _drop_specialized(graph, set(concrete))
    except Exception as e:  # noqa: BLE001 - any tracing failure becomes one clear error
        message = _describe_failure(e)
        if args is None and not kwargs:
            raise GraphCaptureError(message) from e
        try:
            return capture_exported(model, tuple(args or ()), dict(kwargs or {}))
        except Exception as e2:  # noqa: BLE001
            first = str(e2).strip().splitlines()[0] if str(e2).strip() else ""
            raise GraphCaptureError(f"{message}; torch.export failed too: {type(e2).__name__}: {first[:300]}") from e2
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.training = model.training  # the flag only: gm.train() would reset the modes of the shared submodules
    bypassed = bypassed_layers(gm, model)
    if args is not None and bypassed:
        try:  # torch.export reaches the layers inside the wrapped function
            exported = capture_exported(model, tuple(args), dict(kwargs or {}))
        except Exception:  # noqa: BLE001 -- keep the fx graph
            return gm
        if not bypassed_layers(exported, model):  # every layer reached (Swin v2's qkv takes a rebuilt bias: not)
            return exported
    return gm


def bypassed_layers(gm: fx.GraphModule, model: nn.Module) -> list[str]:
    """Layers (convs, linears, ... that edgequant quantizes) whose weights the graph reads outside the layer: a
    function that ``torch.fx.wrap`` keeps as one node takes them as arguments (torchvision's Swin passes its
    attention's ``qkv.weight`` and ``proj.weight`` to ``shifted_window_attention``), so the layer would never be
    quantized. :func:`capture` then prefers the graph ``torch.export`` records, where those are layer calls."""
    modules = dict(model.named_modules())  # the graph module holds bare containers on the path to such a weight
    found = []
    for n in gm.graph.nodes:
        owner, _, attr = str(n.target).rpartition(".") if n.op == "get_attr" else ("", "", "")
        m = modules.get(owner)
        if owner and m is not None and lookup(m) is not None and isinstance(getattr(m, attr, None), nn.Parameter):
            found.append(owner)
    return sorted(set(found))


def _defaults_left(model: nn.Module, args, kwargs) -> Optional[dict]:
    """The optional arguments of ``model.forward`` the example inputs leave at their default ``None`` / bool / int /
    str (``attn_mask=None``, ``return_dict=True``): traced as those constants, so the graph takes the branch the
    example takes instead of a placeholder that no example fills (None when no example inputs are given)."""
    import inspect

    if args is None and not kwargs:
        return None
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind_partial(*(args or ()), **(kwargs or {}))
    except (TypeError, ValueError):
        return None
    left = {}
    for name, p in sig.parameters.items():
        if name in bound.arguments or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        if p.default is None or isinstance(p.default, (bool, int, str)):
            left[name] = p.default
    return left or None


def _drop_specialized(graph: fx.Graph, names: set) -> None:
    """Remove the placeholders fx made for the constant arguments ``names`` and the checks it attached to them
    (``_assert_is_none``, ``x == False`` then ``torch._assert``): the graph takes only the example's inputs."""
    held = {n for n in graph.nodes if n.op == "placeholder" and (n.target in names or n.target.rsplit("_", 1)[0] in names)}
    for n in graph.nodes:
        if n.op == "call_function" and n.all_input_nodes and all(i in held for i in n.all_input_nodes):
            held.add(n)
    for n in reversed(list(graph.nodes)):  # users first: a node goes once nothing reads it
        if n in held and not n.users:
            graph.erase_node(n)


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
