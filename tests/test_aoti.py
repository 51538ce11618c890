"""AOTInductor packaging of a program with the dilated op (CPU): it compiles and runs in a
Python process that has imported dilated_ops (Inductor keeps the Python custom op as a call
back into Python, through AOTI's proxy executor); a process without the op registered cannot
load the package, with PyTorch's own error saying why."""
import os
import subprocess
import sys

import pytest
import torch

import dilated_ops
from models import SelfMHA

LOAD = (
    "import sys, torch\n{imp}\n"
    "runner = torch._inductor.aoti_load_package(sys.argv[1] + '/m.pt2')\n"
    "io = torch.load(sys.argv[1] + '/io.pt')\n"
    "torch.testing.assert_close(runner(io['x']), io['out'], rtol=1e-6, atol=1e-6)\n"
    "print('aoti ok')\n"
)


def load_in_fresh_process(directory, imp):
    return subprocess.run([sys.executable, "-c", LOAD.format(imp=imp), str(directory)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(torch.__version__ < (2, 13), reason=(
    "torch 2.11 (seen on the GPU machine) segfaults in torch.export.pt2_archive._load_aoti when "
    "loading a package with the Python custom op; runs on torch 2.13"))
def test_aoti_package_runs_with_dilated_ops_imported_and_fails_without(tmp_path):
    x = torch.randn(2, 16, 8)
    ep = dilated_ops.export(SelfMHA(dtype=None).eval(), (x,), segment_lengths=[4, 8], dilation_rates=[1, 2])
    path = torch._inductor.aoti_compile_and_package(ep, package_path=os.fspath(tmp_path / "m.pt2"))
    want = ep.module()(x).detach()
    torch.testing.assert_close(torch._inductor.aoti_load_package(path)(x), want, rtol=1e-6, atol=1e-6)
    torch.save({"x": x, "out": want}, tmp_path / "io.pt")

    done = load_in_fresh_process(tmp_path, "import dilated_ops")
    assert done.returncode == 0 and done.stdout.strip() == "aoti ok", done.stderr[-3000:]

    done = load_in_fresh_process(tmp_path, "")
    assert done.returncode != 0
    assert "Could not find schema for dilated::dilated_attention" in done.stderr, done.stderr[-3000:]
    assert "cannot be run via AOTI without Python environment" in done.stderr
