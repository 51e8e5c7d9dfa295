"""Graph helpers shared by the PTQ passes: trace a float model, walk producer/consumer chains."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..graph.capture import capture
from ..graph.ops import IDENTITY_FUNCTIONS, IDENTITY_METHODS, IDENTITY_MODULES, is_identity  # noqa: F401


def trace(model: nn.Module) -> tuple[fx.GraphModule, dict[str, nn.Module]]:
    """The model's fx graph (sharing its modules) and ``{qualified name: module}``."""
    gm = capture(model)
    return gm, dict(gm.named_modules())


def module_of(node: fx.Node, modules: dict[str, nn.Module]):
    return modules.get(node.target) if node.op == "call_module" else None


def only_user(node: fx.Node):
    """The single node that consumes ``node`` as its first argument, or None."""
    if len(node.users) != 1:
        return None
    u = next(iter(node.users))
    return u if u.args and u.args[0] is node else None


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def call_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def channel_view(w: torch.Tensor, axis: int, groups: int = 1):
    """A function ``scale -> w * scale`` broadcasting ``scale`` (length = channels along ``axis``).

    For a transposed convolution with groups, output channel ``c`` lives at ``w[g*in_g:(g+1)*in_g, c % out_g]``
    with ``g = c // out_g``; the weight is viewed as ``(groups, in_g, out_g, ...)`` for that.
    """
    def shape_for(v):
        s = [1] * w.ndim
        s[axis] = -1
        return v.view(s)

    if axis == 1 and groups > 1:  # transposed conv: (Cin, Cout/g, k...)
        cin, out_g = w.shape[0], w.shape[1]

        def apply(v):
            wv = w.view(groups, cin // groups, out_g, *w.shape[2:])
            return (wv * v.view(groups, 1, out_g, *[1] * (w.ndim - 2))).view_as(w)
        return apply
    return lambda v: w * shape_for(v)


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add)) or \
        (node.op == "call_method" and node.target == "add")
