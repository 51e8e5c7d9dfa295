"""How a quantized graph lowers onto integer kernels: which computation each activation quantizer ends.

An output quantizer of a captured sim closes one fused integer kernel: ``act(base(inputs))`` where
``base`` is a conv/linear, an add, a global average pool, a concat or a pass-through op, and ``act``
an optional ReLU/ReLU6/clamp applied on the accumulator. The integer engine and the sim's
integer-exact mode both read the graph through these helpers, so they agree on what is fused.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..core import float64, lut
from ..core.granularity import PerChannel, PerTensor
from ..nn.modules import own_forward
from ..nn.quantizer import Quantizer
from ..nn.rnn import QuantizedRecurrentMixin, grid_of
from . import ops, patterns

INTEGER_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def source_quantizer(n, modules, through=ops.keeps_grid):
    """The activation quantizer whose grid the value of node ``n`` is on, looking back through the ops
    ``through`` accepts (grid-keeping ops by default; ``ops.is_identity`` for the same shape), or None.
    A selection from a quantized recurrent layer's outputs is on that layer's hidden-state grid; a plain selection
    from a tensor (``x[:, 0]``, ``x[:, n:]``: PiT's class token and patch tokens) keeps its grid, and so does each part
    of a split the export runs on the integers (:func:`stored_integers`)."""
    while isinstance(n, fx.Node):
        m = patterns.module_of(n, modules)
        if isinstance(m, Quantizer):
            return m
        if n.target is operator.getitem:
            found = recurrent_source(n, modules)
            src = n.args[0]
            if found is None and isinstance(src, fx.Node) and src.target in ops.SPLITS and stored_integers(src, modules):
                n = src.args[0]  # a part of a split (MixNet's channel groups, each read by its own conv)
                continue
            if found is not None or not (len(n.args) == 2 and plain_index(n.args[1])
                                         and hasattr(patterns.recorded_meta(n.args[0]), "shape")):
                return found
            n = n.args[0]
            continue
        if not through(n, modules) or (m is not None and own_forward(m)):
            return None  # an own-forward pool (timm's MaxPool2dSame: a -inf Pad, then MaxPool) is exported in float
        n = n.args[0]
    return None


def stored_integers(n, modules) -> bool:
    """Whether the export computes node ``n`` on stored integers: ``n`` and every op back to a quantizer are identity
    ops or moves (:func:`moves_integers`). A max-pool keeps its input's grid but is exported on the dequantized values,
    unless a split reads it (SKNet's ``maxpool -> split -> conv``; ORT would run those convs in float)."""
    while isinstance(n, fx.Node):
        if isinstance(patterns.module_of(n, modules), Quantizer):
            return True
        if not (ops.is_identity(n, modules) or moves_integers(n, modules)):
            return False
        n = n.args[0]
    return False


def recurrent_source(n, modules) -> Optional[Quantizer]:
    """The hidden-state quantizer of a quantized LSTM / GRU / RNN that a chain of ``getitem`` nodes selects
    (see :func:`recurrent_source_name`), or None."""
    found = recurrent_source_name(n, modules)
    if found is None:
        return None
    layer, suffix = found
    m = modules[layer]
    return m._quantizer(suffix) if isinstance(m, QuantizedRecurrentMixin) else None


def recurrent_source_name(n, modules) -> Optional[tuple[str, str]]:
    """``(layer name, tensor suffix)`` of the hidden state of a recurrent layer (float or quantized) that a
    chain of ``getitem`` nodes selects (``out[:, -1]``, ``h_n[-1]``, ``state[0][-1]``), or None (a cell
    state, several layers' grids, or no recurrent layer at the root)."""
    idx = []
    while isinstance(n, fx.Node) and n.target is operator.getitem:
        idx.insert(0, n.args[1])
        n = n.args[0]
    m = patterns.module_of(n, modules)
    if not isinstance(m, nn.RNNBase) or not idx:
        return None
    last = (n.target, f"l{m.num_layers - 1}.h")
    if idx[0] == 0:  # the output sequence: the last layer's hidden states
        return last
    rest = idx[1:]
    if m.mode == "LSTM":  # (h_n, c_n): only h_n is on a hidden-state grid
        if not rest or rest[0] != 0:
            return None
        rest = rest[1:]
    if m.num_layers == 1:
        return last
    if rest and isinstance(rest[0], int):  # one (layer, direction) slice of h_n
        dirs = 2 if m.bidirectional else 1
        return n.target, f"l{(rest[0] % (m.num_layers * dirs)) // dirs}.h"
    return None


def _table_function(n: fx.Node, modules) -> Optional[Callable]:
    """The function of its first argument that elementwise op ``n`` computes (its other arguments are
    constants), or None."""
    if not ops.is_elementwise(n, modules) or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    rest, kw, found = n.args[1:], dict(n.kwargs), []
    fx.node.map_arg((rest, kw), found.append)
    if found:
        return None
    if n.op == "call_module":
        return modules[n.target]
    if n.op == "call_method":
        return lambda t: getattr(t, n.target)(*rest, **kw)
    return lambda t: n.target(t, *rest, **kw)


def table_lowering(q_node: fx.Node, modules) -> Optional[tuple[Callable, Quantizer]]:
    """``(fn, input quantizer)`` when quantizer node ``q_node`` reads an elementwise op (GELU, sigmoid,
    hard-swish, ...; :func:`~edgequant.graph.ops.is_elementwise`) directly, nothing else reads the op's float
    value, and the op's input sits on a per-tensor grid of at most 16 bits (through identity ops): the op
    is then a lookup table from the input's codes to ``q_node``'s (:mod:`edgequant.core.lut`). None otherwise."""
    q = patterns.module_of(q_node, modules)
    if not (isinstance(q, Quantizer) and isinstance(q.spec.granularity, PerTensor)):
        return None
    base = q_node.args[0]
    fn = _table_function(base, modules) if isinstance(base, fx.Node) and len(base.users) == 1 else None
    if fn is None:
        return None
    q_in = source_quantizer(base.args[0], modules, through=ops.is_identity)
    if not (isinstance(q_in, Quantizer) and isinstance(q_in.spec.granularity, PerTensor) and q_in.spec.bits <= 16):
        return None
    return fn, q_in


def lookup_table(q_node: fx.Node, modules, device=None) -> Optional[tuple[torch.Tensor, lut.Grid, Quantizer]]:
    """``(table, input grid, input quantizer)`` of the elementwise op quantizer node ``q_node`` closes
    (:func:`table_lowering`): the integer-exact sim, the integer engine and the export all index this table. None when
    there is no such op or the function is NaN on some input code."""
    found = table_lowering(q_node, modules)
    if found is None:
        return None
    fn, q_in = found
    q = patterns.module_of(q_node, modules)
    src = grid_of(q_in, q_in.tensor_name)
    try:
        return lut.table(fn, src, grid_of(q, q.tensor_name), device=device), src, q_in
    except ValueError:
        return None


def _int_like(v) -> bool:
    """An int, or an fx node that computes one from shapes (``x.shape[1]``: no tensor recorded for it)."""
    if isinstance(v, fx.Node):
        return not hasattr(patterns.recorded_meta(v), "shape")
    return isinstance(v, int) and not isinstance(v, bool)


def plain_index(idx) -> bool:
    """An index of ints and slices of ints (``x[-1]``, ``x[:, -1]``, ``x[1:3]``, ``x[:, n:]`` with ``n`` read from a
    shape, ``x[..., :h, :w]``): selection, no tensors."""
    parts = idx if isinstance(idx, tuple) else (idx,)
    parts = [i for i in parts if i is not Ellipsis] if list(parts).count(Ellipsis) == 1 else parts
    return bool(parts) and all(_int_like(i) or isinstance(i, slice)
                               and all(v is None or _int_like(v) for v in (i.start, i.stop, i.step))
                               and (i.step is None or isinstance(i.step, int) and i.step > 0) for i in parts)


#: ``F.pad`` modes -> ONNX ``Pad`` modes the export writes on stored integers (circular has no opset-17 form)
ONNX_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


def empty_pad(n: fx.Node) -> bool:
    """An ``F.pad`` that pads nothing on the recorded shapes: the "pad to a multiple of the window" of window attention
    (Swin, DaViT) when the feature map already is one, its amounts computed from sizes (``(7 - w % 7) % 7``). The export
    and the integer-exact mode pass the integers on unchanged."""
    if not (n.op == "call_function" and n.target is torch.nn.functional.pad and n.args and isinstance(n.args[0], fx.Node)):
        return False
    pad = n.kwargs.get("pad", n.args[1] if len(n.args) > 1 else ())
    if any(isinstance(p, int) and p < 0 for p in pad):  # a crop and a pad of one size shift the values
        return False
    before, after = patterns.recorded_meta(n.args[0]), patterns.recorded_meta(n)
    return hasattr(before, "shape") and hasattr(after, "shape") and tuple(before.shape) == tuple(after.shape)


def moves_integers(n: fx.Node, modules) -> bool:
    """Whether the export runs node ``n`` on stored integers: reshape-like ops, zero pads, rolls, splits and plain
    selections (``x[:, -1]``), which move values and never compute them (max-pools excepted: ORT fuses them otherwise;
    a max-pool a split reads is a move, :func:`_split_max_pool`)."""
    if n.target is operator.getitem:
        return len(n.args) == 2 and plain_index(n.args[1])
    if n.target in ops.SPLITS:  # parts along one dimension (TinyViT's qkv.split([d, d, e], dim=3)): ONNX Split
        found: list = []
        fx.node.map_arg((n.args[1:], n.kwargs), found.append)
        return n.op in ("call_function", "call_method") and not found and all(
            u.target is operator.getitem for u in n.users)  # parts taken one by one (not the list passed on whole)
    if n.target is torch.nn.functional.pad and ops.pad_mode(n) not in ONNX_PAD_MODES:
        return False
    if _split_max_pool(n, modules):
        return True
    return ops.node_op(n, modules) is ops.MOVE and not patterns.is_pool(n, modules)


MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
MAX_POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d)


def plain_max_pool(n: fx.Node, modules) -> bool:
    """A max-pool the export writes as ONNX ``MaxPool`` (no indices returned; not timm's ``MaxPool2dSame``, whose own
    forward pads with -inf first: ORT's QDQ propagation stops at that ``Pad``)."""
    m = patterns.module_of(n, modules)
    if isinstance(m, MAX_POOL_MODULES):
        return not m.return_indices and not own_forward(m)
    return n.op == "call_function" and n.target in MAX_POOL_FUNCTIONS and not n.kwargs.get("return_indices", False)


def _split_max_pool(n: fx.Node, modules) -> bool:
    """A max-pool module whose output a split reads (SKNet's ``maxpool -> split -> convs``): ONNX Runtime moves a
    DequantizeLinear past a float ``MaxPool`` but not past ``Split``, so the export pools the integers there."""
    m = patterns.module_of(n, modules)
    return (isinstance(m, MAX_POOL_MODULES) and plain_max_pool(n, modules) and m.dilation in (1, (1,), (1, 1), (1, 1, 1))
            and any(u.target in ops.SPLITS for u in n.users))


def linear_on_tokens(n: fx.Node, m) -> bool:
    """Whether node ``n`` calls linear layer ``m`` on an N-D input (tokens, windows): the export reshapes its integers
    to 2-D around a ``QGemm`` (8-bit output) or a ``MatMulInteger`` and a float rescale (wider output)."""
    meta = patterns.recorded_meta(n)
    return (isinstance(m, nn.Linear) and not own_forward(m) and n.op == "call_module" and hasattr(meta, "shape")
            and len(meta.shape) > 2)


def integer_matmul_fits(q_in: Optional[Quantizer], q_w: Optional[Quantizer]) -> bool:
    """Whether a linear layer can run as ``MatMulInteger``: 8-bit per-tensor input, 8-bit symmetric weights
    per tensor or per output channel."""
    return (isinstance(q_in, Quantizer) and isinstance(q_in.spec.granularity, PerTensor) and q_in.spec.bits <= 8
            and isinstance(q_w, Quantizer) and q_w.spec.bits <= 8 and q_w.spec.symmetric and q_w.spec.signed
            and isinstance(q_w.spec.granularity, (PerTensor, PerChannel)))


_FLOAT64_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.Softmax, nn.LogSoftmax, nn.Upsample)


