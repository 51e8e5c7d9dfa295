"""What edgequant knows about each module type and functional op.

Every captured node falls in one of these kinds:

* ``weighted``  -- a layer whose weight gets a param quantizer and whose output gets an output quantizer
* ``compute``   -- computes new values: gets an output quantizer
* ``pass``      -- moves or selects values (reshape, max-pool, dropout, ...): its output stays on
                   its input's grid, so it gets no quantizer
* ``unknown``   -- not supported: left in float, listed in a warning; its output is quantized where a
                   quantized op consumes it
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.clamp import ChannelClamp

#: weighted layer type -> axis of the output channels in its weight
WEIGHT_AXIS: dict[type, int] = {
    nn.Conv1d: 0, nn.Conv2d: 0, nn.Conv3d: 0,
    nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 1, nn.ConvTranspose3d: 1,
    nn.Linear: 0, nn.Embedding: 0, nn.EmbeddingBag: 0,
}
WEIGHTED_MODULES = tuple(WEIGHT_AXIS)

NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)
BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: activations a fused kernel applies on its accumulator (conv/linear/bn/add + act = one output)
FUSABLE_ACT_MODULES = (nn.ReLU, nn.ReLU6, ChannelClamp)
#: producers whose output is >= 0 (an unsigned grid fits)
NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Hardsigmoid)


def is_nonneg_module(m: nn.Module) -> bool:
    """Whether ``m``'s output is always >= 0 (an unsigned grid fits it)."""
    if isinstance(m, ChannelClamp):
        return m.nonneg
    return isinstance(m, NONNEG_MODULES)

COMPUTE_MODULES = NORM_MODULES + (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softmax, nn.LogSoftmax,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Upsample, nn.UpsamplingBilinear2d, ChannelClamp,
)
#: ops that return their input unchanged in eval mode
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
IDENTITY_FUNCTIONS = {F.dropout}
IDENTITY_METHODS = {"contiguous", "clone", "detach"}
#: ops whose output stays on its input's quantization grid (values moved, never recomputed)
KEEP_GRID_MODULES = IDENTITY_MODULES + (nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
KEEP_GRID_FUNCTIONS = IDENTITY_FUNCTIONS | {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
KEEP_GRID_METHODS = IDENTITY_METHODS | {"view", "reshape", "flatten", "squeeze", "unsqueeze"}


def _matches(node, modules, mods, functions, methods) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), mods)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def is_identity(node, modules) -> bool:
    """Whether fx ``node`` returns its input unchanged (``modules``: the graph's named modules)."""
    return _matches(node, modules, IDENTITY_MODULES, IDENTITY_FUNCTIONS, IDENTITY_METHODS)


def keeps_grid(node, modules) -> bool:
    """Whether fx ``node``'s output stays on its input's grid (identity, flatten, reshape, max-pool)."""
    return _matches(node, modules, KEEP_GRID_MODULES, KEEP_GRID_FUNCTIONS, KEEP_GRID_METHODS)
PASS_MODULES = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.UpsamplingNearest2d,
)
#: every module type the tracer keeps as one node (subclasses included)
LEAF_MODULES = WEIGHTED_MODULES + COMPUTE_MODULES + PASS_MODULES

COMPUTE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.bmm, torch.mm, torch.baddbmm, torch.addmm,
    torch.cat, torch.concat, torch.stack, torch.mean, torch.sum, torch.exp, torch.sqrt, torch.rsqrt,
    torch.relu, torch.sigmoid, torch.tanh, torch.softmax, torch.einsum,
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid,
    F.tanh, F.softmax, F.log_softmax, F.elu, F.layer_norm, F.group_norm, F.batch_norm, F.normalize,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.interpolate, F.scaled_dot_product_attention,
}
COMPUTE_METHODS = {"add", "sub", "mul", "div", "matmul", "bmm", "mean", "sum", "exp", "sqrt", "rsqrt",
                   "relu", "sigmoid", "tanh", "softmax", "neg", "pow", "add_", "mul_"}
PASS_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.chunk, torch.split, torch.narrow, torch.t, torch.select, torch.index_select,
    F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.pad,
    F.pixel_shuffle, F.pixel_unshuffle, torch.max_pool2d,
}
PASS_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                "expand", "expand_as", "chunk", "split", "t", "narrow", "repeat", "select", "clone", "detach",
                "view_as", "unflatten", "to", "cpu", "cuda", "type_as"}
FUSABLE_ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6}
FUSABLE_ACT_METHODS = {"relu"}
NONNEG_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.softmax, torch.softmax, F.hardsigmoid}
NONNEG_METHODS = {"relu", "sigmoid", "softmax"}
ADD_FUNCTIONS = {operator.add, torch.add}
ADD_METHODS = {"add"}


def function_name(target) -> str:
    """Short name of a functional op or method, used in tensor names and config type keys."""
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or str(target)
    return name.strip("_") or name
