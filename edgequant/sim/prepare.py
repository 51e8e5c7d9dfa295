"""Build the quantized model in three steps: name the tensors, plan them, insert quantizers.

Graph mode (the normal path): the model is captured with ``torch.fx`` and example inputs are
propagated to learn which values are float tensors. Then

1. **naming** (:func:`name_nodes`): every value gets a tensor name (the module's name, ``name:1`` for a
   second call, ``<scope>.<op>`` for functional ops, the argument name for model inputs);
2. **planning** (:func:`plan_graph`): the :class:`~edgequant.config.QuantConfig` is resolved once into a
   :class:`~edgequant.config.QuantPlan`:

   * every registered layer (:mod:`edgequant.nn.registry`) gets a spec for each of its parameters;
   * every op that computes new values gets one output quantizer, except inside a *supergroup*
     (conv/linear -> [bn] -> ReLU-like, bn -> act, add -> act: :func:`~edgequant.graph.patterns.in_supergroup`),
     whose single quantizer sits after the activation, as a fused integer kernel computes it;
   * pass-through ops (reshape, max-pool, dropout, ...) get none: their output stays on the input's grid;
   * a value read only as a divisor (or by ``rsqrt``/``log``) gets none: a grid would round ``y + eps`` to 0
     (:func:`~edgequant.graph.patterns.feeds_pole`);
   * a float value that reaches a quantized op off-grid (a model input, the output of an unsupported
     op) gets a quantizer right after its producer;
   * the outputs of the model take ``config.output_range_method``, its float inputs ``config.input_range_method``;

3. **inserting** (:func:`insert_quantizers`): quantizers are built from the plan
   (:func:`~edgequant.nn.make_quantizer`) and put into the graph.

Leaf mode (when capture fails): registered layers get param quantizers, every known leaf layer gets an
output quantizer through a forward hook, and the model's float inputs get quantizers. Functional ops
(add, cat, ...) stay in float and nothing is fused.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import operator
import re
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..config.plan import PlanEntry, QuantPlan
from ..config.spec import QuantConfig
from ..errors import PlanError
from ..graph import lowering, ops, patterns
from ..graph.attention import decompose_sdpa, fuse_attention_softmax, prune_dead, select_unbound
from ..graph.capture import capture
from ..graph.noops import drop_noops, functional_copies
from ..nn.modules import QuantizedModuleMixin
from ..nn.quantizer import make_quantizer
from ..nn.registry import lookup
from ..nn.rnn import tensor_key


@dataclass
class Prepared:
    model: nn.Module
    activation_quantizers: nn.ModuleDict
    plan: QuantPlan
    unsupported: list[str]  # "name (Type)" of ops left in float
    mode: str  # "graph" or "leaf"
    unmatched: list[str] = field(default_factory=list)  # config overrides that match nothing, with suggestions


def unmatched_overrides(config: QuantConfig, names: set[str], types: set[str]) -> list[str]:
    """The ``module_names`` patterns and ``module_types`` keys of ``config`` that match no tensor or layer
    of the model (a typo silently ignored is worse than an error), each with the closest real names."""
    out = []
    for pattern in config.module_names:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, sorted(names), n=3, cutoff=0.5)
            out.append(f"module_names[{pattern!r}] matches no layer or tensor" + (f" (did you mean {close}?)" if close else ""))
    for t in config.module_types:
        if t not in types:
            close = difflib.get_close_matches(t, sorted(types), n=3, cutoff=0.5)
            out.append(f"module_types[{t!r}] matches no layer type or op" + (f" (did you mean {close}?)" if close else ""))
    return out


def type_names(obj) -> tuple[str, ...]:
    """Class names of a module, most specific first; the op name for functional ops."""
    if isinstance(obj, nn.Module):
        return tuple(c.__name__ for c in type(obj).__mro__
                     if issubclass(c, nn.Module) and c is not nn.Module and not issubclass(c, QuantizedModuleMixin))
    return (ops.function_name(obj),)


class _KeyMaker:
    """ModuleDict keys (no dots) for tensor names, kept unique and clear of the ModuleDict's own attributes (a
    top-level ``x.float()`` is the tensor ``float``)."""

    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, tensor_name: str) -> str:
        base = re.sub(r"[^0-9A-Za-z_]", "_", tensor_name) or "t"
        if base[0].isdigit():
            base = "t_" + base
        key, k = base, 1
        while key in self.used or hasattr(nn.ModuleDict, key):
            key, k = f"{base}_{k}", k + 1
        self.used.add(key)
        return key


def _attr_of(gm: fx.GraphModule, target: str):
    try:
        return operator.attrgetter(target)(gm)
    except AttributeError:
        return None


def _is_float(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point


def _holds_tensor(meta) -> bool:
    """A tensor, or a tuple/list/dict holding one (not a shape, a size or another Python value)."""
    if isinstance(meta, TensorMetadata):
        return True
    if isinstance(meta, (tuple, list)):
        return any(_holds_tensor(m) for m in meta)
    return isinstance(meta, dict) and any(_holds_tensor(m) for m in meta.values())


def _has_float(meta) -> bool:
    """A float tensor, or a tuple/list/dict holding one (e.g. an LSTM's ``(output, (h, c))``)."""
    if isinstance(meta, TensorMetadata):
        return meta.dtype.is_floating_point
    if isinstance(meta, (tuple, list)):
        return any(_has_float(m) for m in meta)
    if isinstance(meta, dict):
        return any(_has_float(m) for m in meta.values())
    return False


def propagate_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Run the example inputs through ``gm``, recording every node's ``tensor_meta``. A graph captured through
    ``torch.export`` takes its inputs flattened (a list of feature maps is one placeholder per map)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(gm.graph._codegen, fx.graph._PyTreeCodeGen):
        flat = torch.utils._pytree.tree_leaves((tuple(args), dict(kwargs)))
        if len(flat) == len(placeholders):
            ShapeProp(gm).propagate(*flat)
            return
    pos = list(args)
    values = []
    for p in (n for n in gm.graph.nodes if n.op == "placeholder"):
        if p.target in kwargs:
            values.append(kwargs[p.target])
        elif pos:
            values.append(pos.pop(0))
        elif p.args:  # default value
            values.append(p.args[0])
        else:
            raise ValueError(f"example_inputs give no value for the model input {p.target!r}")
    ShapeProp(gm).propagate(*values)


# ---------------------------------------------------------------------- 1. naming
def name_nodes(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Tensor names of the graph's values (see the module docstring)."""
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
            scope = stack[next(reversed(stack))][0] if stack else ""
            base = f"{scope}.{ops.function_name(n.target)}" if scope else ops.function_name(n.target)
        else:
            continue
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names[n] = name
    return names


# ---------------------------------------------------------------------- 2. planning
def weight_entries(layers: dict[str, nn.Module], config: QuantConfig) -> dict[str, PlanEntry]:
    """Plan entries of the registered layers (``{layer name: module}``): their parameters, and the tensors a
    layer quantizes inside its forward (a recurrent cell's gates and states, role ``activation``)."""
    out = {}
    for name, m in layers.items():
        reg = lookup(m)
        if reg is None:
            continue
        types = type_names(m)
        for pname, axis in reg.params_of(m).items():
            p = getattr(m, pname, None)
            if p is None:
                continue
            e = PlanEntry("weight", None, types[0], tuple(p.shape), channel_axis=axis)
            out[f"{name}.{pname}"] = replace(e, spec=e.resolve(config.spec_for("weight", name, types)))
        for suffix, site in reg.tensors_of(m).items():
            tname = f"{name}.{suffix}"
            spec = config.spec_for("activation", tname, types)
            if spec is not None and not config.names_activation(tname):
                if site.bits is not None:
                    spec = replace(spec, bits=site.bits, range_method="minmax")
                elif site.fixed_range is not None:
                    spec = replace(spec, range_method="minmax")
            e = PlanEntry("activation", None, types[0], tuple(site.shape), channel_axis=1, nonneg=site.nonneg)
            out[tname] = replace(e, spec=e.resolve(spec))
    return out


class _GraphPlanner:
    """Walks the captured graph once and records a plan entry for every value that may get a quantizer."""

    def __init__(self, gm: fx.GraphModule, names: dict[fx.Node, str], config: QuantConfig):
        self.gm, self.names, self.config = gm, names, config
        self.modules = dict(gm.named_modules())
        self.entries: dict[str, PlanEntry] = {}
        self.anchors: dict[str, fx.Node] = {}  # tensor name -> the node its quantizer follows
        self.on_grid: dict[fx.Node, bool] = {}
        self.data: dict[fx.Node, bool] = {}
        self.unsupported: list[str] = []
        out = next((n for n in gm.graph.nodes if n.op == "output"), None)
        self.model_outputs = set(_nodes_in(out.args)) if out is not None else set()

    def type_of(self, n: fx.Node) -> tuple[str, ...]:
        return type_names(self.modules[n.target]) if n.op == "call_module" else type_names(n.target)

    def add(self, n: fx.Node) -> None:
        """A quantizer after node ``n`` (its spec from the config; None leaves it in float)."""
        name = self.names.get(n, n.name)
        if n.op == "placeholder":
            role, spec, owner, nonneg = "input", self.config.input_spec(name), "input", False
        else:
            role = "output" if n in self.model_outputs else "activation"
            spec, owner, nonneg = self.config.spec_for("activation", name, self.type_of(n)), self.type_of(n)[0], ops.is_nonneg(n, self.modules)
            method = self.config.output_range_method
            if role == "output" and spec is not None and method is not None and not self.config.names_activation(name):
                spec = replace(spec, range_method=method)
        shape = tuple(n.meta["tensor_meta"].shape)
        e = PlanEntry(role, None, owner, shape, channel_axis=1 if len(shape) >= 2 else 0, nonneg=nonneg)
        self.entries[name] = replace(e, spec=e.resolve(spec))
        self.anchors[name] = n

    def visit(self, n: fx.Node) -> None:
        k = ops.kind(n, self.modules)
        floats_in = [a for a in n.all_input_nodes if _has_float(a.meta.get("tensor_meta"))]
        # data: derived from float inputs or weights (not a mask or positions built from integer inputs or from sizes
        # read off the data's shape, nor a constant folded by the torch.export capture)
        self.data[n] = (n.op == "call_module" or (n.op == "placeholder" and _has_float(n.meta.get("tensor_meta")))
                        or (n.op == "get_attr" and isinstance(_attr_of(self.gm, n.target), nn.Parameter))
                        or any(self.data.get(a, False) and _holds_tensor(a.meta.get("tensor_meta"))
                               for a in n.all_input_nodes))
        if k == "unknown" and _has_float(n.meta.get("tensor_meta")) and self.data[n]:
            t = self.modules[n.target] if n.op == "call_module" else n.target
            self.unsupported.append(f"{self.names[n]} ({type_names(t)[0]})")
        if not _is_float(n):  # ints, shapes, or containers: only an unknown op's floats are off-grid
            self.on_grid[n] = k != "unknown" and not (k == "pass" and floats_in and not self.on_grid.get(floats_in[0], True))
            x = n.args[0] if n.args else None
            if k == "weighted" and isinstance(x, fx.Node) and _is_float(x) and not self.on_grid.get(x, True):
                self.add(x)  # a recurrent layer (its outputs are a tuple, on its own grids): its input goes on a grid
                self.on_grid[x] = True
        elif k == "compute" and not self.data[n]:
            # computed from integer inputs and constants only (T5's and MPNet's relative-position buckets take the log
            # of distances, -inf at 0, before a cast to integers): not data, no grid; a product that reads it as data
            # puts it on a grid at its input
            self.on_grid[n] = False
        elif k in ("weighted", "compute"):
            for a in _data_inputs(n, self.modules):
                if _is_float(a) and not self.on_grid.get(a, True):
                    if not patterns.feeds_pole(a):  # a divisor stays float (see below)
                        self.add(a)
                    self.on_grid[a] = True
            if not (self.config.supergroups and patterns.in_supergroup(n, self.modules)) and not (
                    k == "compute" and n not in self.model_outputs and patterns.feeds_pole(n)):
                self.add(n)  # a divisor stays float: Div has no integer kernel, and a grid would round y + eps to 0
            self.on_grid[n] = True
        elif k == "pass":
            self.on_grid[n] = self.on_grid.get(floats_in[0], True) if floats_in else True
        else:  # unknown ops and model inputs are off-grid; get_attr constants stay as they are
            self.on_grid[n] = k not in ("unknown", "placeholder")

    def bias_links(self) -> dict[str, str]:
        """``{layer: input tensor}`` for the quantized conv/linear layers whose input comes from a planned
        quantizer (through grid-keeping ops): their bias, present or added later (bias correction), is
        quantized on the int32 grid ``s_in * s_w``."""
        quantized_after = {node: name for name, node in self.anchors.items() if self.entries[name].spec is not None}
        out = {}
        for n in self.gm.graph.nodes:
            m = patterns.module_of(n, self.modules)
            reg = lookup(m) if m is not None else None
            if reg is not None and reg.tensors is not None and n.args:  # a recurrent layer: the grid of its input
                src = n.args[0]
                while isinstance(src, fx.Node) and src not in quantized_after and ops.keeps_grid(src, self.modules):
                    src = src.args[0] if src.args else None
                if src in quantized_after:
                    out[n.target] = quantized_after[src]
                continue
            w_entry = self.entries.get(f"{n.target}.weight") if m is not None else None
            if w_entry is None or w_entry.spec is None or not patterns.is_linear_like(n, self.modules) or not n.args:
                continue
            src = n.args[0]
            while isinstance(src, fx.Node) and src not in quantized_after and ops.keeps_grid(src, self.modules):
                src = src.args[0] if src.args else None
            if src in quantized_after:
                out[n.target] = quantized_after[src]
            elif isinstance(src, fx.Node) and (found := lowering.recurrent_source_name(src, self.modules)) is not None:
                out[n.target] = ".".join(found)  # a recurrent layer's hidden state (its own quantizer, not a graph one)
        return out

    def bias_entries(self, links: dict[str, str]) -> dict[str, PlanEntry]:
        """Plan entries of the biases that exist now (role ``bias``, ``source = (input, weight)``)."""
        return {f"{layer}.bias": PlanEntry("bias", None, self.entries[f"{layer}.weight"].owner_type,
                                           tuple(self.modules[layer].bias.shape), source=(src, f"{layer}.weight"))
                for layer, src in links.items() if isinstance(getattr(self.modules[layer], "bias", None), torch.Tensor)}


def _data_inputs(n: fx.Node, modules: dict) -> list[fx.Node]:
    """The inputs of ``n`` that carry data (an attention mask beside the scores does not: it stays float)."""
    op = ops.node_op(n, modules)
    if op is None or op.data_args is None:
        return n.all_input_nodes
    return [n.args[i] for i in op.data_args if i < len(n.args) and isinstance(n.args[i], fx.Node)]


def _nodes_in(args):
    stack, found = [args], []
    while stack:
        a = stack.pop()
        if isinstance(a, (tuple, list)):
            stack.extend(a)
        elif isinstance(a, dict):
            stack.extend(a.values())
        elif isinstance(a, fx.Node):
            found.append(a)
    return found


def widen_add_inputs(entries: dict[str, PlanEntry], anchors: dict[str, fx.Node], modules: dict, config: QuantConfig) -> None:
    """An add sums its inputs on its output grid: when that grid has more bits than an input's (a 16-bit
    residual stream fed by an 8-bit layer output), the input, used by nothing else and not named by a
    ``module_names`` override, takes the add's spec. Rounding the input to 8 bits first would throw away
    what the finer sum keeps (on all-MiniLM-L6-v2 with 16-bit residual sums: embedding cosine 0.944 with
    8-bit layer outputs, 0.994 with this)."""
    name_of = {n: name for name, n in anchors.items()}
    for name, n in anchors.items():
        spec = entries[name].spec
        op = ops.node_op(n, modules)
        if spec is None or op is None or op.lowering != "add":
            continue
        for a in n.all_input_nodes:
            src = name_of.get(a)
            e = entries.get(src) if src is not None else None
            if (e is None or e.role != "activation" or e.spec is None or e.spec.bits >= spec.bits
                    or len(a.users) != 1 or config.names_activation(src)):
                continue
            entries[src] = replace(e, spec=e.resolve(replace(spec, signed=None)))


def products_only(entries: dict[str, PlanEntry], anchors: dict[str, fx.Node], modules: dict, config: QuantConfig) -> None:
    """``QuantConfig(activation_placement="products")``: an activation quantizer stays only where a product (conv,
    linear, matmul) reads its value; the others (adds, normalizations, the model's outputs) are planned in float,
    unless a ``module_names`` override names them."""
    for name, n in anchors.items():
        e = entries[name]
        if (e.role in ("activation", "output") and e.spec is not None and not config.names_activation(name)
                and not patterns.read_by_product(n, modules)):
            entries[name] = replace(e, spec=None)


def plan_graph(gm: fx.GraphModule, names: dict[fx.Node, str], config: QuantConfig, weighted: dict[str, nn.Module]):
    """``(plan, anchors, bias links, unsupported)``: the plan of a shape-propagated graph (``weighted``: its
    registered layers by name), the node each activation entry's quantizer follows, each quantized layer's
    input tensor, and the ops left in float."""
    planner = _GraphPlanner(gm, names, config)
    for n in gm.graph.nodes:
        planner.visit(n)
    widen_add_inputs(planner.entries, planner.anchors, planner.modules, config)
    if config.activation_placement == "products":
        products_only(planner.entries, planner.anchors, planner.modules, config)
    entries = {**weight_entries(weighted, config), **planner.entries}
    planner.entries = entries
    links = planner.bias_links()
    entries.update(planner.bias_entries(links))
    return QuantPlan(entries), planner.anchors, links, planner.unsupported


def merge_plan(derived: QuantPlan, given: Optional[QuantPlan]) -> QuantPlan:
    """``derived`` with the specs of ``given`` (a user's or a saved plan) for the tensors it names."""
    if given is None:
        return derived
    if not isinstance(given, QuantPlan):
        raise PlanError(f"plan must be a QuantPlan (QuantPlan.from_json(text) reads a file), got {type(given).__name__}")
    unknown = [n for n in given if n not in derived]
    if unknown:
        raise PlanError(f"the plan names {len(unknown)} tensor(s) this model does not have: {', '.join(unknown[:5])}; "
                        f"was it made for another model? (this model's look like {list(derived)[:3]})")
    wrong = [f"{n} ({given[n].role}, here {derived[n].role})" for n in given if given[n].role != derived[n].role]
    if wrong:
        raise PlanError(f"plan roles do not match this model: {', '.join(wrong[:5])}")
    return derived.with_specs({n: e.spec for n, e in given.items() if e.role != "bias"})


# ---------------------------------------------------------------------- 3. inserting
def attach_param_quantizers(layers: dict[str, nn.Module], plan: QuantPlan) -> None:
    """Turn each registered layer with planned parameters (or tensors of its own) into its quantized twin
    (in place). A tensor with a known range (a sigmoid's output) is set to it and frozen."""
    for name, m in layers.items():
        reg = lookup(m)
        if reg is None:
            continue
        qs = {p: make_quantizer(e.spec, e.shape, f"{name}.{p}", "weight", e.owner_type)
              for p in reg.params_of(m) if (e := plan.get(f"{name}.{p}")) is not None and e.spec is not None}
        if reg.tensors is None:
            if qs:
                reg.convert(m, qs)
            continue
        tqs = {}
        for suffix, site in reg.tensors_of(m).items():
            e = plan.get(f"{name}.{suffix}")
            if e is None or e.spec is None:
                continue
            q = tqs[suffix] = make_quantizer(e.spec, e.shape, f"{name}.{suffix}", e.role, e.owner_type)
            if site.fixed_range is not None:
                q.calibrate_from(torch.tensor(site.fixed_range, dtype=torch.float32))
                q.freeze()
        if qs or tqs:
            reg.convert(m, qs, tqs)


def insert_quantizers(gm: fx.GraphModule, plan: QuantPlan, anchors: dict[str, fx.Node], links: dict[str, str]) -> nn.ModuleDict:
    """Build the planned activation quantizers into ``gm`` (after their anchor nodes) and link each
    quantized layer's bias to its input quantizer."""
    aq = nn.ModuleDict()
    gm.add_submodule("activation_quantizers", aq)
    keys = _KeyMaker()
    key_of = {}
    for name, n in anchors.items():
        e = plan[name]
        if e.spec is None:
            continue
        key_of[name] = key = keys(name)
        aq[key] = make_quantizer(e.spec, e.shape, name, e.role, e.owner_type)
        with gm.graph.inserting_after(n):
            qn = gm.graph.call_module(f"activation_quantizers.{key}", (n,))
        n.replace_all_uses_with(qn, delete_user_cb=lambda u, qn=qn: u is not qn)
    modules = dict(gm.named_modules())
    for layer, src in links.items():
        if not isinstance(modules[layer], QuantizedModuleMixin):
            continue
        if src in key_of:
            modules[layer]._bias_input = (aq, key_of[src])
            continue
        owner, k, h = src.rsplit(".", 2) if src.count(".") >= 2 else (src, "", "")  # a recurrent hidden state "rnn.l0.h"
        suffix = f"{k}.{h}"
        tq = getattr(modules.get(owner), "tensor_quantizers", None)
        if tq is not None and tensor_key(suffix) in tq:
            modules[layer]._bias_input = (tq, tensor_key(suffix))
    return aq


def prepare_graph(model: nn.Module, args: tuple, kwargs: dict, config: QuantConfig,
                  plan: Optional[QuantPlan] = None) -> Prepared:
    gm = capture(model, args, kwargs)
    prune_dead(gm)
    select_unbound(gm)
    propagate_shapes(gm, args, kwargs)
    if functional_copies(gm):
        propagate_shapes(gm, args, kwargs)
    drop_noops(gm)
    if decompose_sdpa(gm) + fuse_attention_softmax(gm):  # both products of attention on integers, one float step
        propagate_shapes(gm, args, kwargs)
    names = name_nodes(gm)
    modules = dict(gm.named_modules())
    weighted = {n.target: modules[n.target] for n in gm.graph.nodes if ops.kind(n, modules) == "weighted"}
    derived, anchors, links, unsupported = plan_graph(gm, names, config, weighted)
    final = merge_plan(derived, plan)
    attach_param_quantizers(weighted, final)
    types = {t for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")
             for t in (type_names(modules[n.target]) if n.op == "call_module" else type_names(n.target))}
    unmatched = unmatched_overrides(config, set(names.values()) | set(modules) | set(final), types)
    aq = insert_quantizers(gm, final, anchors, links)
    gm.graph.lint()
    gm.recompile()
    return Prepared(gm, aq, final, unsupported, "graph", unmatched)


# ---------------------------------------------------------------------- leaf mode
def _leaf_modules(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    leaves, unsupported = {}, []
    for name, m in model.named_modules():
        if ops.is_leaf_module(m):
            if not any(name.startswith(p + ".") for p in leaves):
                leaves[name] = m
        elif name and not list(m.children()) and (list(m.parameters(recurse=False)) or m.__module__.startswith("torch.nn")):
            unsupported.append(f"{name} ({type(m).__name__})")
    return leaves, unsupported


def _output_shapes(model: nn.Module, leaves: dict[str, nn.Module], args, kwargs) -> dict[str, torch.Size]:
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
    return shapes


def _float_inputs(model: nn.Module, args: tuple) -> dict[str, int]:
    """``{name: position}`` of the model's float tensor inputs (names from ``forward``'s signature)."""
    params = list(inspect.signature(model.forward).parameters)
    return {(params[i] if i < len(params) else f"input_{i}"): i
            for i, a in enumerate(args) if torch.is_tensor(a) and a.is_floating_point()}


def plan_leaf(model: nn.Module, leaves: dict[str, nn.Module], shapes: dict, args: tuple, config: QuantConfig) -> QuantPlan:
    entries = weight_entries({n: m for n, m in leaves.items() if lookup(m) is not None}, config)
    for name, m in leaves.items():
        if ops.is_pass_module(m) or name not in shapes:
            continue
        shape = tuple(shapes[name])
        e = PlanEntry("activation", None, type_names(m)[0], shape, 1 if len(shape) >= 2 else 0, ops.is_nonneg_module(m))
        entries[name] = replace(e, spec=e.resolve(config.spec_for("activation", name, type_names(m))))
    for name, i in _float_inputs(model, args).items():
        e = PlanEntry("input", None, "input", tuple(args[i].shape), 1 if args[i].ndim >= 2 else 0)
        entries[name] = replace(e, spec=e.resolve(config.input_spec(name)))
    return QuantPlan(entries)


def prepare_leaf(model: nn.Module, args: tuple, kwargs: dict, config: QuantConfig,
                 plan: Optional[QuantPlan] = None) -> Prepared:
    """Quantize leaf modules only (used when graph capture fails)."""
    leaves, unsupported = _leaf_modules(model)
    shapes = _output_shapes(model, leaves, args, kwargs)
    final = merge_plan(plan_leaf(model, leaves, shapes, args, config), plan)
    attach_param_quantizers({n: m for n, m in leaves.items() if lookup(m) is not None}, final)
    aq = nn.ModuleDict()
    keys = _KeyMaker()
    positions = _float_inputs(model, args)
    input_keys: dict[int, str] = {}
    for name, e in final.items():
        if e.role == "weight" or e.spec is None:
            continue
        key = keys(name)
        aq[key] = make_quantizer(e.spec, e.shape, name, e.role, e.owner_type)
        if e.role == "input":
            input_keys[positions[name]] = key
        else:
            leaves[name].register_forward_hook(
                lambda mod, i, o, key=key: aq[key](o) if torch.is_tensor(o) and o.is_floating_point() else o)
    if input_keys:
        model.register_forward_pre_hook(
            lambda mod, a: tuple(aq[input_keys[i]](x) if i in input_keys else x for i, x in enumerate(a)))
    names = {n for n, _ in model.named_modules()} | set(final)
    types = {t for _, m in model.named_modules() for t in type_names(m)}
    return Prepared(model, aq, final, unsupported, "leaf", unmatched_overrides(config, names, types))
