"""``nn.MultiheadAttention`` written out as layers and functions that edgequant quantizes one by one.

torch's ``nn.MultiheadAttention`` keeps its input projection as one packed parameter (``in_proj_weight``) and
computes everything inside ``F.multi_head_attention_forward``: to a tracer it is one opaque call, so its
projections and both attention products stayed float (torchvision's ViT). :class:`DecomposedMultiheadAttention`
computes the same thing from parts a graph sees: three ``nn.Linear`` projections (``q_proj``, ``k_proj``,
``v_proj``: each gets its own weight quantizer and output grid; queries, keys and values have different ranges),
``F.scaled_dot_product_attention`` (which the capture splits into its two products and the softmax between them,
:mod:`edgequant.graph.attention`) and ``out_proj``. ``QuantSim`` puts it in place of every
``nn.MultiheadAttention`` it can (see :func:`edgequant.graph.attention.decompose_mha`).

>>> import torch
>>> from torch import nn
>>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
>>> x = torch.randn(2, 5, 8)
>>> d = DecomposedMultiheadAttention.from_float(mha).eval()
>>> torch.allclose(mha(x, x, x)[0], d(x, x, x)[0], atol=1e-6), torch.allclose(mha(x, x, x)[1], d(x, x, x)[1], atol=1e-6)
(True, True)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..core.attention import attention_softmax


def mha_mask(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], num_heads: int,
             dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``nn.MultiheadAttention``'s two masks as one additive float mask that broadcasts over ``(batch, heads,
    queries, keys)``: a boolean mask's True means *not attended* (-inf), a float one is added; ``attn_mask`` is
    ``(L, S)`` or ``(batch * heads, L, S)``, ``key_padding_mask`` ``(batch, S)``."""
    def additive(m):
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) if m.dtype == torch.bool \
            else m.to(dtype)
    out = None
    if attn_mask is not None:
        out = additive(attn_mask)
        if out.dim() == 3:
            out = out.reshape(-1, num_heads, out.shape[-2], out.shape[-1])
    if key_padding_mask is not None:
        kp = additive(key_padding_mask)
        kp = kp.reshape(kp.shape[0], 1, 1, kp.shape[-1])
        out = kp if out is None else out + kp
    return out


fx.wrap("mha_mask")  # one graph node each: mask arithmetic on model inputs, and the float step between the products
fx.wrap("attention_softmax")


class DecomposedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (batched inputs; no ``bias_k`` / ``bias_v``, no ``add_zero_attn``) with separate
    ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` linear layers. Called like it and returns what it returns:
    ``(output, weights)``, the weights averaged over heads unless ``average_attn_weights=False``, None when
    ``need_weights=False``. Build it with :meth:`from_float`."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        kw = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> "DecomposedMultiheadAttention":
        """The same attention, weights copied (``in_proj_weight`` split in three). Raises ``ValueError`` for
        the options it does not compute (``add_bias_kv``, ``add_zero_attn``)."""
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not decomposed")
        w = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None, kdim=mha.kdim,
                  vdim=mha.vdim, batch_first=mha.batch_first, device=w.device, dtype=w.dtype)
        e = mha.embed_dim
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                if mha._qkv_same_embed_dim:
                    proj.weight.copy_(mha.in_proj_weight[i * e:(i + 1) * e])
                else:
                    proj.weight.copy_((mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)[i])
                if mha.in_proj_bias is not None:
                    proj.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        for p_new, p_old in ((new.q_proj.weight, w), (new.out_proj.weight, mha.out_proj.weight)):
            p_new.requires_grad_(p_old.requires_grad)
        for proj in (new.k_proj, new.v_proj):
            proj.weight.requires_grad_(w.requires_grad)
        return new.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True, is_causal: bool = False):
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")  # as nn.MultiheadAttention
        if not self.batch_first:  # one transpose (so one input quantizer) for a tensor passed twice, as torch does
            same_kv, same_qk = key is value, query is key
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        n, l, s, h, d = query.shape[0], query.shape[1], key.shape[1], self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(n, l, h, d).transpose(1, 2)
        k = self.k_proj(key).reshape(n, s, h, d).transpose(1, 2)
        v = self.v_proj(value).reshape(n, s, h, d).transpose(1, 2)
        mask = None
        if attn_mask is not None or key_padding_mask is not None:
            mask = mha_mask(attn_mask, key_padding_mask, h, query.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # the probabilities are an output: computed in the open
            probs = attention_softmax(torch.matmul(q, k.transpose(-2, -1)), d ** -0.5, mask)
            probs = F.dropout(probs, p, self.training)
            y = torch.matmul(probs, v)
            weights = probs.mean(1) if average_attn_weights else probs
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = self.out_proj(y.transpose(1, 2).reshape(n, l, self.embed_dim))
        return (y if self.batch_first else y.transpose(0, 1)), weights
