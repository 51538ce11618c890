"""Graph rewrites turning stock attention into the dilated ops (issue 4). Imports registrations
only. Dynamo graphs (through a compile backend): ``F.multi_head_attention_forward``
(:mod:`.mha`), ``F.scaled_dot_product_attention`` (:mod:`.sdpa`) and
``torch._transformer_encoder_layer_fwd`` (:mod:`.encoder_fastpath`).

- :func:`backend` / the registered name ``"dilated"``: ``torch.compile`` backends;
- :func:`rewrite`: the pass itself over a Dynamo ``GraphModule``;
- :func:`rewrite_exported`: the ATen-level pass over a ``torch.export`` program (:mod:`.export`);
- :func:`make_target`: the checked rewrite config (shared with ``dilated_ops.convert``);
- :class:`RewriteReport`: what was rewritten, refused (and why) or not selected.
"""
from .backend import DilatedBackend, backend, make_target, register, rewrite
from .export import rewrite_exported
from .report import Entry, RewriteRefused, RewriteReport

register()

__all__ = ["backend", "rewrite", "rewrite_exported", "make_target", "DilatedBackend", "RewriteReport", "RewriteRefused", "Entry"]
