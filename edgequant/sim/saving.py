"""Save a sim to a folder and load it back: everything needed to rebuild it, written atomically.

``sim.save(folder)`` writes

* ``float_arch.pt`` -- the float model's structure, pickled with meta tensors (no data);
* ``float_state.pt`` -- the float model's weights that go with the encodings (AdaRound's rounded weights,
  corrected biases, folded batch norms, CLE scales), a state_dict;
* ``float_buffers.pt`` -- its non-persistent buffers, which a state_dict leaves out (Hugging Face's ``position_ids``,
  the statistics BN folding records): the architecture is pickled without data;
* ``example_inputs.pt``, ``config.json``, ``plan.json`` -- how the sim was built;
* ``quantizer_state.pt`` -- every quantizer's state (disabled quantizers too);
* ``encodings.json`` -- the encodings (when calibrated), for deployment;
* ``manifest.json`` -- format, version, capture mode, disabled quantizers.

The folder is written beside the target and swapped in at the end, so a failed save leaves the old
folder as it was. :func:`load` rebuilds the sim bit for bit.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..config.plan import QuantPlan
from ..config.spec import QuantConfig
from ..errors import GraphCaptureError, PlanError
from ..graph.bn_fold import fold_batch_norms
from ..graph.exported import FOLDED
from ..graph.ops import BN_MODULES
from ..io.encodings import atomic_write_text, file_mode, replace_folder

FORMAT, VERSION = "edgequant.sim", 1


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s structure with every tensor on the meta device (no memory, no data copied)."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def copy_weights(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copy the float parameters and buffers of ``src`` (a sim's model) into ``dst``, module by module
    name; quantizers are skipped, and a parameter ``dst`` lacks (a bias added by bias correction) is added."""
    from ..nn.quantizer import Quantizer

    own = dict(dst.named_modules())
    for name, m in src.named_modules():
        target = own.get(name)
        if target is None or isinstance(m, Quantizer) or isinstance(target, Quantizer):
            continue
        for pname, p in m._parameters.items():
            if p is None:
                continue
            if target._parameters.get(pname) is None:
                target.register_parameter(pname, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            else:
                target._parameters[pname].data.copy_(p.detach())
        for bname, b in m._buffers.items():
            if b is None:
                continue
            if target._buffers.get(bname) is not None:
                target._buffers[bname].copy_(b)
            elif not (name == "" and bname.startswith(FOLDED)):  # not a constant the torch.export capture computed
                # a buffer a pass added (BN folding's bn_mean / bn_std), with its own persistence
                target.register_buffer(bname, b.detach().clone(), persistent=bname not in m._non_persistent_buffers_set)
    return dst


def _save_torch(obj, path: Path) -> None:
    torch.save(obj, path)
    os.chmod(path, file_mode())


def _quantizer_state(sim) -> dict:
    return {k: v for k, v in sim.state_dict().items() if "quantizers." in k}


def save(sim, folder) -> Path:
    """Write ``sim`` to ``folder`` (see the module docstring); returns the folder."""
    float_model = sim.float_model()
    disabled = sorted(sim._disabled)

    def write(tmp: Path):
        try:
            _save_torch(sim._arch, tmp / "float_arch.pt")  # the structure only: meta tensors, no data
            pickled = True
        except Exception:  # noqa: BLE001 -- a model whose classes cannot be pickled: load needs model=
            (tmp / "float_arch.pt").unlink(missing_ok=True)
            pickled = False
        state = float_model.state_dict()
        _save_torch(state, tmp / "float_state.pt")
        _save_torch({n: b for n, b in float_model.named_buffers() if n not in state}, tmp / "float_buffers.pt")
        _save_torch(sim._example_inputs, tmp / "example_inputs.pt")
        _save_torch(_quantizer_state(sim), tmp / "quantizer_state.pt")
        atomic_write_text(tmp / "config.json", sim.config.to_json())
        atomic_write_text(tmp / "plan.json", sim.plan.to_json())
        if all(q.is_initialized for q in sim.quantizers().values()):
            sim.save_encodings(tmp / "encodings.json")
        from .. import __version__
        atomic_write_text(tmp / "manifest.json", json.dumps({
            "format": FORMAT, "version": VERSION, "edgequant": __version__, "capture_mode": sim.capture_mode,
            "disabled": disabled, "pickled_model": pickled, "fold_bn": sim.fold_bn}, indent=1))

    replace_folder(Path(folder), write)
    return Path(folder)


def _read_manifest(folder: Path) -> dict:
    try:
        man = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not a saved sim (no manifest.json); write one with sim.save(folder)") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{folder}/manifest.json is not valid JSON: {e}") from None
    if man.get("format") != FORMAT or man.get("version") != VERSION:
        raise PlanError(f"{folder} holds format {man.get('format')!r} version {man.get('version')!r}; "
                        f"this edgequant reads {FORMAT!r} version {VERSION}")
    return man


