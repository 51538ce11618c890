"""``dilated_ops.backend(...)``: a ``torch.compile`` backend that rewrites the attention calls of
each Dynamo graph (:mod:`.mha`, :mod:`.sdpa`, :mod:`.encoder_fastpath`) and hands the graph to an
inner backend; and the registered backend name ``"dilated"`` (config through
``torch.compile(..., options={...})``, which torch passes to custom backends as the keyword
``options``)."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, List, Optional, Union

import torch
import torch.fx

from .config import RewriteConfig
from .encoder_fastpath import rewrite_fast_path
from .mha import rewrite_mha
from .report import Decider, RewriteReport
from .sdpa import rewrite_sdpa


def rewrite(gm: torch.fx.GraphModule, *config, **options) -> RewriteReport:
    """Rewrites ``gm`` (a Dynamo graph) in place; returns what it did. ``config``/``options``:
    a :class:`RewriteConfig` or its fields."""
    decider = Decider(RewriteConfig.of(*config, **options))
    changed = rewrite_mha(gm, decider) + rewrite_sdpa(gm, decider) + rewrite_fast_path(gm, decider)
    if changed:
        gm.graph.lint()
        gm.recompile()
    report = decider.report
    if not (report.rewritten or report.refused or report.skipped) and _has_softmax(gm):
        warnings.warn("dilated_ops: this graph has a softmax but no attention call to rewrite (attention written "
                      "as matmul + softmax?); for Hugging Face models load them with attn_implementation=\"sdpa\", "
                      "or call F.scaled_dot_product_attention / nn.MultiheadAttention", stacklevel=2)
    return report


_SOFTMAX = ("softmax", "_softmax")
_DECODE_STEP = "a decode step against a cache"  # in refusals.sdpa_problem's reason for q shorter than k


def _has_softmax(gm: torch.fx.GraphModule) -> bool:
    return any(n.op in ("call_function", "call_method") and getattr(n.target, "__name__", n.target) in _SOFTMAX
               for n in gm.graph.nodes)


class DilatedBackend:
    """A compile backend: ``(gm, example_inputs) -> callable``. ``report`` is the last graph's
    :class:`RewriteReport`, ``reports`` all of them (one per graph Dynamo compiled)."""

    def __init__(self, config: RewriteConfig, inner: Union[str, Callable] = "inductor"):
        self.config = config
        self.inner = inner
        self.reports: List[RewriteReport] = []
        self.report: Optional[RewriteReport] = None
        self.__name__ = "dilated"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        report = rewrite(gm, self.config)
        self.report = report
        self.reports.append(report)
        decode_steps = [e for e in report.refused if _DECODE_STEP in e.reason]
        if decode_steps and any(r.rewritten for r in self.reports):
            # A prompt rewritten into dilated attention, its decode steps left dense: a model that
            # generates with attention it was not run (or trained) with, which nothing else would say.
            warnings.warn(f"dilated_ops: {len(decode_steps)} attention call(s) of this graph are decode steps against "
                          "a KV cache, left dense, while this backend rewrote other calls into dilated attention: the "
                          "model would generate with a dilated prompt and dense decode steps. For generation use "
                          "attn_implementation=\"dilated\" (Hugging Face) or LongNetLM.generate, which decode "
                          f"dilated; refused: {decode_steps[0]}", stacklevel=2)
        inner = torch._dynamo.lookup_backend(self.inner) if isinstance(self.inner, str) else self.inner
        return inner(gm, example_inputs)


def backend(*config, inner: Union[str, Callable] = "inductor", **options) -> DilatedBackend:
    """A ``torch.compile`` backend turning stock attention into dilated attention::

        torch.compile(model, backend=dilated_ops.backend([2048, 4096], [1, 2]))

    Args:
        config, options: a :class:`RewriteConfig`, or its fields (``segment_lengths,
            dilation_rates, mode="groups", implementation="auto", select=None,
            strict=False``): what to rewrite into ("auto" is the variant that picks kernels per
            device at run time), ``select(module_path) -> bool`` to choose the calls (module
            paths as in ``named_modules``, e.g. ``"layers.0.self_attn"``; "" for the top
            module), ``strict=True`` to raise :class:`RewriteRefused` on a call it cannot
            rewrite.
        inner: a backend name (``torch._dynamo.lookup_backend``) or callable that compiles
            the rewritten graph.

    Returns:
        a :class:`DilatedBackend`; its ``report`` / ``reports`` say what each graph's rewrite did.
    """
    return DilatedBackend(RewriteConfig.of(*config, **options), inner)


_OPTION_KEYS = tuple(f.name for f in dataclasses.fields(RewriteConfig)) + ("inner",)


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
