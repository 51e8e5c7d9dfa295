"""``edgequant.qat.finetune``: the training loop for those who do not want to write one.

Distillation from the float model by default (most users have unlabelled data only), or the user's
loss on labelled batches; a progress bar, periodic evaluation, checkpoints to resume from, and a
report (loss and SQNR against the teacher per step, a plot when matplotlib is installed).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..batches import check_iterable, device_of, evaluating, model_input, run_batch, to_device
from ..errors import DataError
from ..io.encodings import atomic_write_text, file_mode
from ..metrics import sqnr_db
from .prepare import project_, quantizer_parameters


@dataclass
class QATReport:
    """What :func:`finetune` did: per-step ``loss``, ``sqnr_db`` (the sim's output against the teacher's on
    the training batch; empty without a teacher) and ``seconds`` (wall time since the start), and
    ``evals``: ``(step, eval_fn(sim))`` pairs."""
    steps: int = 0
    loss: list[float] = field(default_factory=list)
    sqnr_db: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int = 0

    def __str__(self) -> str:
        if not self.loss:
            return "QAT: no steps"
        k = max(1, min(20, len(self.loss) // 10))
        first, last = sum(self.loss[:k]) / k, sum(self.loss[-k:]) / k
        out = f"QAT: {self.steps} steps in {self.seconds[-1]:.1f} s, loss {first:.4g} -> {last:.4g}"
        if self.sqnr_db:
            out += f", SQNR vs teacher {sum(self.sqnr_db[:k]) / k:.2f} -> {sum(self.sqnr_db[-k:]) / k:.2f} dB"
        if self.evals:
            out += f", eval {self.evals[0][1]:.4g} (step {self.evals[0][0]}) -> {self.evals[-1][1]:.4g} (step {self.evals[-1][0]})"
        return out

    def save(self, folder) -> Path:
        """Write ``report.json`` and, when matplotlib is installed, ``qat.png`` (loss and SQNR per step)
        into ``folder`` (created); returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "report.json", json.dumps(asdict(self), indent=1))
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # the plot is optional: pip install 'edgequant[report]'
            return folder
        fig, axes = plt.subplots(1, 2 if self.sqnr_db else 1, figsize=(10 if self.sqnr_db else 5, 3.5), squeeze=False)
        axes[0][0].plot(range(1, len(self.loss) + 1), self.loss, lw=0.8)
        axes[0][0].set(xlabel="step", ylabel="loss", yscale="log" if min(self.loss, default=1) > 0 else "linear")
        if self.sqnr_db:
            axes[0][1].plot(range(1, len(self.sqnr_db) + 1), self.sqnr_db, lw=0.8)
            axes[0][1].set(xlabel="step", ylabel="SQNR vs teacher (dB)")
        fig.tight_layout()
        tmp = folder / ".qat.png.tmp"
        fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        os.chmod(tmp, file_mode())
        os.replace(tmp, folder / "qat.png")
        return folder


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on softmax(logits / T), times T^2, for 2-D logits; MSE on other outputs
    (features, embeddings)."""
    if student.ndim == 2 and student.shape[1] > 1:
        t = temperature
        return F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1),
                        reduction="batchmean", log_target=True) * (t * t)
    return F.mse_loss(student.float(), teacher.float())


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, dict):
        return next(v for v in out.values() if torch.is_tensor(v))
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return next(v for v in out if torch.is_tensor(v))


def _cycle(data, steps: int, skip: int = 0):
    """``steps`` batches of ``data``, starting over when it ends, after skipping ``skip`` batches (a resumed
    run continues where the checkpointed one was)."""
    n, seen = 0, 0
    while n < steps:
        got = False
        for batch in data:
            got = True
            seen += 1
            if seen <= skip:
                continue
            yield batch
            n += 1
            if n >= steps:
                return
        if not got:
            raise DataError("the training data yielded no batch")


def _resolve_steps(data, steps, epochs) -> int:
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if steps is None:
        if not hasattr(data, "__len__"):
            raise ValueError("data has no len(): give steps=N (epochs needs data whose length is known)")
        steps = len(data) * (1 if epochs is None else epochs)
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return int(steps)


def _optimizer(sim, lr, quantizer_lr, weight_decay):
    qparams = quantizer_parameters(sim)
    ids = {id(p) for p in qparams}
    weights = [p for p in sim.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay}]
    if qparams:
        groups.append({"params": qparams, "lr": quantizer_lr if quantizer_lr is not None else lr / 10, "weight_decay": 0.0})
    return torch.optim.Adam(groups)


def _scheduler(opt, schedule, steps):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    if callable(schedule):
        return schedule(opt)
    raise ValueError(f"schedule must be 'cosine', 'constant' or a function optimizer -> scheduler, got {schedule!r}")


def _teacher(sim, teacher, loss):
    if isinstance(teacher, str):
        if teacher != "float":
            raise ValueError(f"teacher must be 'float', a model or None, got {teacher!r}")
        if loss is not None and loss not in ("kl", "mse"):
            return None  # the user's own loss on labelled data needs no teacher
        teacher = sim.float_model()
    if teacher is not None and device_of(teacher) != sim.device:
        teacher = copy.deepcopy(teacher).to(sim.device)  # the user's model stays where it is
    return teacher


def _loss_fn(loss, temperature, teacher) -> Callable:
    if callable(loss):
        return lambda out, batch, ref: loss(out, batch)
    if teacher is None:
        raise ValueError("without a teacher, pass loss=fn(output, batch) -> scalar (e.g. cross-entropy on labels)")
    if loss in (None, "kl"):
        return lambda out, batch, ref: distillation_loss(_first_tensor(out), _first_tensor(ref), temperature)
    if loss == "mse":
        return lambda out, batch, ref: F.mse_loss(_first_tensor(out).float(), _first_tensor(ref).float())
    raise ValueError(f"loss must be 'kl', 'mse' or a function (output, batch) -> scalar, got {loss!r}")


class _Checkpoint:
    """Saves and restores ``(step, sim, optimizer, scheduler, report)`` in one file, atomically."""

    def __init__(self, path, every: Optional[int], writer: bool = True):
        self.path = Path(path) if path is not None else None
        self.every, self.writer = every, writer  # under torch.distributed only rank 0 writes

    def load(self, sim, opt, sched, report: QATReport) -> int:
        if self.path is None or not self.path.exists():
            return 0
        try:
            state = torch.load(self.path, map_location=sim.device, weights_only=False)
            sim.load_state_dict(state["sim"])
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot resume from checkpoint {self.path} ({type(e).__name__}: {e}); it was written for "
                             "another sim or is damaged: delete it to start over") from None
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        for k, v in state["report"].items():
            setattr(report, k, v)
        report.resumed_from = state["step"]
        return state["step"]

    def maybe_save(self, step: int, total: int, sim, opt, sched, report: QATReport) -> None:
        if self.path is None or not self.writer or not (step == total or (self.every and step % self.every == 0)):
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save({"step": step, "sim": sim.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "report": asdict(report)}, tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, self.path)


def _step(sim, batch, teacher, loss_fn, augment, forward_fn, n_positional):
    """One forward/backward: ``(loss, SQNR against the teacher or None)``."""
    if augment is not None:
        batch = _with_input(batch, augment(model_input(batch)))
    ref = None
    if teacher is not None:
        with torch.no_grad():
            ref = run_batch(teacher, batch, n_positional, forward_fn)
    out = run_batch(sim, batch, n_positional, forward_fn)
    value = loss_fn(out, batch, ref)
    if not torch.is_tensor(value) or value.ndim != 0:
        raise ValueError(f"the loss must return a scalar tensor, got {type(value).__name__}"
                         f"{'' if not torch.is_tensor(value) else tuple(value.shape)}")
    if not torch.isfinite(value):
        raise DataError(f"the QAT loss is {value.item()}: lower lr, or check the data for NaN/Inf")
    value.backward()
    sq = sqnr_db(_first_tensor(ref).detach(), _first_tensor(out).detach()) if ref is not None else None
    return float(value.detach()), sq


def _with_input(batch, x):
    if isinstance(batch, (tuple, list)):
        return type(batch)([x, *batch[1:]])
    return x


def finetune(sim, data, *, steps: Optional[int] = None, epochs: Optional[int] = None,
             loss: Union[str, Callable, None] = None, teacher: Union[str, nn.Module, None] = "float",
             temperature: float = 1.0, lr: float = 1e-5, quantizer_lr: Optional[float] = None,
             weight_decay: float = 0.0, schedule="cosine", augment: Optional[Callable] = None,
             forward_fn: Optional[Callable] = None, eval_fn: Optional[Callable] = None, eval_every: Optional[int] = None,
             checkpoint=None, checkpoint_every: Optional[int] = None, report_dir=None, dropout: bool = False,
             progress: bool = True) -> QATReport:
    """Fine-tune ``sim`` (quantization-aware training) on ``data``; returns a :class:`QATReport`.

    Args:
        sim: a calibrated :class:`~edgequant.sim.QuantSim`; make its grids trainable first with
            :func:`~edgequant.qat.prepare_qat` (else only the weights train, on fixed ranges). Under
            ``torchrun``, the sim wrapped in ``DistributedDataParallel`` (each process passes its shard of
            the data; gradients of weights, scales and offsets are averaged; rank 0 writes checkpoints and
            the report).
        data: re-iterable batches (a tensor, a dict of keyword inputs, or a tuple whose first item is the
            input and the rest e.g. labels); it is cycled for ``steps`` (or ``epochs`` passes).
        loss: ``"kl"`` (default: distillation from ``teacher``'s logits; MSE on outputs that are not 2-D
            logits), ``"mse"``, or ``fn(output, batch) -> scalar`` with labels from the batch.
        teacher: ``"float"`` (the sim's float model as it is now, frozen), a model, or ``None``.
        temperature: of the distillation softmax.
        lr: Adam's learning rate for the weights; ``quantizer_lr`` for the learned scales and offsets
            (default ``lr / 10``: Adam's steps do not shrink with the gradient, and steps as large as the
            weights' unsettle small scales; MNIST-5k W3A3 distillation at lr 1e-3: 0.63 accuracy with
            ``quantizer_lr=lr``, 0.972 with ``lr / 10``, FP32 0.984). ``schedule``: ``"cosine"`` (to zero at the last step), ``"constant"``, or
            ``fn(optimizer) -> scheduler``.
        augment: ``fn(inputs) -> inputs`` applied to each batch (the teacher sees the same inputs).
        eval_fn: ``fn(sim) -> float``, called (in eval mode) every ``eval_every`` steps and at the end.
        checkpoint: a file: written every ``checkpoint_every`` steps and at the end (atomically); when
            it exists at the start, training resumes from it.
        report_dir: a folder for ``report.json`` and the loss / SQNR plot.
        dropout: keep dropout active while training. Off by default: fine-tuning a trained model towards
            its own float outputs, dropout only adds noise the teacher does not have (a MobileNetV2 sim's
            SQNR against the teacher on its training batches stayed at 8-9 dB with it).

    The sim trains in train mode (dropout off unless ``dropout=True``) and is left in eval mode; every learned grid stays on its constraints
    after each step (integer zero points, positive scales), so it exports at any point.
    """
    check_iterable(data, "data")
    net, sim = sim, _unwrapped(sim)  # a DistributedDataParallel wrapper runs the steps; the sim inside holds the rest
    total = _resolve_steps(data, steps, epochs)
    teacher = _teacher(sim, teacher, loss)
    loss_fn = _loss_fn(loss, temperature, teacher)
    opt = _optimizer(sim, lr, quantizer_lr, weight_decay)
    sched = _scheduler(opt, schedule, total)
    report = QATReport()
    ckpt = _Checkpoint(checkpoint, checkpoint_every, writer=_rank() == 0)
    start = ckpt.load(sim, opt, sched, report)
    t0 = time.perf_counter() - (report.seconds[-1] if report.seconds else 0.0)
    skip = start % len(data) if hasattr(data, "__len__") and len(data) else start
    bar = tqdm(total=total, initial=start, desc="QAT", unit="step", disable=not progress or _rank() != 0)
    with evaluating(teacher) if teacher is not None else contextlib.nullcontext():  # its modes come back as they were
        _loop(net, sim, data, total, start, skip, teacher, loss_fn, augment, forward_fn, opt, sched, report, ckpt,
              eval_fn, eval_every, dropout, t0, bar)
    if report_dir is not None and _rank() == 0:
        report.save(report_dir)
    return report


def _loop(net, sim, data, total, start, skip, teacher, loss_fn, augment, forward_fn, opt, sched, report, ckpt,
          eval_fn, eval_every, dropout, t0, bar) -> None:
    device = sim.device
    try:
        for step, batch in enumerate(_cycle(data, total - start, skip), start=start + 1):
            _train_mode(sim, dropout)
            opt.zero_grad(set_to_none=True)
            value, sq = _step(net, to_device(batch, device), teacher, loss_fn, augment, forward_fn, sim._n_positional)
            opt.step()
            sched.step()
            project_(sim)
            report.steps = step
            report.loss.append(value)
            report.seconds.append(time.perf_counter() - t0)
            if sq is not None:
                report.sqnr_db.append(sq)
            if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == total):
                t_eval = time.perf_counter()
                sim.eval()
                report.evals.append((step, float(eval_fn(sim))))
                t0 += time.perf_counter() - t_eval  # report.seconds is training time
            ckpt.maybe_save(step, total, sim, opt, sched, report)
            bar.update(1)
            bar.set_postfix_str(f"loss {value:.4g}" + (f", SQNR {sq:.1f} dB" if sq is not None else ""))
    finally:
        bar.close()
        sim.eval()


def _train_mode(sim, dropout: bool) -> None:
    sim.train()
    if not dropout:
        for m in sim.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()


def _unwrapped(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0
