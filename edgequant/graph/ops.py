"""What edgequant knows about each module type and functional op: one :class:`Op` record each.

Every captured node falls in one of these kinds:

* ``weighted``  -- a registered layer (:mod:`edgequant.nn.registry`): its parameters get quantizers
                   and its output an output quantizer
* ``compute``   -- computes new values: gets an output quantizer
* ``pass``      -- moves or selects values (reshape, max-pool, dropout, ...): its output stays on
                   its input's grid, so it gets no quantizer
* ``unknown``   -- not supported: left in float, listed in a warning; its output is quantized where a
                   quantized op consumes it

and carries the properties the passes ask about: ``identity`` (returns its input unchanged in eval
mode), ``keeps_grid`` (values moved, never recomputed: the integers move too), ``fusable`` (an
activation an integer kernel applies on its accumulator: one quantizer after it), ``nonneg`` (output
>= 0: an unsigned grid fits), ``homogeneous`` (``f(x / s) = f(x) / s`` for ``s > 0``: CLE scales
through it), ``elementwise`` (a function of each value alone, the same for every element: between two
per-tensor grids it is a lookup table, :mod:`edgequant.core.lut`) and ``lowering`` (the integer kernel
it is part of: ``add``, ``global_pool``, ``cat``).

>>> import torch.nn.functional as F
>>> from torch import nn
>>> module_op(nn.ReLU6()).fusable, module_op(nn.MaxPool2d(2)).keeps_grid, FUNCTION_OPS[F.relu].nonneg
(True, True, True)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..core.attention import attention_softmax
from ..nn.attention import mha_mask
from ..nn.clamp import ChannelClamp
from ..nn.scale import ChannelScale
from ..nn.registry import lookup


@dataclass(frozen=True)
class Op:
    """What one op kind is; see the module docstring. ``nonneg`` may be a predicate on the module."""
    kind: str  # "weighted" | "compute" | "pass"
    identity: bool = False
    keeps_grid: bool = False
    fusable: bool = False
    nonneg: Union[bool, Callable[[nn.Module], bool]] = False
    homogeneous: bool = False
    elementwise: bool = False
    lowering: Optional[str] = None
    data_args: Optional[tuple] = None  # the positional arguments that carry data (None: all); others (a mask) stay float


WEIGHTED = Op("weighted")
COMPUTE = Op("compute")
PASS = Op("pass")
IDENTITY = Op("pass", identity=True, keeps_grid=True)
MOVE = Op("pass", keeps_grid=True)  # reshape-like and max-pool: integers move unchanged
#: ops that cut a tensor into parts along one dimension (each part a selection of its values, on its grid)
SPLITS = (torch.split, torch.chunk, "split", "chunk")
PARTS = SPLITS + (torch.unbind, "unbind")
RELU = Op("compute", fusable=True, nonneg=True, homogeneous=True)
NONNEG = Op("compute", nonneg=True)
ADD = Op("compute", lowering="add")
UNARY = Op("compute", elementwise=True)
UNARY_NONNEG = Op("compute", nonneg=True, elementwise=True)
LEAKY = Op("compute", homogeneous=True, elementwise=True)


def _hardtanh_nonneg(m: nn.Module) -> bool:
    return float(m.min_val) >= 0


def _table(pairs) -> dict:
    out = {}
    for keys, op in pairs:
        for k in keys:
            out[k] = op
    return out


BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORMS = BN_MODULES + (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                       nn.LocalResponseNorm)

#: module class -> Op (looked up along the class's MRO, so subclasses match); weighted layers come
#: from the registry of quantized modules
MODULE_OPS: dict[type, Op] = _table([
    (_NORMS + (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool3d), COMPUTE),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d), Op("compute", lowering="global_pool")),  # when the output size is 1
    ((nn.LeakyReLU,), LEAKY),
    ((nn.PReLU,), Op("compute", homogeneous=True)),
    ((nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Hardswish, nn.Softplus), UNARY),
    ((nn.LogSoftmax, nn.Upsample, nn.UpsamplingBilinear2d), COMPUTE),
    ((nn.ReLU,), RELU),
    ((nn.Hardtanh,), Op("compute", fusable=True, nonneg=_hardtanh_nonneg)),  # ReLU6 is a Hardtanh
    ((ChannelClamp,), Op("compute", fusable=True, nonneg=lambda m: m.nonneg)),
    ((ChannelScale,), Op("compute", homogeneous=True)),
    ((nn.Sigmoid, nn.Hardsigmoid), UNARY_NONNEG),
    ((nn.Softmax,), NONNEG),
    ((nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), IDENTITY),
    ((nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), MOVE),
    ((nn.Unflatten, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
      nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
      nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
      nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle), PASS),
])


def add_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x + mask`` where ``mask`` is computed from integer inputs only (a transformer's additive attention
    mask: 0 where attended, a huge negative number elsewhere). Its output keeps ``x``'s grid where it
    matters (the attended positions) and gets no quantizer: the masked values only feed a softmax."""
    return x + mask


