"""Exports whose height and width (every dimension after the channels) stay symbolic.

The export writes reshapes, pads and pools from the shapes recorded on the example inputs. Whether a graph
written that way holds for other sizes is checked, not assumed: the model is built twice, on the example inputs
and on the same inputs grown by :data:`GROWTH` along each dimension after the channels, and the two ONNX graphs
must be the same node for node and initializer for initializer. Only then are the dimensions that differ between
the two builds' inputs and outputs made symbolic. A graph that computes anything from its input size (a pool to a
fixed output size, a reshape of the spatial dimensions, an upsampling to a size read from a tensor's shape) differs
between the two builds and is refused by the name of the first node that differs.
"""
from __future__ import annotations

import contextlib
import io
from typing import Callable, Optional

import onnx
import torch
import torch.nn.functional as F

from ..batches import map_tensors
from ..errors import ExportError

GROWTH = 32  # pixels added to each dimension after the channels: a multiple of the common strides (8, 16, 32)


class SizeDependent(ExportError):
    """The exported graph holds values computed from the example's height and width."""


def grown(example_inputs, by: int = GROWTH):
    """``example_inputs`` with every floating-point tensor of 3 to 5 dimensions (signals, images, volumes) padded by
    ``by`` along each dimension after the channels, repeating its border (the values stay in the example's range).
    Other inputs (token ids, masks, vectors) are unchanged."""
    def grow(t):
        if torch.is_tensor(t) and t.is_floating_point() and 3 <= t.dim() <= 5:
            return F.pad(t, [0, by] * (t.dim() - 2), mode="replicate")
        return t
    return map_tensors(grow, example_inputs)


def first_difference(a: onnx.ModelProto, b: onnx.ModelProto) -> Optional[str]:
    """The name of the first node (or initializer) that differs between graphs ``a`` and ``b``, or None when they are
    the same graph (inputs' and outputs' declared shapes aside)."""
    for na, nb in zip(a.graph.node, b.graph.node):
        if na != nb:
            return na.name
    if len(a.graph.node) != len(b.graph.node):
        return (a.graph.node[len(b.graph.node):] or b.graph.node[len(a.graph.node):])[0].name
    inits_b = {t.name: t for t in b.graph.initializer}
    for t in a.graph.initializer:
        if inits_b.get(t.name) != t:
            return t.name
    if len(a.graph.initializer) != len(b.graph.initializer):
        return "an initializer"
    return None


def _symbolic(infos, others) -> None:
    """Mark the dimensions of value infos ``infos`` that differ from ``others`` (the same values built at the grown
    size) as symbolic, ``<value>_dim<i>``."""
    for vi, other in zip(infos, others):
        dims = vi.type.tensor_type.shape.dim
        for i, (d, e) in enumerate(zip(dims, other.type.tensor_type.shape.dim)):
            if d.HasField("dim_value") and d.dim_value != e.dim_value:
                d.ClearField("dim_value")
                d.dim_param = f"{vi.name}_dim{i}"


def has_symbolic_size(model: onnx.ModelProto) -> bool:
    """Whether an input of ``model`` has a symbolic dimension besides the batch (``N``)."""
    return any(d.dim_param not in ("", "N") for vi in model.graph.input for d in vi.type.tensor_type.shape.dim)


def with_dynamic_size(build: Callable[[object], onnx.ModelProto], example_inputs) -> onnx.ModelProto:
    """The model ``build(example_inputs)``, its input and output dimensions that follow the input size made symbolic;
    raises :class:`SizeDependent` when the graph itself depends on the size (see the module's docstring)."""
    a = build(example_inputs)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch's shape propagation prints the traceback it raises
            b = build(grown(example_inputs))
    except SizeDependent:  # an op torch.onnx cannot keep size-free (an adaptive pool to a fixed grid), by name
        raise
    except Exception as e:  # the model itself does not run at another size (a fixed position table, an assertion)
        raise SizeDependent(f"the model does not run on inputs {GROWTH} larger than the example along height and width "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): it takes one input "
                            "size; export with dynamic_size=False") from e
    where = first_difference(a, b)
    if where is not None:
        raise SizeDependent(f"the exported graph depends on the input's height and width at {where!r} (a shape, pool "
                            "or size computed from the example's size): export with dynamic_size=False, once per "
                            "input size (example_inputs= sets it)")
    _symbolic(a.graph.input, b.graph.input)
    _symbolic(a.graph.output, b.graph.output)
    if not has_symbolic_size(a):
        raise SizeDependent("no input of the model has a height or width to make symbolic (dynamic_size applies to "
                            "floating-point inputs of 3 to 5 dimensions)")
    return a