def _float_model(folder: Path, man: dict, model, map_location, example) -> nn.Module:
    """The float model: ``model``'s (or the saved) architecture with the saved float weights (``model``'s layers that
    the sim rewrote -- transposed linears, own-forward convs, multi-head attention -- rewritten alike first)."""
    if model is None:
        if not man.get("pickled_model"):
            raise ValueError(f"{folder}: the float model could not be pickled when it was saved; pass load(folder, model=...)")
        try:
            model = torch.load(folder / "float_arch.pt", weights_only=False).to_empty(device=map_location)
        except Exception as e:  # noqa: BLE001 -- e.g. the model's class lives in a script that is not importable here
            raise ValueError(f"{folder}/float_arch.pt cannot be unpickled here ({type(e).__name__}: {e}); pass the "
                             "architecture: edgequant.load(folder, model=YourModel())") from None
    else:
        from ..batches import as_args
        from .quantsim import rewrite_layers

        model = copy.deepcopy(model)
        rewrite_layers(model, *as_args(example))
    state = torch.load(folder / "float_state.pt", map_location=map_location, weights_only=True)
    if set(model.state_dict()) - set(state) and any(isinstance(m, BN_MODULES) for m in model.modules()):
        model = _folded_like(model, state)  # the user's unfolded architecture of a sim that folded its batch norms
    _add_missing_biases(model, state)
    lacks, extra = set(state) - set(model.state_dict()), set(model.state_dict()) - set(state)
    if lacks or extra:
        raise PlanError(f"{folder}: the model passed to load() does not have the saved float model's structure "
                        f"(missing {sorted(lacks)[:3]}, extra {sorted(extra)[:3]}; post-training passes may "
                        "have folded its batch norms or replaced activations): call edgequant.load(folder) "
                        "without model= to use the saved float model")
    model.load_state_dict(state, strict=True)
    if (folder / "float_buffers.pt").exists():  # absent from folders saved before it was written
        own = dict(model.named_buffers())
        for n, b in torch.load(folder / "float_buffers.pt", map_location=map_location, weights_only=True).items():
            if n in own and own[n].shape == b.shape:
                own[n].copy_(b)
    return model


def load(folder, model: nn.Module = None, map_location="cpu"):
    """Rebuild the sim saved in ``folder`` by :meth:`QuantSim.save`.

    Args:
        model: the float model's architecture (its weights are replaced by the saved ones). Without it
            the pickled architecture ``float_arch.pt`` is used, which needs the model's classes importable.
        map_location: where tensors are loaded.
    """
    from .quantsim import QuantSim

    folder = Path(folder)
    man = _read_manifest(folder)
    example = torch.load(folder / "example_inputs.pt", map_location=map_location, weights_only=True)
    net = _float_model(folder, man, model, map_location, example)
    config = QuantConfig.from_json((folder / "config.json").read_text())
    plan = QuantPlan.from_json((folder / "plan.json").read_text())
    sim = QuantSim(net, example, config, plan=plan, inplace=True, fold_bn=man.get("fold_bn", False))
    sim.disable(man.get("disabled", []))
    state = torch.load(folder / "quantizer_state.pt", map_location=map_location, weights_only=True)
    missing, unexpected = sim.load_state_dict(state, strict=False)
    lost = [k for k in missing if "quantizers." in k]
    if lost or unexpected:
        raise PlanError(f"{folder}: the saved quantizers do not match the rebuilt sim (missing {lost[:3]}, "
                        f"unexpected {list(unexpected)[:3]})")
    return sim


def _folded_like(model: nn.Module, state: dict) -> nn.Module:
    """``model`` with its batch norms folded when that gives the saved state's structure (the weights are
    replaced by the saved ones next); else ``model`` as it is."""
    try:
        folded = fold_batch_norms(model)[0]
    except GraphCaptureError:
        return model
    return model if set(folded.state_dict()) - set(state) else folded


def _add_missing_biases(model: nn.Module, state: dict) -> None:
    """Give ``model`` the parameters a saved state has and it lacks (a bias bias correction added)."""
    own = set(model.state_dict())
    for key in state:
        if key not in own and key.endswith(".bias"):
            m = model.get_submodule(key.rsplit(".", 1)[0])
            if getattr(m, "bias", "missing") is None:
                m.bias = nn.Parameter(torch.zeros_like(state[key]))
