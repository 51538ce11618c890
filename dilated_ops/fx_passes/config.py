""":class:`RewriteConfig`: what the graph rewrites and ``convert`` turn attention into (segments,
rates, mode, the variant), which calls (``select``) and what a refusal does (``strict``). The
one configuration taken by :func:`dilated_ops.backend`, :func:`dilated_ops.convert`,
:func:`dilated_ops.export`, :func:`dilated_ops.rewrite_exported` and
:func:`dilated_ops.rewrite_symbolic`, each of which also accepts its fields as arguments."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from .. import _checks, variants
from ..config import SparsePatternConfig


@dataclass(frozen=True)
class RewriteConfig:
    """Args:
        segment_lengths: the branches' ``w_i`` (SPEC section 1).
        dilation_rates: the branches' ``r_i``.
        mode: ``"groups"`` or ``"longnet"``.
        implementation: a factory name of a built variant (:mod:`dilated_ops.variants`).
            "auto" is "improved" here: its op picks the kernels per device when it runs, so a
            rewritten or exported graph runs the fastest kernels wherever it is loaded.
        select: ``select(module_path) -> bool`` chooses the calls to rewrite (module paths as
            in ``named_modules``, e.g. ``"layers.0.self_attn"``; "" for the top module); None
            rewrites every call it can.
        strict: raise :class:`~dilated_ops.fx_passes.RewriteRefused` on a call left as it is,
            instead of listing it in the report.
        pattern: the :class:`~dilated_ops.SparsePatternConfig` of ``implementation=
            "block_sparse"`` (None: its defaults); a named pattern, not ``"mask"``.

    ValueError / TypeError name a bad field; NotImplementedError an implementation not built.
    """

    segment_lengths: Tuple[int, ...]
    dilation_rates: Tuple[int, ...]
    mode: str = "groups"
    implementation: str = "auto"
    select: Optional[Callable[[str], bool]] = None
    strict: bool = False
    pattern: Optional[SparsePatternConfig] = None

    def __post_init__(self):
        segment_lengths = _checks.check_int_list("segment_lengths", self.segment_lengths)
        dilation_rates = _checks.check_int_list("dilation_rates", self.dilation_rates)
        _checks.check_segments(segment_lengths, dilation_rates)
        _checks.check_mode(self.mode)
        if self.select is not None and not callable(self.select):
            raise TypeError(f"select must be a callable (module_path) -> bool or None: got {self.select!r}")
        _checks.check_bool("strict", self.strict)
        object.__setattr__(self, "segment_lengths", tuple(segment_lengths))
        object.__setattr__(self, "dilation_rates", tuple(dilation_rates))
        variant = self.variant  # an unknown or unbuilt implementation fails here, at construction
        if self.pattern is not None:
            if "sparse_config" not in variant.options:
                raise ValueError(f"pattern is read by implementation 'block_sparse' only: got implementation "
                                 f"{self.implementation!r} and pattern {self.pattern!r}")
            if not isinstance(self.pattern, SparsePatternConfig):
                raise TypeError(f"pattern must be a SparsePatternConfig or None: got {type(self.pattern).__name__}")
            if self.pattern.pattern_type == "mask":
                raise ValueError("pattern.pattern_type must name a pattern in a rewrite: got 'mask' (a graph has "
                                 "no block mask to pass)")

    @property
    def options(self) -> dict:
        """The variant's own options (``Variant.options``) this config sets."""
        return {"sparse_config": self.pattern} if self.pattern is not None else {}

    @property
    def variant(self) -> variants.Variant:
        return variants.get("improved" if self.implementation == "auto" else self.implementation)

    @property
    def num_groups(self) -> int:
        return len(self.segment_lengths)

    @classmethod
    def of(cls, *args, **kwargs) -> "RewriteConfig":
        """A config from ``(config)``, ``(config, **overrides)`` or the fields themselves
        (positional or keyword), as the entry points take it."""
        if args and isinstance(args[0], RewriteConfig):
            if len(args) > 1:
                raise TypeError(f"after a RewriteConfig, options go as keywords: got {len(args) - 1} more positional")
            return dataclasses.replace(args[0], **kwargs) if kwargs else args[0]
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"unknown rewrite option(s) {', '.join(map(repr, unknown))}; known: {', '.join(names)}")
        return cls(*args, **kwargs)
