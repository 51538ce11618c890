"""The multi-head attention block, written once: in-projection, heads, attention, merge,
optional norm, out-projection. The modules call it on tensors; ``convert``'s module calls it on
``nn.MultiheadAttention``'s own parameters; the graph rewrites call it on ``torch.fx.Proxy``
values, which records the same computation as graph nodes (:mod:`dilated_ops.fx_passes._emit`).

Below the API and the graph passes: it imports nothing of ours.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor

Project = Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def attention_block(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    project: Project,
    attend: Attend,
    out_proj: Callable[[Tensor], Tensor],
    num_heads: int,
    head_dim: int,
    *,
    seq_first: bool = False,
    norm: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """``out_proj(norm(merge(attend(split(project(query, key, value))))))``.

    Args:
        query, key, value: ``(batch, seq, embed)``, or ``(seq, batch, embed)`` when
            ``seq_first``.
        project: ``(query, key, value) -> (q, k, v)``, each ``(..., num_heads * head_dim)``.
        attend: ``(q, k, v) -> out``, all ``(batch, seq, heads, head_dim)``.
        out_proj: ``(..., num_heads * head_dim) -> (..., embed)``.
        norm: applied to the merged heads before ``out_proj`` (MAGNETO's sub-LN), or None.

    Returns:
        ``(batch, seq, embed)``, or ``(seq, batch, embed)`` when ``seq_first``.
    """
    projected = project(query, key, value)
    q, k, v = (t.unflatten(-1, (num_heads, head_dim)) for t in projected)
    if seq_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    out = attend(q, k, v)
    if seq_first:
        out = out.transpose(0, 1)
    out = out.flatten(-2)
    if norm is not None:
        out = norm(out)
    return out_proj(out)


def packed_in_projection(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    separate: Optional[Sequence[Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``nn.MultiheadAttention``'s in-projection: ``weight`` ``(3 * embed, embed)`` packs the
    q, k, v weights (one matmul for self-attention), or ``separate`` gives them apart (MHA's
    ``q/k/v_proj_weight``, used when ``kdim``/``vdim`` differ from ``embed_dim``); ``bias``
    ``(3 * embed,)`` packs the biases either way."""
    # Indexed, not unpacked: on torch.fx.Proxy values a chunk's length is unknown.
    if separate is None and query is key and key is value:
        qkv = F.linear(query, weight, bias).chunk(3, dim=-1)
        return qkv[0], qkv[1], qkv[2]
    if separate is None:
        w = weight.chunk(3)
        separate = (w[0], w[1], w[2])
    b = bias.chunk(3) if bias is not None else (None, None, None)
    return tuple(F.linear(x, w, b[i]) for i, (x, w) in enumerate(zip((query, key, value), separate)))
