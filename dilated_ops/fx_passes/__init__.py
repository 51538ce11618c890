"""Graph rewrites turning stock attention into the dilated ops (issue 4, first slice: Dynamo
graphs through a compile backend). Imports registrations only.

- :func:`backend` / the registered name ``"dilated"``: ``torch.compile`` backends;
- :func:`rewrite`: the pass itself over a Dynamo ``GraphModule``;
- :class:`RewriteReport`: what was rewritten, refused (and why) or not selected.
"""
from .backend import DilatedBackend, backend, register, rewrite
from .report import Entry, RewriteRefused, RewriteReport

register()

__all__ = ["backend", "rewrite", "DilatedBackend", "RewriteReport", "RewriteRefused", "Entry"]
