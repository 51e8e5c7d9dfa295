"""Batches: the one data path every pass uses (calibration, bias correction, AdaRound, scoring).

A *batch* is a tensor, a dict of keyword inputs, or a tuple/list whose first items are the positional
inputs (trailing items such as labels are ignored when the model is called).

>>> import torch
>>> batches = [torch.ones(2, 3), (torch.zeros(2, 3), torch.tensor([0, 1]))]
>>> [tuple(model_input(b).shape) for _, b in iterate(batches, progress=False)]
[(2, 3), (2, 3)]
>>> run_batch(torch.nn.Identity(), batches[1]).sum().item()
0.0
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from .errors import DataError


def as_args(example_inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for calling a model on ``example_inputs`` (a tensor, a tuple of them, or a dict)."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def shapes(x):
    """The shapes in a batch, for error messages."""
    if torch.is_tensor(x):
        return list(x.shape)
    if isinstance(x, dict):
        return {k: shapes(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [shapes(v) for v in x]
    return type(x).__name__


def map_tensors(fn: Callable, x):
    """``x`` with ``fn`` applied to every tensor in it (dicts, tuples and lists keep their type)."""
    if torch.is_tensor(x):
        return fn(x)
    if isinstance(x, dict):
        return {k: map_tensors(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(fn, v) for v in x)
    return x


def to_device(x, device):
    """``x`` with every tensor in it moved to ``device`` (containers keep their type)."""
    return map_tensors(lambda t: t.to(device), x)


def check_finite(x, where: str) -> None:
    """Raise :class:`~edgequant.errors.DataError` if a float tensor in ``x`` holds NaN or Inf."""
    if torch.is_tensor(x):
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise DataError(f"{where} contains {int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} Inf "
                            "values; clean the data before quantizing")
    elif isinstance(x, dict):
        for k, v in x.items():
            check_finite(v, f"{where}[{k!r}]")
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            check_finite(v, f"{where}[{i}]")


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module without any)."""
    return next((t.device for t in list(module.parameters()) + list(module.buffers())), torch.device("cpu"))


def model_input(batch):
    """The model input of a batch: the tensor, the dict of keyword inputs, or the first item of a tuple."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def run_batch(model: Callable, batch, n_positional: int = 1, forward_fn: Optional[Callable] = None):
    """Call ``model`` on one batch: ``forward_fn(model, batch)`` when given; else keyword inputs for a
    dict, the first ``n_positional`` items of a tuple/list, or the tensor itself."""
    if forward_fn is not None:
        return forward_fn(model, batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch[: max(n_positional, 1)])
    return model(batch)


def check_iterable(data, desc: str = "data") -> None:
    """Raise :class:`~edgequant.errors.DataError` unless ``data`` is an iterable of batches."""
    if data is None:
        raise DataError(f"{desc}: data is None; pass an iterable of batches (a list of tensors or a DataLoader)")
    if torch.is_tensor(data):
        raise DataError(f"{desc}: got a single tensor of shape {list(data.shape)}, not an iterable of batches; "
                        "pass [x] for one batch, or a DataLoader / list of batches")
    if not hasattr(data, "__iter__"):
        raise DataError(f"{desc}: {type(data).__name__} is not an iterable of batches; pass a list of tensors or a DataLoader")


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """Put ``module`` in eval mode inside the block, then give every submodule back its own
    ``training`` flag (a model in mixed train/eval mode comes back exactly as it went in)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, t in flags:
            m.training = t


def in_training_mode(module: torch.nn.Module) -> list[str]:
    """Names of the submodules in train mode whose behaviour depends on it (dropout, batch norm)."""
    kinds = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)
    return [n or type(module).__name__ for n, m in module.named_modules() if m.training and isinstance(m, kinds)]


def iterate(data: Iterable, *, num_batches: Optional[int] = None, device=None, desc: str = "batches",
            progress: bool = True, check: bool = True) -> Iterator[tuple[int, object]]:
    """Yield ``(i, batch)`` for the first ``num_batches`` batches of ``data`` (all of them by default),
    each checked for NaN/Inf and moved to ``device``, under a progress bar named ``desc``.

    Raises :class:`~edgequant.errors.DataError` when ``data`` yields no batch at all.
    """
    check_iterable(data, desc)
    total = num_batches if num_batches is not None else (len(data) if hasattr(data, "__len__") else None)
    n = 0
    for i, batch in enumerate(tqdm(data, total=total, desc=desc, unit="batch", disable=not progress)):
        if num_batches is not None and i >= num_batches:
            break
        if check:
            check_finite(batch, f"{desc} batch {i}")
        yield i, (to_device(batch, device) if device is not None else batch)
        n += 1
    if n == 0:
        raise DataError(f"{desc}: the data yielded no batches; pass a non-empty iterable or DataLoader")


def reiterable(data):
    """``data`` itself if it can be iterated more than once, else its batches in a list (a generator)."""
    if data is None or hasattr(data, "__len__") or iter(data) is not data:
        return data
    return list(data)
