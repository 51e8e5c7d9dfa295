"""``QuantSim``: a copy of the user's model with quantizers, calibrated on data."""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..batches import as_args, check_iterable, device_of, evaluating, iterate, map_tensors, run_batch, shapes, to_device
from ..config.plan import QuantPlan
from ..config.spec import QuantConfig, QuantSpec
from ..core.encoding import Encoding
from ..errors import DataError, GraphCaptureError, NotCalibratedError, PlanError
from ..graph.bn_fold import FoldReport, fold_batch_norms, folded_replacement
from ..graph.attention import decompose_mha
from ..graph.own_conv import plain_convs, plain_linears
from ..graph.ops import BN_MODULES
from ..graph.patterns import set_submodule
from ..io import encodings as enc_io
from ..nn.modules import QuantizedModuleMixin
from ..nn.quantizer import Quantizer, make_quantizer
from .distributed import distributed_group, merge_across_processes
from .pool_grid import cap_pool_grids, settle_empty_add_inputs
from .prepare import prepare_graph, prepare_leaf
from .saving import copy_weights, meta_copy
from .saving import save as save_sim

#: calibration warns about activation quantizers that clip more than this share of the values they saw
CLIP_WARNING = 0.3

#: what each ``role=`` filter of disable/enable selects
_ROLE_FILTERS = {"weight": ("weight",), "activation": ("input", "activation", "output"), "input": ("input",),
                 "output": ("output",)}


def _check_runs(net, args, kwargs, example_inputs) -> None:
    try:
        with torch.no_grad():
            net(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"the model does not run on example_inputs (shapes {shapes(example_inputs)}): "
            f"{type(e).__name__}: {e}. Pass inputs shaped like real ones, e.g. torch.randn(1, 3, 224, 224)"
        ) from e


def rewrite_layers(net: nn.Module, args: tuple, kwargs: dict) -> dict[str, str]:
    """Rewrite in place the layers every pass should see as plain ones (own-forward convs -- "same" padding, weight
    standardization -- as plain convs, Hugging Face's transposed ``Conv1D`` as ``nn.Linear``, ``nn.MultiheadAttention``
    as linears around ``scaled_dot_product_attention``); returns ``{layer: what it became}``."""
    with evaluating(net):
        done = plain_convs(net, args, kwargs)
        done.update(plain_linears(net, args, kwargs))
        done.update(decompose_mha(net, args, kwargs))
    return done


def _check_device(net) -> None:
    if any(t.is_meta for t in list(net.parameters()) + list(net.buffers())):
        raise DataError("the model's weights are on the meta device (not materialized): load them first, e.g. "
                        "model.to_empty(device='cpu') then model.load_state_dict(...)")



def _calibration_warnings(sim, qs: dict, acts: list) -> list[str]:
    """Warn about what calibration left doubtful (empty or clipping ranges, saturated biases, quantizers that saw no
    data); returns the names of the last."""
    collapsed = [n for n, q in qs.items() if q.is_initialized and q.range_collapsed]
    if collapsed:
        warnings.warn(f"{len(collapsed)} quantizer(s) saw only zeros, so their range is empty: {', '.join(collapsed[:8])}"
                      f"{', ...' if len(collapsed) > 8 else ''}. Check that the calibration data is real (not all "
                      "zeros or constant) and the layers' weights are not all zero", QuantSimWarning, stacklevel=3)
    clipped = [f"{q.tensor_name} ({q.clipped:.0%})" for q in acts if q.is_initialized and q.clipped > CLIP_WARNING]
    if clipped:
        warnings.warn(f"{len(clipped)} activation quantizer(s) clip most of what they saw (values outside the grid): "
                      f"{', '.join(clipped[:8])}{', ...' if len(clipped) > 8 else ''}. Check the spec (an unsigned "
                      "grid on signed data?) and the range method", QuantSimWarning, stacklevel=3)
    saturated = [n for n, m in sim.model.named_modules() if isinstance(m, QuantizedModuleMixin) and m.bias_saturates()]
    if saturated:
        warnings.warn(f"{len(saturated)} layer(s) have a bias beyond int32 on their accumulator grid (input scale x "
                      f"weight scale): {', '.join(saturated[:8])}. Their input range is nearly empty; the sim clamps "
                      "the bias as deployed kernels do, and their int32 accumulators may wrap around. Check the "
                      "calibration data reaching them", QuantSimWarning, stacklevel=3)
    unobserved = [q.tensor_name for q in acts if not q.is_initialized]
    if unobserved:
        warnings.warn(f"{len(unobserved)} activation quantizer(s) saw no data during calibration and have no "
                      f"encoding (their code path never ran): {', '.join(unobserved)}", QuantSimWarning, stacklevel=3)
    return unobserved


