"""Graph rewrites turning stock attention into the dilated ops (issue 4). Imports the variant
table, the attention block and the ops below it, never the API. Dynamo graphs (through a
compile backend): ``F.multi_head_attention_forward`` (:mod:`.mha`),
``F.scaled_dot_product_attention`` (:mod:`.sdpa`) and ``torch._transformer_encoder_layer_fwd``
(:mod:`.encoder_fastpath`); the refusal rules of each in :mod:`.refusals`.

- :class:`RewriteConfig`: what to rewrite into, ``select``, ``strict`` (every entry point's);
- :func:`backend` / the registered name ``"dilated"``: ``torch.compile`` backends;
- :func:`rewrite`: the pass itself over a Dynamo ``GraphModule``;
- :func:`rewrite_exported`: the ATen-level pass over a ``torch.export`` program (:mod:`.export`);
- :class:`RewriteReport`: what was rewritten, refused (and why) or not selected;
  :class:`Decider`: where ``select``, refusals and ``strict`` are applied.
"""
from .backend import DilatedBackend, backend, register, rewrite
from .config import RewriteConfig
from .export import rewrite_exported, rewrite_graph
from .report import Decider, Entry, RewriteRefused, RewriteReport

register()

__all__ = ["backend", "rewrite", "rewrite_exported", "rewrite_graph", "RewriteConfig", "DilatedBackend",
           "RewriteReport", "RewriteRefused", "Entry", "Decider"]
