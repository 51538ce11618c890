"""Emits ``torch.ops.dilated.dilated_attention`` into an FX graph (q, k, v ``(batch, seq, heads,
head_dim)`` nodes in, the ``out`` node back)."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.fx
import torch.nn.functional as F

from ..registrations import dilated_attention as _registrations  # noqa: F401 (registers the op)


@dataclass(frozen=True)
class Target:
    segment_lengths: Tuple[int, ...]
    dilation_rates: Tuple[int, ...]
    mode: str
    backend: str  # the op's: "auto" or "sdpa"


def emit_dilated(graph: torch.fx.Graph, target: Target, q, k, v, is_causal: bool, dropout_p: float,
                 scale=None):
    seed = None
    if dropout_p > 0.0:
        # As dilated_ops.dilated_attention does: a CPU int64 seed from the default generator.
        seed = graph.call_function(torch.randint, (0, 2**62, ()), {"dtype": torch.int64})
    pair = graph.call_function(
        torch.ops.dilated.dilated_attention.default,
        (q, k, v, list(target.segment_lengths), list(target.dilation_rates), target.mode,
         bool(is_causal), scale, float(dropout_p), seed, target.backend),
    )
    return graph.call_function(operator.getitem, (pair, 0))


def emit_packed_in_proj(graph: torch.fx.Graph, x, weight, bias):
    """``F.linear(x, weight, bias).chunk(3, dim=-1)``: the q, k, v projections (embed last)."""
    qkv = graph.call_function(F.linear, (x, weight, bias))
    chunks = graph.call_function(torch.chunk, (qkv, 3), {"dim": -1})
    return [graph.call_function(operator.getitem, (chunks, i)) for i in range(3)]


def heads_problem(target: Target, num_heads: int):
    """Why the op would reject ``num_heads`` heads for this config (None if it would not)."""
    groups = len(target.segment_lengths)
    if target.mode == "groups" and num_heads < groups:
        return f"{num_heads} heads cannot cover {groups} dilation groups (mode 'groups')"
    return None