def _disabled_state(sim, state_dict, prefix, local_metadata):
    """state_dict hook: a disabled quantizer's buffers under its slot's keys, as if it were enabled."""
    for name, _, _, slot_prefix in sim._slots():
        q = sim._disabled.get(name)
        if q is not None:
            for k, v in q.state_dict().items():
                state_dict[prefix + slot_prefix + k] = v
    return state_dict


def _load_disabled_state(sim, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: route a disabled quantizer's keys to it (its slot holds an Identity)."""
    for name, _, _, slot_prefix in sim._slots():
        q = sim._disabled.get(name)
        if q is None:
            continue
        full = prefix + slot_prefix
        mine = {k[len(full):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(full)]}
        if mine:
            q.load_state_dict(mine, strict=strict)
        elif strict:
            missing_keys.extend(full + k for k in q.state_dict())


class QuantSimWarning(UserWarning):
    """Something was left unquantized or could not be done as asked; the message says what."""


def _fold_bn(net: nn.Module, example_inputs) -> FoldReport:
    """Fold ``net``'s batch norms in place (what an integer runtime does); those that cannot be folded stay."""
    bns = [name for name, m in net.named_modules() if isinstance(m, BN_MODULES)]
    if not bns:
        return FoldReport()
    try:
        return fold_batch_norms(net, inplace=True, example_inputs=example_inputs)[1]
    except GraphCaptureError as e:
        warnings.warn(f"{len(bns)} batch norm(s) stay unfolded: folding needs the torch.fx graph ({e}). Fold them "
                      "by hand (edgequant.ptq.fold_batch_norms on a traceable copy) to simulate what an integer "
                      "runtime computes", QuantSimWarning, stacklevel=3)
        return FoldReport(skipped=[(name, "the model cannot be traced by torch.fx") for name in bns])


@dataclass
class CalibrationReport:
    batches: int
    seconds: float
    quantizers: int
    unobserved: list[str] = field(default_factory=list)


class QuantSim(nn.Module):
    """A quantization simulation of ``model``: the same computation with fake quantizers inserted.

    Args:
        model: the float model. It is not modified unless ``inplace=True`` (the sim owns a deep copy).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs, shaped
            like real inputs; used to capture the graph and size the quantizers.
        config: a preset name (``"w8a8"``, ``"w4a8"``, ``"w8a16"``, ``"w4a16"``, ``"w8a8_per_tensor"``,
            ``"w4a8_per_tensor"``), a :class:`~edgequant.config.QuantConfig`, or its dict/JSON.
        plan: a :class:`~edgequant.config.QuantPlan` (``sim.plan`` of another sim of this model, edited
            or loaded with ``QuantPlan.from_json``): the specs it gives win over the config's, tensor by
            tensor; its names must exist in this model (else :class:`~edgequant.errors.PlanError`).
        inplace: quantize ``model`` itself instead of a copy.
        fold_bn: fold every batch norm that follows a conv, transposed conv or linear layer into that
            layer before quantizing it (what integer runtimes and the ONNX export compute; the sim then
            quantizes the folded weights). ``sim.bn_folding`` lists what was folded and what was left
            and why (also in :meth:`summary`); ``sim.float_model()`` has the folded structure (each
            folded BatchNorm an ``nn.Identity``, or its child modules when its own forward applies them
            after the batch norm, as timm's ``BatchNormAct2d`` does). ``False`` keeps batch norms as float ops between the
            quantizers (they then run in float in an export).
        allow_fallback: when graph capture fails, warn and quantize leaf modules only (else raise
            :class:`~edgequant.graph.GraphCaptureError`).

    The sim is an ``nn.Module``: call it like the original, train it, ``state_dict()`` it (all
    quantizer state is in buffers, disabled quantizers' too). ``sim.plan`` is the resolved plan: every
    tensor that can be quantized, its role and spec.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    >>> sim = QuantSim(model, torch.randn(1, 3, 8, 8), config="w8a8")
    >>> report = sim.calibrate([torch.randn(4, 3, 8, 8) for _ in range(3)], progress=False)
    >>> sorted(sim.quantizers())
    ['0.weight', '1', '3', '3.weight', 'input']
    >>> sim(torch.randn(2, 3, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, model: nn.Module, example_inputs, config="w8a8", *, plan: Optional[QuantPlan] = None,
                 inplace: bool = False, allow_fallback: bool = True, fold_bn: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"QuantSim needs a torch.nn.Module, got {type(model).__name__}")
        self.config = QuantConfig.coerce(config)
        _check_device(model)
        # cloned: a slice of a big batch would otherwise keep (and save) the whole batch
        object.__setattr__(self, "_example_inputs", map_tensors(lambda t: t.detach().cpu().clone(), example_inputs))
        net = model if inplace else copy.deepcopy(model)
        self.fold_bn = bool(fold_bn)
        device = device_of(net)
        inputs = to_device(example_inputs, device)
        args, kwargs = as_args(inputs)
        self.plain_convs = rewrite_layers(net, args, kwargs)
        self.bn_folding = _fold_bn(net, inputs) if fold_bn else FoldReport()
        # the float architecture (batch norms folded; no data: meta tensors), for float_model() and sim.save()
        object.__setattr__(self, "_arch", meta_copy(net))
        modes = {name: m.training for name, m in net.named_modules()}
        with evaluating(net):
            _check_runs(net, args, kwargs, example_inputs)
            prepared = self._prepare(net, args, kwargs, plan, allow_fallback)
        self.model = prepared.model
        self.train(net.training)
        for name, m in self.model.named_modules():  # each layer keeps the mode it had in the user's model
            m.training = modes.get(name, m.training)
        self.capture_mode = prepared.mode
        self.unsupported = prepared.unsupported
        self.plan: QuantPlan = prepared.plan
        self._n_positional = len(args)
        if prepared.mode == "leaf":
            self._leaf_activation_quantizers = prepared.activation_quantizers
        self._disabled: dict[str, Quantizer] = {}
        self._slot_table = self._build_slot_table()
        self._register_state_dict_hook(_disabled_state)
        self._register_load_state_dict_pre_hook(_load_disabled_state, with_module=True)
        for msg in prepared.unmatched:
            warnings.warn(f"config override ignored: {msg}", QuantSimWarning, stacklevel=2)
        if self.unsupported:
            warnings.warn(
                f"{len(self.unsupported)} op(s) have no quantized implementation and stay in float "
                f"(their outputs are quantized where quantized ops consume them): {', '.join(self.unsupported)}",
                QuantSimWarning, stacklevel=2,
            )

    def _prepare(self, net, args, kwargs, plan, allow_fallback):
        try:
            with torch.no_grad():
                return prepare_graph(net, args, kwargs, self.config, plan)
        except GraphCaptureError as e:
            if not allow_fallback:
                raise
            warnings.warn(
                f"{e}. Falling back to leaf-module quantization: layers get weight and output quantizers, "
                "but functional ops (add, cat, matmul, ...) stay in float and conv/bn/relu are not fused. "
                "Make that code traceable by torch.fx to quantize the whole graph, or use edgequant.RegionSim "
                "to capture the submodules that trace (a detector's backbone and heads) in graph mode.",
                QuantSimWarning, stacklevel=3,
            )
            with torch.no_grad():
                return prepare_leaf(net, args, kwargs, self.config, plan)

    # ------------------------------------------------------------------ use
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def run_batch(self, batch, forward_fn: Optional[Callable] = None):
        """Run one batch (a tensor, a dict of keyword inputs, or a tuple whose first items are the
        positional inputs); see :mod:`edgequant.batches`."""
        return run_batch(self, batch, self._n_positional, forward_fn)

    @property
    def device(self) -> torch.device:
        return device_of(self)

    @property
    def activation_quantizers(self) -> nn.ModuleDict:
        if self.capture_mode == "graph":
            return self.model.activation_quantizers
        return self._leaf_activation_quantizers

    def _slots(self):
        """``[(tensor name, container ModuleDict, key, state_dict prefix)]`` for every quantizer, enabled or not."""
        return self._slot_table

    def _build_slot_table(self):
        prefix = "model.activation_quantizers." if self.capture_mode == "graph" else "_leaf_activation_quantizers."
        table = [(q.tensor_name, self.activation_quantizers, key, prefix + key + ".")
                 for key, q in self.activation_quantizers.items()]
        for mname, m in self.model.named_modules():
            if isinstance(m, QuantizedModuleMixin):
                table += [(f"{mname}.{pname}", m.param_quantizers, pname, f"model.{mname}.param_quantizers.{pname}.")
                          for pname in m.param_quantizers]
            tq = getattr(m, "tensor_quantizers", None)  # a recurrent cell's gates and states
            if isinstance(tq, nn.ModuleDict):
                table += [(f"{mname}.{key.replace('__', '.')}", tq, key, f"model.{mname}.tensor_quantizers.{key}.")
                          for key in tq]
        return table

    def quantizers(self, include_disabled: bool = False) -> dict[str, Quantizer]:
        """``{tensor name: Quantizer}`` of the enabled quantizers (all of them with ``include_disabled``)."""
        out = {}
        for name, container, key, _ in self._slots():
            q = container[key]
            if isinstance(q, Quantizer):
                out[name] = q
            elif include_disabled:
                out[name] = self._disabled[name]
        return out

    # ------------------------------------------------------------------ float model, save
    def copy_weights_to(self, model: nn.Module) -> nn.Module:
        """Copy the sim's float weights (AdaRound's rounded weights, corrected biases, ...) into ``model``,
        which has the structure of the model the sim was built from; returns it. The batch norms the sim
        folded are replaced in ``model`` too (``nn.Identity`` or their child modules; their layers get the folded
        weights), and so are the layers the sim holds rewritten (``sim.plain_convs``: own-forward convs as plain ones,
        ``nn.MultiheadAttention`` as :class:`~edgequant.nn.attention.DecomposedMultiheadAttention`)."""
        for name in self.plain_convs:  # rewritten: plain convs holding the effective weight, decomposed attention
            try:
                model.get_submodule(name)
            except AttributeError:
                continue
            set_submodule(model, name, copy.deepcopy(self._arch.get_submodule(name)).to_empty(device=self.device))
        for _, bn in self.bn_folding.folded:
            try:
                found = model.get_submodule(bn)
            except AttributeError:
                continue
            if isinstance(found, BN_MODULES):
                set_submodule(model, bn, folded_replacement(found) or nn.Identity())
        return copy_weights(self.model, model)

    def float_model(self) -> nn.Module:
        """A new float model (the structure of the one the sim was built from) holding the sim's float
        weights: ``QuantSim(sim.float_model(), x, sim.config)`` with ``sim``'s encodings loaded
        computes what ``sim`` computes."""
        model = copy.deepcopy(self._arch).to_empty(device=self.device)
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                t.zero_()
        return self.copy_weights_to(model)

    def save(self, folder) -> Path:
        """Write everything needed to rebuild this sim into ``folder`` (atomically); read it back with
        :func:`edgequant.load`. See :mod:`edgequant.sim.saving` for the files."""
        return save_sim(self, folder)

    # ------------------------------------------------------------------ plan
    def set_spec(self, name: str, spec: QuantSpec) -> Quantizer:
        """Quantize tensor ``name`` with ``spec`` from now on; returns its new quantizer.

        The spec is resolved for the tensor (``signed=None``, axis-less granularities) and the plan is
        updated (``sim.plan``). A new quantizer is built for it (grid, scale shape), in place of the old
        one, enabled or disabled as the old one was: a weight quantizer is calibrated from its weight at
        once, an activation quantizer needs ``sim.calibrate(data)`` again.
        """
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {spec!r}; to leave {name!r} in float use sim.disable({name!r})")
        slot = next((sl for sl in self._slots() if sl[0] == name), None)
        if slot is None:
            if name in self.plan:
                raise PlanError(f"{name!r} has no quantizer in this sim (its plan entry is float); build the sim with it "
                                f"quantized: QuantSim(model, x, plan=sim.plan.with_spec({name!r}, spec))")
            raise KeyError(f"{name!r} is not a quantizer of this sim; sim.quantizers(include_disabled=True) lists them")
        _, container, key, _ = slot
        plan = self.plan.with_spec(name, spec)
        e = plan[name]
        old = container[key] if isinstance(container[key], Quantizer) else self._disabled[name]
        q = make_quantizer(e.spec, e.shape, name, e.role, e.owner_type).to(old.scale.device)
        if q.is_weight:
            q.calibrate_from(self.model.get_parameter(name))
        if name in self._disabled:
            self._disabled[name] = q
        else:
            container[key] = q
        self.plan = plan
        return q

    # ------------------------------------------------------------------ enable / disable
    def _select(self, names, module_type, role):
        if isinstance(names, str):
            names = [names]
        if role is not None and role not in _ROLE_FILTERS:
            raise ValueError(f"role must be one of {sorted(_ROLE_FILTERS)}, got {role!r}")
        for name, container, key, _ in self._slots():
            q = container[key] if isinstance(container[key], Quantizer) else self._disabled[name]
            if names is not None and not any(fnmatch.fnmatchcase(name, p) for p in names):
                continue
            if module_type is not None and q.owner_type != module_type:
                continue
            if role is not None and q.role not in _ROLE_FILTERS[role]:
                continue
            yield name, container, key, q

    def disable(self, names=None, module_type: Optional[str] = None, role: Optional[str] = None) -> list[str]:
        """Disable quantizers matching all given filters; returns their names.

        ``names``: tensor names or glob patterns (``"features.1*"``); ``module_type``: the owning
        layer's class name or functional op (``"Conv2d"``, ``"add"``); ``role``: ``"weight"``,
        ``"activation"`` (every activation quantizer: model inputs and outputs too), ``"input"`` or
        ``"output"``. A disabled quantizer is removed from the forward pass (its slot holds
        ``nn.Identity``) and kept aside until :meth:`enable`; its state stays in ``state_dict`` under
        the same keys, so a state_dict loads into a sim whatever is enabled in either.
        """
        done = []
        for name, container, key, q in list(self._select(names, module_type, role)):
            if isinstance(container[key], Quantizer):
                self._disabled[name] = q
                container[key] = nn.Identity()
                done.append(name)
        return done

    def enable(self, names=None, module_type: Optional[str] = None, role: Optional[str] = None) -> list[str]:
        """Re-enable disabled quantizers matching the filters (see :meth:`disable`)."""
        done = []
        for name, container, key, q in list(self._select(names, module_type, role)):
            if not isinstance(container[key], Quantizer):
                container[key] = self._disabled.pop(name)
                done.append(name)
        return done

    def output_quantizers(self) -> list[str]:
        """Names of the activation quantizers whose values leave the model (its outputs; role
        ``"output"`` in :attr:`plan`). Disable them (``sim.disable(sim.output_quantizers())``) to keep
        the outputs at accumulator precision, as a kernel that dequantizes its int32 result does;
        logits then lose no 8-bit rounding."""
        have = {sl[0] for sl in self._slots()}
        return [n for n, e in self.plan.items() if e.role == "output" and n in have]

    @contextlib.contextmanager
    def quantization_disabled(self):
        """Run the sim in float inside the block (every quantizer disabled), then restore."""
        names = self.disable()
        try:
            yield self
        finally:
            self.enable(names)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, data: Iterable, forward_fn: Optional[Callable] = None, num_batches: Optional[int] = None,
                  progress: bool = True, distributed="auto") -> CalibrationReport:
        """Set every quantizer's encoding.

        Weights are calibrated from the weights themselves. Quantizers that are frozen (see
        :meth:`Quantizer.freeze`; AdaRound freezes the weights it rounds) keep their encoding.
        Activations: each batch of ``data`` is run through the sim with the activation quantizers
        observing (and passing values through in float); each then chooses its range by its ``range_method``.

        Args:
            data: an iterable of batches (a DataLoader, a list of tensors, ...). A batch is a tensor, a
                dict of keyword inputs, or a tuple/list whose first items are the positional inputs
                (extra trailing items, such as labels, are ignored).
            forward_fn: ``forward_fn(sim, batch)`` runs one batch, for batches of another form.
            num_batches: stop after this many batches.
            progress: show a progress bar.
            distributed: under ``torch.distributed`` (``torchrun``; ``"auto"``: when a process group with
                more than one process is initialized, or pass a group), each process observes its own
                shard of the data; the statistics are merged (min/max, sums of per-sample extremes,
                histograms) in rank order, so every process ends with the same encodings, those of one
                process that saw all the shards. ``False``: each process calibrates on its own data.
        """
        t0 = time.perf_counter()
        check_iterable(data, "calibration")
        qs = self.quantizers()
        for mname, m in self.model.named_modules():
            if isinstance(m, QuantizedModuleMixin):
                for pname, q in m.param_quantizers.items():
                    if isinstance(q, Quantizer) and not (q.is_frozen and q.is_initialized):
                        q.calibrate_from(m.quantized_input(pname))
        acts = [q for q in qs.values() if not q.is_weight and not (q.is_frozen and q.is_initialized)]
        n = 0
        merge, group = distributed_group(distributed)
        observers = [] if merge else None
        with evaluating(self):
            with contextlib.ExitStack() as stack, torch.no_grad():
                for q in acts:
                    stack.enter_context(q.calibrating(reduce=observers))
                for i, batch in iterate(data, num_batches=num_batches, device=self.device, desc="calibration", progress=progress):
                    try:
                        self.run_batch(batch, forward_fn)
                    except ValueError:
                        raise
                    except Exception as e:  # noqa: BLE001
                        raise DataError(f"calibration batch {i} (shapes {shapes(batch)}) failed in the model: "
                                        f"{type(e).__name__}: {e}") from e
                    n += 1
        if merge:
            n = merge_across_processes(observers, n, group)
        cap_pool_grids(self)
        settle_empty_add_inputs(self)
        unobserved = _calibration_warnings(self, qs, acts)
        return CalibrationReport(batches=n, seconds=time.perf_counter() - t0, quantizers=len(qs), unobserved=unobserved)

    # ------------------------------------------------------------------ encodings
    def encodings(self) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
        """``(activations, params)``: ``{tensor name: Encoding}`` of the enabled, calibrated quantizers."""
        acts, params = {}, {}
        for name, q in self.quantizers().items():
            if q.is_initialized:
                (params if q.is_weight else acts)[name] = q.encoding()
        return acts, params

    def save_encodings(self, path, format: str = "edgequant") -> None:
        """Write the encodings as JSON (atomically): ``format="edgequant"`` or ``"aimet"`` (1.0.0)."""
        missing = [n for n, q in self.quantizers().items() if not q.is_initialized]
        if missing:
            raise NotCalibratedError(f"{len(missing)} quantizer(s) have no encoding ({', '.join(missing[:5])}"
                               f"{', ...' if len(missing) > 5 else ''}): call sim.calibrate(data) first")
        acts, params = self.encodings()
        if format == "edgequant":
            doc = enc_io.to_edgequant(acts, params)
        elif format == "aimet":
            doc = enc_io.to_aimet(acts, params)
        else:
            raise ValueError(f"format must be 'edgequant' or 'aimet', got {format!r}")
        enc_io.atomic_write_text(path, json.dumps(doc, indent=1))

    def load_encodings(self, source, strict: bool = True) -> None:
        """Set encodings from a file (either format) or a dict.

        With ``strict`` every enabled quantizer must get an encoding. Nothing is changed unless the
        whole file is valid; errors name the offending entry.
        """
        doc, where = enc_io.read_encodings(source)
        qs = self.quantizers()
        templates = {n: Encoding(q.scale, q.zero_point, q.spec.bits, q.spec.signed, q.spec.symmetric,
                                 q.spec.narrow_range, q.spec.granularity) for n, q in qs.items()}
        acts, params = enc_io.parse_encodings(doc, where, templates)
        staged = []
        for section, entries, role in (("activations", acts, "activation"), ("params", params, "weight")):
            for name, enc in entries.items():
                q = qs.get(name)
                if q is None or q.is_weight != (role == "weight"):
                    close = [n for n, q2 in qs.items() if q2.is_weight == (role == "weight")][:3]
                    raise ValueError(f"{where}: {section}[{name!r}] does not match any {role} quantizer of this sim "
                                     f"(names look like {close}); was the file made for another model or config?")
                if tuple(enc.scale.shape) != tuple(q.scale.shape):
                    raise ValueError(f"{where}: {section}[{name!r}] has shape {list(enc.scale.shape)}, "
                                     f"the quantizer needs {list(q.scale.shape)}")
                staged.append((name, q, enc))
        if strict:
            missing = sorted(set(qs) - {n for n, _, _ in staged})
            if missing:
                raise ValueError(f"{where}: no encoding for {len(missing)} quantizer(s): {', '.join(missing[:10])}"
                                 f"{', ...' if len(missing) > 10 else ''} (pass strict=False to load a partial file)")
        for name, q, enc in staged:  # all checked before any is set: a bad file changes nothing
            try:
                q.check_encoding(enc)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        for name, q, enc in staged:
            q.set_encoding(enc)

    def integer_exact(self, requant: str = "float32", tables: bool = False, float64: bool = False):
        """Context manager: inside it, the sim computes what the deployed integer kernels compute,
        bit for bit (exact integer accumulators, the target's requantization); for evaluation.

        ``requant="float32"`` is ONNX Runtime's CPU arithmetic (what :func:`edgequant.export_onnx` writes for),
        ``"fixed_point"`` gemmlowp/TFLite's multiplier and shift. ``tables=True`` looks elementwise ops between
        per-tensor grids up in their tables, as ``export_onnx(..., tables=True)`` and the integer engine do.
        ``float64=True`` computes LayerNorm, GroupNorm and softmax in float64, rounded to float32 once, as
        ``export_onnx(..., float64=True)`` writes them (:mod:`edgequant.core.float64`).
        See :mod:`edgequant.sim.exact`.
        Usage: ``with sim.integer_exact(): logits = sim(images)``.
        """
        from .exact import IntegerExactMode

        if any(getattr(m, "simulates_bn", False) for m in self.model.modules()):
            raise ValueError("layers still simulate their batch norm: call edgequant.qat.fold_simulated_bn(sim) first")
        return IntegerExactMode(self, requant, tables, float64)

    # ------------------------------------------------------------------ reporting
    def size_bytes(self) -> dict[str, int]:
        """Bytes of the float parameters and of the quantized model (quantized weights at their bit-width,
        everything else in float32, plus scales and zero points)."""
        float_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        quant = float_bytes
        for name, q in self.quantizers().items():
            if q.is_weight:
                n = q.tensor_shape.numel()
                quant -= n * 4
                quant += (n * q.spec.bits + 7) // 8 + q.scale.numel() * 8
        return {"float": float_bytes, "quantized": quant}

    def summary(self) -> str:
        """A table of every quantizer: name, role, grid, granularity, range method, scale range."""
        rows = [("tensor", "role", "bits", "grid", "granularity", "range", "scale min..max")]
        for name, q in self.quantizers(include_disabled=True).items():
            s = q.spec
            enabled = name not in self._disabled
            grid = f"{'sym' if s.symmetric else 'asym'} {'int' if s.signed else 'uint'}"
            gran = type(s.granularity).__name__ + (f"({s.granularity.axis})" if hasattr(s.granularity, "axis") else "")
            sc = f"{q.scale.min().item():.3g}..{q.scale.max().item():.3g}" if q.is_initialized else "not calibrated"
            rows.append((name + ("" if enabled else " [disabled]"), q.role, str(s.bits), grid, gran, s.range_method, sc))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        head = f"QuantSim ({self.capture_mode} capture): {len(rows) - 1} quantizers"
        if self.unsupported:
            head += f"; left in float: {', '.join(self.unsupported)}"
        return head + self._bn_summary() + f"\ncost: {self.cost()}\n" + "\n".join(lines)

    def _bn_summary(self) -> str:
        f = self.bn_folding
        if not self.fold_bn:
            n = sum(isinstance(m, BN_MODULES) for m in self.model.modules())
            return f"\nbatch norms: not folded (fold_bn=False): {n} stay float ops" if n else ""
        if not f.folded and not f.skipped:
            return ""
        out = f"\nbatch norms: {len(f.folded)} folded into the layers before them (as an integer runtime does)"
        if f.skipped:
            out += f"; {len(f.skipped)} left in float: " + "; ".join(f"{bn}: {why}" for bn, why in f.skipped[:5])
            out += f"; ... ({len(f.skipped) - 5} more)" if len(f.skipped) > 5 else ""
        return out

    def cost(self):
        """The cost model: MACs, bit operations, weight and peak activation memory, an energy estimate,
        per layer and in total (:mod:`edgequant.sim.cost`)."""
        from .cost import cost

        return cost(self)