def float64_op(n: fx.Node, modules) -> bool:
    """Whether node ``n`` is a normalization or softmax that ``float64=True`` (export and integer-exact mode) computes
    in float64 and rounds to float32 once (:mod:`edgequant.core.float64`): LayerNorm (also subclasses with their own
    forward, such as a channels-first LayerNorm2d, whose inner ``F.layer_norm`` is what changes), GroupNorm, softmax,
    log-softmax, L2 norms, einsum, bilinear / bicubic resizes."""
    m = patterns.module_of(n, modules)
    if m is not None:
        return isinstance(m, _FLOAT64_MODULES)
    return n.op in ("call_function", "call_method") and n.target in float64.FUNCTIONS


def act_bounds(act, modules, s_y: float, z_y: int, qmin: int, qmax: int, channels: int, ndim: int):
    """Integer bounds ``[lo, hi]`` (int64, shaped to broadcast over an (N, C, ...) tensor) of the output grid
    intersected with the fused activation ``act`` (None: the grid only). ``round`` is monotonic, so
    clamping then quantizing equals quantizing then clamping at the mapped bounds."""
    lo = torch.full((channels,), qmin, dtype=torch.int64)
    hi = torch.full((channels,), qmax, dtype=torch.int64)
    if act is not None:
        a, b = (torch.as_tensor(v, dtype=torch.float64).expand(channels) for v in patterns.activation_bounds(act, modules))
        big = 2 ** 40
        a_q = torch.round(a / s_y).clamp(-big, big).long() + z_y
        b_q = torch.where(torch.isinf(b), torch.full_like(a_q, big), torch.round(b / s_y).clamp(-big, big).long() + z_y)
        lo, hi = torch.maximum(lo, a_q), torch.minimum(hi, b_q)
    shape = [1, -1] + [1] * (ndim - 2) if ndim > 2 else [1, -1]
    return lo.view(shape), hi.view(shape)
