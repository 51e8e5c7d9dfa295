"""Distributed calibration: each process observes its shard, the observers are merged in rank order."""
from __future__ import annotations

import copy

import torch


def distributed_group(distributed) -> tuple[bool, object]:
    """``(merge?, process group)`` (``"auto"``: the default group, when it has more than one process)."""
    if distributed is False or distributed is None:
        return False, None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        if distributed is True:
            raise RuntimeError("calibrate(distributed=True) needs torch.distributed.init_process_group() first "
                               "(torchrun sets up the environment for it)")
        return False, None
    group = None if distributed in ("auto", True) else distributed  # None: the default group
    return torch.distributed.get_world_size(group) > 1, group


def _on_cpu(observer):
    """A copy of ``observer`` with its tensors on the CPU (they are pickled to the other processes)."""
    out = copy.copy(observer)
    for k, v in vars(observer).items():
        if torch.is_tensor(v):
            setattr(out, k, v.detach().cpu())
    return out


def merge_across_processes(observed, batches: int, group) -> int:
    """Gather every process's ``(quantizer, observer)`` statistics (one collective), merge them per tensor
    in rank order and set each quantizer's encoding from the merged statistics; returns the batches seen
    by all processes."""
    quantizers = {q.tensor_name: q for q, _ in observed}
    mine = ({q.tensor_name: _on_cpu(o) for q, o in observed}, batches)
    gathered = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, mine, group=group)
    for name in sorted(quantizers):
        merged = None
        for by_name, _ in gathered:
            o = by_name.get(name)
            if o is None or o.empty:
                continue
            merged = copy.deepcopy(o) if merged is None else merged.merge(o)
        if merged is not None:
            quantizers[name].set_from_observer(merged)
    return sum(n for _, n in gathered)
