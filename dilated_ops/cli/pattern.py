"""``dilated-ops inspect``: which keys each query sees, drawn from the package's own segment
math (:func:`dilated_ops.kernels.segments.plan` and :func:`segment_views` applied to position
indices), with its density and FLOP count against dense attention."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..kernels.segments import head_groups, plan, segment_views


def head_masks(n: int, num_heads: int, segment_lengths, dilation_rates, mode: str = "groups",
               is_causal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(allowed, computed)``: ``allowed`` ``(heads, n, n)`` bool, query i of head h attends to
    key j (union over branches); ``computed`` ``(heads, n, n)`` int, how many branches compute
    the score (i, j) (longnet mode may compute one pair in several branches)."""
    computed = torch.zeros(num_heads, n, n, dtype=torch.int8)
    positions = torch.arange(n).view(1, n, 1).expand(1, n, num_heads)
    heads = torch.arange(num_heads).view(1, 1, num_heads).expand(1, n, num_heads)
    for call in plan(num_heads, tuple(segment_lengths), tuple(dilation_rates), mode):
        for pos_piece, head_piece in zip(segment_views(positions, call), segment_views(heads, call)):
            # (1, segments, len, call_heads): each segment is one attention among its positions.
            sel = pos_piece[0, :, :, 0]  # (segments, len)
            length = sel.shape[1]
            keep = torch.ones(length, length, dtype=torch.bool)
            if is_causal:
                keep = torch.tril(keep)
            rows = sel.unsqueeze(2).expand(-1, -1, length)[:, keep]
            cols = sel.unsqueeze(1).expand(-1, length, -1)[:, keep]
            for h in head_piece[0, 0, 0].tolist():
                computed[h].index_put_((rows.reshape(-1), cols.reshape(-1)),
                                       torch.ones((), dtype=torch.int8), accumulate=True)
    return computed > 0, computed


def _grid(mask: torch.Tensor, max_cells: int) -> List[str]:
    """Rows of characters; one cell per query/key when ``n <= max_cells`` ('#' attends, '.' not),
    else a cell per block: '#' all pairs, '+' some, '.' none."""
    n = mask.shape[0]
    if n <= max_cells:
        return ["".join("#" if x else "." for x in row) for row in mask.tolist()]
    cells = max_cells
    edges = [round(i * n / cells) for i in range(cells + 1)]
    rows = []
    for a, b in zip(edges[:-1], edges[1:]):
        chars = []
        for c, d in zip(edges[:-1], edges[1:]):
            block = mask[a:b, c:d]
            chars.append("#" if bool(block.all()) else "+" if bool(block.any()) else ".")
        rows.append("".join(chars))
    return rows


def describe(n: int, num_heads: int, head_dim: int, segment_lengths, dilation_rates, mode: str,
             is_causal: bool, max_cells: int = 64, per_head: bool = True) -> str:
    allowed, computed = head_masks(n, num_heads, segment_lengths, dilation_rates, mode, is_causal)
    dense_pairs = n * (n + 1) // 2 if is_causal else n * n
    lines = [f"dilated attention pattern: seq_len {n}, heads {num_heads}, head_dim {head_dim}, "
             f"segment_lengths {list(segment_lengths)}, dilation_rates {list(dilation_rates)}, "
             f"mode {mode}, causal {is_causal}"]
    if mode == "groups":
        groups = head_groups(num_heads, len(segment_lengths))
        for i, ((lo, hi), w, r) in enumerate(zip(groups, segment_lengths, dilation_rates)):
            lines.append(f"  group {i}: heads {lo}..{hi - 1} use branch (w={w}, r={r}) at offset {i % r}")
    else:
        for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
            lines.append(f"  branch {i} (w={w}, r={r}): head j at offset j % {r}")
    scale = "one cell per query/key" if n <= max_cells else f"one cell per ~{n / max_cells:.1f}x{n / max_cells:.1f} block ('+': some pairs)"
    lines.append(f"rows: queries 0..{n - 1}, columns: keys 0..{n - 1}; '#' attends, '.' does not ({scale})")
    # Distinct per-head patterns, in head order, then the union over heads.
    patterns: Dict[bytes, List[int]] = {}
    for h in range(num_heads):
        patterns.setdefault(allowed[h].numpy().tobytes(), []).append(h)
    blocks = []
    if per_head:
        for key, hs in patterns.items():
            m = allowed[hs[0]]
            blocks.append((f"heads {_ranges(hs)}", m))
    union = allowed.any(0)
    blocks.append(("union over heads (a key any head of the query sees)", union))
    for title, m in blocks:
        pairs = int(m.sum())
        lines.append("")
        lines.append(f"{title}: {pairs} of {dense_pairs} pairs, density {pairs / dense_pairs:.2%}")
        lines.extend("  " + row for row in _grid(m, max_cells))
    uncovered = int((~allowed.any(2)).sum())
    flops = 4 * head_dim * int(computed.sum())
    dense = 4 * head_dim * num_heads * dense_pairs
    lines.append("")
    lines.append(f"attended (query, key, head) triples: {int(allowed.sum())} of {num_heads * dense_pairs} "
                 f"(density {int(allowed.sum()) / (num_heads * dense_pairs):.2%})")
    lines.append(f"(query, head) rows with no key: {uncovered} of {n * num_heads}")
    lines.append(f"attention FLOPs (QK^T and PV, forward): {flops:,} vs dense {dense:,} "
                 f"= {flops / dense:.2%} ({dense / max(flops, 1):.1f}x fewer)")
    return "\n".join(lines)


def _ranges(hs: List[int]) -> str:
    out, start, prev = [], hs[0], hs[0]
    for h in hs[1:] + [None]:
        if h is not None and h == prev + 1:
            prev = h
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if h is not None:
            start = prev = h
    return ",".join(out)