def put_values(x: torch.Tensor, index, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with ``x[index] = values``: the functional form of an in-place write into a tensor (MViTv2's
    relative positions added into a view of the attention scores), which the export and the passes can follow."""
    out = x.clone()
    out[index] = values
    return out


FUNCTION_OPS: dict[Callable, Op] = _table([
    ((operator.sub, operator.mul, operator.truediv, operator.matmul, operator.neg, torch.sub, torch.mul, torch.div,
      torch.matmul, torch.bmm, torch.mm, torch.baddbmm, torch.addmm, torch.stack, torch.sum, torch.einsum,
      F.hardtanh, F.log_softmax, F.layer_norm, F.group_norm, F.batch_norm, F.normalize, F.avg_pool1d, F.avg_pool2d,
      F.avg_pool3d, F.adaptive_avg_pool3d, F.interpolate, F.scaled_dot_product_attention, torch.linalg.vector_norm,
      torch.clamp_min, torch.clamp), COMPUTE),
    ((torch.exp, torch.sqrt, torch.rsqrt, torch.tanh, F.gelu, F.silu, F.mish, F.hardswish, F.tanh, F.elu), UNARY),
    ((operator.add, torch.add), ADD),
    ((torch.cat, torch.concat), Op("compute", lowering="cat")),
    ((torch.mean, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d), Op("compute", lowering="global_pool")),
    ((torch.relu, F.relu), RELU),
    ((F.relu6,), Op("compute", fusable=True, nonneg=True)),
    ((F.leaky_relu,), LEAKY),
    ((torch.sigmoid, F.sigmoid, F.hardsigmoid), UNARY_NONNEG),
    ((torch.softmax, F.softmax), NONNEG),
    ((F.dropout,), IDENTITY),
    ((torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, torch.roll), MOVE),
    ((operator.getitem, torch.chunk, torch.split, torch.unbind, torch.narrow, torch.t, torch.select,
      torch.index_select, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
      F.pixel_shuffle, F.pixel_unshuffle, torch.max_pool2d), PASS),
    ((add_mask, mha_mask), PASS),
    ((put_values,), COMPUTE),
    ((attention_softmax,), Op("compute", nonneg=True, data_args=(0,))),  # the scores; never the mask
])

METHOD_OPS: dict[str, Op] = _table([
    (("sub", "mul", "div", "matmul", "bmm", "sum", "neg", "pow", "mul_", "add_"), COMPUTE),
    (("exp", "sqrt", "rsqrt", "tanh"), UNARY),
    (("add",), ADD),
    (("mean",), Op("compute", lowering="global_pool")),
    (("relu",), RELU),
    (("sigmoid",), UNARY_NONNEG),
    (("softmax",), NONNEG),
    (("contiguous", "clone", "detach"), IDENTITY),
    (("view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "roll"), MOVE),
    (("expand", "expand_as", "chunk", "split", "unbind", "t", "narrow", "repeat", "select",
      "view_as", "unflatten", "to", "float", "cpu", "cuda", "type_as"), PASS),
])


def module_op(m: nn.Module) -> Optional[Op]:
    """The record of a module (weighted if registered), or None when edgequant does not know it."""
    if lookup(m) is not None:
        return WEIGHTED
    for c in type(m).__mro__:
        if c in MODULE_OPS:
            return MODULE_OPS[c]
    return None


#: functions of other libraries, by qualified name (no import of those libraries here)
NAMED_FUNCTION_OPS: dict[str, Op] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": IDENTITY,  # identity in eval mode, like dropout
}


def _pad_op(node: fx.Node) -> Op:
    """``F.pad``: a move (on the input's grid) when it pads with zero, which every grid holds exactly, or repeats
    values (reflect, replicate, circular); with another constant (timm's LiteMLA pads with 1.0) it computes new values,
    which get a quantizer of their own."""
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return COMPUTE if pad_mode(node) == "constant" and value not in (None, 0, 0.0) else MOVE


def pad_mode(node: fx.Node) -> str:
    """The mode of an ``F.pad`` node."""
    return node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")


def _function_op(target) -> Optional[Op]:
    op = FUNCTION_OPS.get(target)
    if op is None and callable(target):
        op = NAMED_FUNCTION_OPS.get(f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}")
    return op


def node_op(node: fx.Node, modules: dict) -> Optional[Op]:
    """The record of an fx node (``modules``: the graph's named modules); None for unknown ops,
    placeholders, constants and the output."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return module_op(m) if m is not None else None
    if node.op == "call_function":
        return _pad_op(node) if node.target is F.pad else _function_op(node.target)
    if node.op == "call_method":
        return METHOD_OPS.get(node.target)
    return None


def kind(node: fx.Node, modules: dict) -> str:
    """``weighted``, ``compute``, ``pass`` or ``unknown`` for ops; the fx op (``placeholder``,
    ``get_attr``, ``output``) otherwise."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return node.op
    op = node_op(node, modules)
    return op.kind if op is not None else "unknown"


def _flag(node, modules, name: str) -> bool:
    op = node_op(node, modules)
    return op is not None and bool(getattr(op, name))


def is_identity(node: fx.Node, modules: dict) -> bool:
    """Whether fx ``node`` returns its input unchanged (``modules``: the graph's named modules)."""
    return _flag(node, modules, "identity")


def is_elementwise(node: fx.Node, modules: dict) -> bool:
    """Whether ``node`` applies one function to each value alone (GELU, sigmoid, hard-swish, exp, ...)."""
    return _flag(node, modules, "elementwise")


def keeps_grid(node: fx.Node, modules: dict) -> bool:
    """Whether fx ``node``'s output stays on its input's grid (identity, flatten, reshape, max-pool)."""
    return _flag(node, modules, "keeps_grid")


def is_fusable_act(node: fx.Node, modules: dict) -> bool:
    """Whether ``node`` is an activation a fused integer kernel applies on its accumulator (a clamp)."""
    return _flag(node, modules, "fusable")


def _nonneg(op: Optional[Op], module: Optional[nn.Module]) -> bool:
    if op is None:
        return False
    return op.nonneg(module) if callable(op.nonneg) else bool(op.nonneg)


def is_nonneg(node: fx.Node, modules: dict) -> bool:
    """Whether ``node``'s output is always >= 0 (an unsigned grid fits it)."""
    return _nonneg(node_op(node, modules), modules.get(node.target) if node.op == "call_module" else None)


def is_nonneg_module(m: nn.Module) -> bool:
    """Whether module ``m``'s output is always >= 0."""
    return _nonneg(module_op(m), m)


def is_leaf_module(m: nn.Module) -> bool:
    """Modules the tracer keeps as one node: every known module type and every registered layer."""
    return module_op(m) is not None


def is_pass_module(m: nn.Module) -> bool:
    op = module_op(m)
    return op is not None and op.kind == "pass"


def function_name(target) -> str:
    """Short name of a functional op or method, used in tensor names and config type keys."""
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or str(target)
    return name.strip("_") or name
