"""The README's API quick start runs as written."""
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def api_section_blocks():
    text = README.read_text()
    start = text.index("## API (factory, configs, modules)")
    end = text.index("\n## ", start + 1)
    return re.findall(r"^```python\n(.*?)^```", text[start:end], re.M | re.S)


def test_api_quick_start_runs():
    blocks = api_section_blocks()
    assert blocks
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    assert "implementation=" in out.getvalue() and "total_buffers" in out.getvalue()


def test_compile_section_runs():
    import torch

    text = README.read_text()
    start = text.index("## Use with torch.compile and torch.export (graph rewriting)")
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"^```python\n(.*?)^```", text[start:end], re.M | re.S)
    assert blocks
    out = io.StringIO()
    torch._dynamo.reset()
    try:
        with contextlib.redirect_stdout(out):
            for block in blocks:
                exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    finally:
        torch._dynamo.reset()
    assert "rewritten 2" in out.getvalue() and "layers.1.self_attn" in out.getvalue()
    assert "rewritten 2, refused 0, skipped 0" in out.getvalue()
    lines = out.getvalue().splitlines()
    assert "2" in lines  # two dilated nodes in the exported program
    assert "rewritten 1, refused 0, skipped 0" in lines  # rewrite_exported
    assert lines[-1] == "ConvertedMultiheadAttention"  # rewrite_symbolic
