"""``dilated_ops.backend(...)``: a ``torch.compile`` backend that rewrites the attention calls of
each Dynamo graph (:mod:`.mha`, :mod:`.sdpa`) and hands the graph to an inner backend; and the
registered backend name ``"dilated"`` (config through ``torch.compile(..., options={...})``,
which torch passes to custom backends as the keyword ``options``)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.fx

from ._emit import Target
from .encoder_fastpath import rewrite_fast_path
from .mha import rewrite_mha
from .report import Decider, RewriteReport, op_backend
from .sdpa import rewrite_sdpa
from .. import _checks


def rewrite(
    gm: torch.fx.GraphModule,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str = "groups",
    implementation: str = "auto",
    select: Optional[Callable[[str], bool]] = None,
    strict: bool = False,
) -> RewriteReport:
    """Rewrites ``gm`` (a Dynamo graph) in place; returns what it did."""
    target = make_target(segment_lengths, dilation_rates, mode, implementation)
    report = RewriteReport()
    decider = Decider(report, select, strict)
    changed = (rewrite_mha(gm, target, decider) + rewrite_sdpa(gm, target, decider)
               + rewrite_fast_path(gm, target, decider))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return report


def make_target(segment_lengths, dilation_rates, mode="groups", implementation="auto") -> Target:
    """The checked config every pass (and ``dilated_ops.convert``) rewrites to; ValueError /
    TypeError name the bad argument."""
    segment_lengths = _checks.check_int_list("segment_lengths", list(segment_lengths))
    dilation_rates = _checks.check_int_list("dilation_rates", list(dilation_rates))
    _checks.check_segments(segment_lengths, dilation_rates)
    _checks.check_mode(mode)
    return Target(tuple(segment_lengths), tuple(dilation_rates), mode, op_backend(implementation))


class DilatedBackend:
    """A compile backend: ``(gm, example_inputs) -> callable``. ``report`` is the last graph's
    :class:`RewriteReport`, ``reports`` all of them (one per graph Dynamo compiled)."""

    def __init__(self, segment_lengths, dilation_rates, mode="groups", implementation="auto",
                 inner: Union[str, Callable] = "inductor", select=None, strict=False):
        self.target = make_target(segment_lengths, dilation_rates, mode, implementation)
        self.config = dict(segment_lengths=list(segment_lengths), dilation_rates=list(dilation_rates),
                           mode=mode, implementation=implementation)
        self.inner = inner
        self.select, self.strict = select, strict
        self.reports: List[RewriteReport] = []
        self.report: Optional[RewriteReport] = None
        self.__name__ = "dilated"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        report = rewrite(gm, select=self.select, strict=self.strict, **self.config)
        self.report = report
        self.reports.append(report)
        inner = torch._dynamo.lookup_backend(self.inner) if isinstance(self.inner, str) else self.inner
        return inner(gm, example_inputs)


def backend(segment_lengths, dilation_rates, mode="groups", implementation="auto", inner="inductor",
            select=None, strict=False) -> DilatedBackend:
    """A ``torch.compile`` backend turning stock attention into dilated attention.

    ``implementation``: the factory's name ("auto", "standard", "improved", "ring"), mapped to
    the op's ``backend`` argument; ``inner``: a backend name (``torch._dynamo.lookup_backend``) or
    callable that compiles the rewritten graph; ``select(module_path) -> bool`` chooses the calls
    to rewrite (module paths as in ``named_modules``, e.g. ``"layers.0.self_attn"``; "" for
    the top module); ``strict=True`` raises :class:`RewriteRefused` on a call it cannot rewrite.
    """
    return DilatedBackend(segment_lengths, dilation_rates, mode, implementation, inner, select, strict)


_OPTION_KEYS = ("segment_lengths", "dilation_rates", "mode", "implementation", "inner", "select", "strict")


def _registered(gm, example_inputs, options=None, mode=None):
    """``torch.compile(model, backend="dilated", options={"segment_lengths": [...], ...})``."""
    options = dict(options or {})
    unknown = set(options) - set(_OPTION_KEYS)
    if unknown or "segment_lengths" not in options or "dilation_rates" not in options:
        raise TypeError(
            "backend 'dilated' needs options={'segment_lengths': [...], 'dilation_rates': [...]} "
            f"and takes {', '.join(_OPTION_KEYS)}; got {sorted(options)}"
        )
    if mode not in (None, "default"):
        raise TypeError(f"backend 'dilated' takes no mode= (got {mode!r}); pass options instead")
    return backend(**options)(gm, example_inputs)


def register() -> None:
    if "dilated" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(_registered, name="dilated")
