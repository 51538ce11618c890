"""What a rewrite did: :class:`RewriteReport` (rewritten, refused and not-selected attention
calls, each with the node, the module path and the reason), and :class:`Decider`, the one place
where ``select``, refusals and ``strict`` are applied, for graph nodes and for module swaps."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import torch.fx

from .config import RewriteConfig


class RewriteRefused(RuntimeError):
    """Raised in strict mode when an attention call is left as it is."""


@dataclass(frozen=True)
class Entry:
    kind: str            # "multi_head_attention_forward", "scaled_dot_product_attention", ...
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

    def extend(self, other: "RewriteReport", entry: Callable[[Entry], Entry] = lambda e: e) -> None:
        """Adds ``other``'s entries, each passed through ``entry``."""
        for mine, theirs in ((self.rewritten, other.rewritten), (self.refused, other.refused),
                             (self.skipped, other.skipped)):
            mine.extend(entry(e) for e in theirs)


# L['self'] (a module compiled as self), L['args'][0] or L['fn'] (torch.compile(model): the
# model as an argument), G['...'] (a global module)
_PREFIX = re.compile(r"^[LG]\['[^']*'\](\[\d+\])?\.?")


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


class Decider:
    """One rewrite run's bookkeeping: asks ``config.select``, records refusals (raising
    :class:`RewriteRefused` when ``config.strict``) and rewrites in ``report``."""

    def __init__(self, config: RewriteConfig, report: Optional[RewriteReport] = None):
        self.config = config
        self.report = RewriteReport() if report is None else report

    def selected(self, kind: str, path: str, node: str = "") -> bool:
        if self.config.select is None or self.config.select(path):
            return True
        self.report.skipped.append(Entry(kind, node, path, "not chosen by select"))
        return False

    def refuse(self, kind: str, path: str, reason: str, node: str = "") -> None:
        entry = Entry(kind, node, path, reason)
        self.report.refused.append(entry)
        if self.config.strict:
            raise RewriteRefused(f"dilated_ops: left {entry}")

    def done(self, kind: str, path: str, node: str = "") -> None:
        self.report.rewritten.append(Entry(kind, node, path))

    def consider(self, kind: str, path: str, problem: Callable[[], Optional[str]], node: str = "") -> bool:
        """True when the call at ``path`` is selected and ``problem()`` finds nothing (the
        caller then rewrites it and calls :meth:`done`); else it is recorded as skipped or
        refused."""
        if not self.selected(kind, path, node):
            return False
        reason = problem()
        if reason:
            self.refuse(kind, path, reason, node)
            return False
        return True

    def calls(self, gm: torch.fx.GraphModule, kind: str, targets, bind: Callable[[torch.fx.Node], dict],
              problem: Callable[[torch.fx.Node, dict], Optional[str]]) -> Iterator[Tuple[torch.fx.Node, dict]]:
        """The ``call_function`` nodes of ``gm`` on one of ``targets`` that ``select`` chooses
        and that can be rewritten, with their arguments as ``bind`` names them (a TypeError
        there, or a reason from ``problem``, refuses the node)."""
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in targets:
                continue
            bound = {}

            def check(node=node):
                try:
                    bound.update(bind(node))
                except TypeError as err:
                    return f"arguments do not bind: {err}"
                return problem(node, bound)

            if self.consider(kind, module_path(node), check, node.name):
                yield node, bound

    def node_done(self, kind: str, node: torch.fx.Node) -> None:
        self.done(kind, module_path(node), node.name)
