"""Build the quantized model: where quantizers go and how they are attached.

Graph mode (the normal path): the model is captured with ``torch.fx``; example inputs are propagated
to learn which values are float tensors; then

1. every weighted layer (Conv/ConvTranspose/Linear/Embedding) gets a param quantizer for its weight;
2. every op that computes new values gets one output quantizer, except inside a *supergroup*
   (conv/linear -> [bn] -> ReLU/ReLU6, bn -> act, add -> act), whose single quantizer sits after
   the activation, as a fused integer kernel computes it;
3. pass-through ops (reshape, max-pool, dropout, ...) get none: their output stays on the input's grid;
4. a float value that reaches a quantized op without being on a grid (a model input, the output of an
   unsupported op) gets a quantizer right after its producer.

Leaf mode (when capture fails): weighted layers get param quantizers, every known leaf layer gets an
output quantizer through a forward hook, and the model's float inputs get quantizers. Functional ops
(add, cat, ...) stay in float and nothing is fused.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..config.spec import QuantConfig, QuantSpec
from ..core.granularity import resolve_axis
from ..graph import ops
from ..graph.capture import capture
from ..nn.modules import QuantizedModuleMixin, quantize_module
from ..nn.quantizer import Quantizer


@dataclass
class Prepared:
    model: nn.Module
    activation_quantizers: nn.ModuleDict
    unsupported: list[str]  # "name (Type)" of ops left in float
    mode: str  # "graph" or "leaf"


def type_names(obj) -> tuple[str, ...]:
    """Class names of a module, most specific first; the op name for functional ops."""
    if isinstance(obj, nn.Module):
        return tuple(c.__name__ for c in type(obj).__mro__
                     if issubclass(c, nn.Module) and c is not nn.Module and not issubclass(c, QuantizedModuleMixin))
    return (ops.function_name(obj),)


def _resolve_activation_spec(spec: QuantSpec, nonneg: bool, shape) -> QuantSpec:
    if spec.signed is None:
        spec = replace(spec, signed=not nonneg)
    ndim = len(shape)
    return replace(spec, granularity=resolve_axis(spec.granularity, 1 if ndim >= 2 else 0))


def _weight_spec(config: QuantConfig, name: str, module: nn.Module) -> Optional[QuantSpec]:
    spec = config.spec_for("weight", name, type_names(module))
    if spec is None:
        return None
    axis = next(a for t, a in ops.WEIGHT_AXIS.items() if isinstance(module, t))
    signed = True if spec.signed is None else spec.signed
    return replace(spec, signed=signed, granularity=resolve_axis(spec.granularity, axis))


def _attach_weight_quantizers(named: dict[str, nn.Module], config: QuantConfig) -> None:
    for name, m in named.items():
        spec = _weight_spec(config, name, m)
        if spec is None or getattr(m, "weight", None) is None:
            continue
        q = Quantizer(spec, m.weight.shape, f"{name}.weight", role="weight", owner_type=type_names(m)[0])
        quantize_module(m, {"weight": q})


class _KeyMaker:
    """ModuleDict keys (no dots) for tensor names, kept unique."""

    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, tensor_name: str) -> str:
        base = re.sub(r"[^0-9A-Za-z_]", "_", tensor_name) or "t"
        if base[0].isdigit():
            base = "t_" + base
        key, k = base, 1
        while key in self.used:
            key, k = f"{base}_{k}", k + 1
        self.used.add(key)
        return key


def _is_float(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point


def _has_float(meta) -> bool:
    """A float tensor, or a tuple/list/dict holding one (e.g. an LSTM's ``(output, (h, c))``)."""
    if isinstance(meta, TensorMetadata):
        return meta.dtype.is_floating_point
    if isinstance(meta, (tuple, list)):
        return any(_has_float(m) for m in meta)
    if isinstance(meta, dict):
        return any(_has_float(m) for m in meta.values())
    return False


def prepare_graph(model: nn.Module, args: tuple, kwargs: dict, config: QuantConfig) -> Prepared:
    gm = capture(model)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pos = list(args)
    values = []
    for p in placeholders:
        if p.target in kwargs:
            values.append(kwargs[p.target])
        elif pos:
            values.append(pos.pop(0))
        elif p.args:  # default value
            values.append(p.args[0])
        else:
            raise ValueError(f"example_inputs give no value for the model input {p.target!r}")
    ShapeProp(gm).propagate(*values)

    modules = dict(gm.named_modules())

    def kind(n: fx.Node) -> str:
        if n.op == "call_module":
            m = modules[n.target]
            if isinstance(m, ops.WEIGHTED_MODULES):
                return "weighted"
            if isinstance(m, ops.COMPUTE_MODULES):
                return "compute"
            if isinstance(m, ops.PASS_MODULES):
                return "pass"
            return "unknown"
        if n.op == "call_function":
            if n.target in ops.COMPUTE_FUNCTIONS:
                return "compute"
            return "pass" if n.target in ops.PASS_FUNCTIONS else "unknown"
        if n.op == "call_method":
            if n.target in ops.COMPUTE_METHODS:
                return "compute"
            return "pass" if n.target in ops.PASS_METHODS else "unknown"
        return n.op  # placeholder, get_attr, output

    def is_act(n):
        if n.op == "call_module":
            return isinstance(modules[n.target], ops.FUSABLE_ACT_MODULES)
        if n.op == "call_function":
            return n.target in ops.FUSABLE_ACT_FUNCTIONS
        return n.op == "call_method" and n.target in ops.FUSABLE_ACT_METHODS

    def is_bn(n):
        return n.op == "call_module" and isinstance(modules[n.target], ops.BN_MODULES)

    def is_linear_like(n):
        return n.op == "call_module" and isinstance(modules[n.target], ops.WEIGHTED_MODULES) \
            and not isinstance(modules[n.target], (nn.Embedding, nn.EmbeddingBag))

    def is_add(n):
        return (n.op == "call_function" and n.target in ops.ADD_FUNCTIONS) or (n.op == "call_method" and n.target in ops.ADD_METHODS)

    def nonneg(n):
        if n.op == "call_module":
            return ops.is_nonneg_module(modules[n.target])
        if n.op == "call_function":
            return n.target in ops.NONNEG_FUNCTIONS
        return n.op == "call_method" and n.target in ops.NONNEG_METHODS

    def sole_user(n):
        """The single consumer of ``n`` (as first argument), looking through identity modules such as
        the ``nn.Identity`` a folded BatchNorm leaves behind."""
        while True:
            if len(n.users) != 1:
                return None
            u = next(iter(n.users))
            if not u.args or u.args[0] is not n:
                return None
            if u.op == "call_module" and isinstance(modules[u.target], ops.IDENTITY_MODULES):
                n = u
                continue
            return u

    def absorbed(n):
        if not config.supergroups:
            return False
        u = sole_user(n)
        if u is None:
            return False
        return (is_linear_like(n) and (is_bn(u) or is_act(u))) or ((is_bn(n) or is_add(n)) and is_act(u))

    # ---- tensor names ----
    names: dict[fx.Node, str] = {}
    used: set[str] = set()
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            base = str(n.target)
        elif n.op == "call_module":
            k = calls.get(n.target, 0)
            calls[n.target] = k + 1
            base = n.target if k == 0 else f"{n.target}:{k}"
        elif n.op in ("call_function", "call_method"):
            stack = n.meta.get("nn_module_stack") or {}
            scope = next(reversed(stack)) if stack else ""
            scope = stack[scope][0] if stack else ""
            base = f"{scope}.{ops.function_name(n.target)}" if scope else ops.function_name(n.target)
        else:
            continue
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names[n] = name

    def type_of(n):
        return type_names(modules[n.target]) if n.op == "call_module" else type_names(n.target)

    # ---- plan ----
    plan: dict[fx.Node, QuantSpec] = {}  # node -> spec of the quantizer inserted after it
    on_grid: dict[fx.Node, bool] = {}
    unsupported: list[str] = []
    for n in gm.graph.nodes:
        k = kind(n)
        if k == "unknown" and _has_float(n.meta.get("tensor_meta")):
            t = modules[n.target] if n.op == "call_module" else n.target
            unsupported.append(f"{names[n]} ({type_names(t)[0]})")
        if not _is_float(n):  # ints, shapes, or containers: only an unknown op's floats are off-grid
            ins = [a for a in n.all_input_nodes if _has_float(a.meta.get("tensor_meta"))]
            on_grid[n] = k != "unknown" and not (k == "pass" and ins and not on_grid.get(ins[0], True))
            continue
        if k in ("weighted", "compute"):
            for a in n.all_input_nodes:
                if _is_float(a) and not on_grid.get(a, True):
                    if a.op == "placeholder":
                        spec = config.activation if config.quantize_inputs else None
                    else:
                        spec = config.spec_for("output", names.get(a, a.name), type_of(a))
                    if spec is not None:
                        plan[a] = _resolve_activation_spec(spec, nonneg(a), a.meta["tensor_meta"].shape)
                    on_grid[a] = True
            spec = config.spec_for("output", names[n], type_of(n))
            if spec is not None and not absorbed(n):
                plan[n] = _resolve_activation_spec(spec, nonneg(n), n.meta["tensor_meta"].shape)
            on_grid[n] = True
        elif k == "pass":
            ins = [a for a in n.all_input_nodes if _has_float(a.meta.get("tensor_meta"))]
            on_grid[n] = on_grid.get(ins[0], True) if ins else True
        elif k in ("unknown", "placeholder"):
            on_grid[n] = False
        else:  # get_attr: parameters/constants used by functional ops stay as they are
            on_grid[n] = True

    # ---- rewrite ----
    weighted = {n.target: modules[n.target] for n in gm.graph.nodes if kind(n) == "weighted"}
    _attach_weight_quantizers(weighted, config)
    aq = nn.ModuleDict()
    gm.add_submodule("activation_quantizers", aq)
    keys = _KeyMaker()
    for n, spec in plan.items():
        key = keys(names[n])
        aq[key] = Quantizer(spec, n.meta["tensor_meta"].shape, names[n], role="activation", owner_type=type_of(n)[0]
                            if n.op != "placeholder" else "input")
        with gm.graph.inserting_after(n):
            qn = gm.graph.call_module(f"activation_quantizers.{key}", (n,))
        n.replace_all_uses_with(qn, delete_user_cb=lambda u, qn=qn: u is not qn)
    _link_bias_inputs(gm, aq)
    gm.graph.lint()
    gm.recompile()
    return Prepared(gm, aq, unsupported, "graph")


def _link_bias_inputs(gm: fx.GraphModule, aq: nn.ModuleDict) -> None:
    """Point every quantized conv/linear at the activation quantizer that feeds it (through ops that
    keep values on their grid), so its bias can be quantized on the accumulator grid."""
    modules = dict(gm.named_modules())
    for n in gm.graph.nodes:
        m = modules.get(n.target) if n.op == "call_module" else None
        if not isinstance(m, QuantizedModuleMixin) or isinstance(m, (nn.Embedding, nn.EmbeddingBag)) or not n.args:
            continue
        src = n.args[0]
        while isinstance(src, fx.Node):
            sm = modules.get(src.target) if src.op == "call_module" else None
            if isinstance(sm, Quantizer):
                m._bias_input = (aq, src.target.split(".", 1)[1])
                break
            if ops.keeps_grid(src, modules):
                src = src.args[0] if src.args else None
                continue
            break


def prepare_leaf(model: nn.Module, args: tuple, kwargs: dict, config: QuantConfig) -> Prepared:
    """Quantize leaf modules only (used when graph capture fails)."""
    leaves = {}
    unsupported = []
    for name, m in model.named_modules():
        if isinstance(m, ops.LEAF_MODULES):
            if not any(name.startswith(p + ".") for p in leaves):
                leaves[name] = m
        elif name and not list(m.children()) and (list(m.parameters(recurse=False)) or m.__module__.startswith("torch.nn")):
            unsupported.append(f"{name} ({type(m).__name__})")
    # record output shapes and the model inputs' shapes with one probe run
    shapes: dict[str, torch.Size] = {}

    def record(name):
        def hook(mod, inputs, output):
            if torch.is_tensor(output):
                shapes.setdefault(name, output.shape)
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in leaves.items()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()

    _attach_weight_quantizers({n: m for n, m in leaves.items() if isinstance(m, ops.WEIGHTED_MODULES)}, config)
    aq = nn.ModuleDict()
    keys = _KeyMaker()
    for name, m in leaves.items():
        if isinstance(m, ops.PASS_MODULES) or name not in shapes:
            continue
        spec = config.spec_for("output", name, type_names(m))
        if spec is None:
            continue
        key = keys(name)
        aq[key] = Quantizer(_resolve_activation_spec(spec, ops.is_nonneg_module(m), shapes[name]),
                            shapes[name], name, role="activation", owner_type=type_names(m)[0])
        m.register_forward_hook(lambda mod, i, o, key=key: aq[key](o) if torch.is_tensor(o) and o.is_floating_point() else o)

    if config.quantize_inputs and config.activation is not None:
        params = list(inspect.signature(model.forward).parameters)
        input_keys: dict[int, str] = {}
        for i, a in enumerate(args):
            if torch.is_tensor(a) and a.is_floating_point():
                name = params[i] if i < len(params) else f"input_{i}"
                key = keys(name)
                aq[key] = Quantizer(_resolve_activation_spec(config.activation, False, a.shape), a.shape, name, owner_type="input")
                input_keys[i] = key

        def quantize_inputs(mod, a):
            return tuple(aq[input_keys[i]](x) if i in input_keys else x for i, x in enumerate(a))

        model.register_forward_pre_hook(quantize_inputs)
    return Prepared(model, aq, unsupported, "leaf")
