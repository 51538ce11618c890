"""What a rewrite did: :class:`RewriteReport` (rewritten, refused and not-selected attention
calls, each with the node, the module path and the reason), plus the helpers the passes share."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import torch.fx

# The factory's implementation names -> the op's ``backend`` argument (``factory.IMPLEMENTATIONS``
# says the same in words; kept here so fx_passes depends on registrations only).
BACKENDS = {"auto": "auto", "standard": "sdpa", "improved": "auto", "ring": "auto"}
NOT_BUILT = ("distributed", "block_sparse")


def op_backend(implementation: str) -> str:
    if implementation in NOT_BUILT:
        raise NotImplementedError(
            f"implementation {implementation!r} is not built yet; graph rewriting supports "
            f"{', '.join(map(repr, BACKENDS))}"
        )
    if implementation not in BACKENDS:
        raise ValueError(
            f"implementation must be one of {', '.join(map(repr, tuple(BACKENDS) + NOT_BUILT))}: "
            f"got {implementation!r}"
        )
    return BACKENDS[implementation]


class RewriteRefused(RuntimeError):
    """Raised in strict mode when an attention call is left as it is."""


@dataclass(frozen=True)
class Entry:
    kind: str            # "multi_head_attention_forward" or "scaled_dot_product_attention"
    node: str            # the FX node's name ("" for convert's module swaps)
    module_path: str     # e.g. "layers.0.self_attn"; "" for the top module or unknown
    reason: str = ""     # why it was refused or skipped ("" when rewritten)

    def __str__(self) -> str:
        where = self.module_path or "<top>"
        node = f" (node {self.node})" if self.node else ""  # no node: a module swap (convert)
        return f"{self.kind} at {where}{node}" + (f": {self.reason}" if self.reason else "")


@dataclass
class RewriteReport:
    rewritten: List[Entry] = field(default_factory=list)
    refused: List[Entry] = field(default_factory=list)
    skipped: List[Entry] = field(default_factory=list)  # not chosen by ``select``

    def __str__(self) -> str:
        lines = [f"rewritten {len(self.rewritten)}, refused {len(self.refused)}, skipped {len(self.skipped)}"]
        lines += [f"  rewritten: {e}" for e in self.rewritten]
        lines += [f"  refused: {e}" for e in self.refused]
        lines += [f"  skipped: {e}" for e in self.skipped]
        return "\n".join(lines)


_PREFIX = re.compile(r"^L\['[^']*'\]\.?")


def module_path(node: torch.fx.Node) -> str:
    """The attention call's module path from Dynamo's ``nn_module_stack`` metadata, without
    the ``L['self']`` prefix and with ``[i]`` spelled ``.i``; "" if unknown or the top module."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _PREFIX.sub("", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"getattr\((.*), '([^']*)'\)", r"\1.\2", path)
    return path.strip(".")


def example_shape(arg) -> Optional[tuple]:
    if isinstance(arg, torch.fx.Node):
        value = arg.meta.get("example_value", arg.meta.get("val"))
        if value is not None and hasattr(value, "shape"):
            return tuple(value.shape)
    return None


class Decider:
    """Shared bookkeeping of one pass run: selection, refusal, strict mode."""

    def __init__(self, report: RewriteReport, select: Optional[Callable[[str], bool]], strict: bool):
        self.report, self.select, self.strict = report, select, strict

    def entry(self, kind: str, node: torch.fx.Node, reason: str = "") -> Entry:
        return Entry(kind, node.name, module_path(node), reason)

    def selected(self, kind: str, node: torch.fx.Node) -> bool:
        if self.select is None or self.select(module_path(node)):
            return True
        self.report.skipped.append(self.entry(kind, node, "not chosen by select"))
        return False

    def refuse(self, kind: str, node: torch.fx.Node, reason: str) -> None:
        entry = self.entry(kind, node, reason)
        self.report.refused.append(entry)
        if self.strict:
            raise RewriteRefused(f"dilated_ops: left {entry}")

    def done(self, kind: str, node: torch.fx.Node) -> None:
        self.report.rewritten.append(self.entry(kind, node))

    def calls(self, gm: torch.fx.GraphModule, kind: str, targets, bind: Callable[[torch.fx.Node], dict],
              problem: Callable[[torch.fx.Node, dict], Optional[str]]) -> Iterator[Tuple[torch.fx.Node, dict]]:
        """The ``call_function`` nodes of ``gm`` on one of ``targets`` that ``select`` chooses
        and that can be rewritten, with their arguments as ``bind`` names them (a TypeError
        there, or a reason from ``problem``, refuses the node)."""
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in targets:
                continue
            if not self.selected(kind, node):
                continue
            try:
                a = bind(node)
            except TypeError as err:
                self.refuse(kind, node, f"arguments do not bind: {err}")
                continue
            reason = problem(node, a)
            if reason:
                self.refuse(kind, node, reason)
                continue
            yield node, a
