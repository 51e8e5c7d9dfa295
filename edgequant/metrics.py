"""Fidelity of a quantized model to its float original, from their logits on the same inputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Fidelity:
    """``top1``: share of inputs with the same top-1 class; ``top5``: mean overlap of the top-5 sets;
    ``sqnr_db``: 10 log10(|ref|^2 / |ref - q|^2) over all logits; ``kl``: mean KL(p_ref || p_q);
    ``top1_confident``: top-1 agreement where the float model's top-1 probability is >= 0.5
    (``n_confident`` inputs)."""

    top1: float
    top5: float
    sqnr_db: float
    kl: float
    top1_confident: float
    n_confident: int
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def fidelity(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> Fidelity:
    if ref_logits.shape != test_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(test_logits.shape)}")
    ref, test = ref_logits.double(), test_logits.double()
    same = ref.argmax(1) == test.argmax(1)
    k = min(5, ref.shape[1])
    t5r, t5t = ref.topk(k, 1).indices, test.topk(k, 1).indices
    overlap = (t5r[:, :, None] == t5t[:, None, :]).any(2).double().mean(1)
    logp, logq = ref.log_softmax(1), test.log_softmax(1)
    kl = (logp.exp() * (logp - logq)).sum(1).mean()
    conf = logp.exp().max(1).values >= 0.5
    return Fidelity(
        top1=float(same.double().mean()),
        top5=float(overlap.mean()),
        sqnr_db=sqnr_db(ref, test),
        kl=float(kl),
        top1_confident=float(same[conf].double().mean()) if conf.any() else float("nan"),
        n_confident=int(conf.sum()),
        n=ref.shape[0],
    )
