"""The command-line tool (issue 5): argument errors (exit 2, a message naming the argument, no
traceback), --help for every subcommand, a tiny demo (convert -> train -> export -> reload in a
fresh process), a tiny CPU bench (CSV + PNG; the command's options are in test_bench.py),
inspect against the reference mask, plot."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dilated_ops.cli import main
from dilated_ops.kernels.reference import branch_masks

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "dilated_ops", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def run_main(capsys, *args):
    """``main(args)`` in this process, as :func:`run_cli`'s result: a fresh interpreter costs
    seconds of imports per call; the entry point itself is run by the subprocess tests."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code or 0, out.out, out.err)


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "--segment-lengths", "8,6", "--dilation-rates", "1,4"],
     "segment_lengths[1] (6) must be divisible by dilation_rates[1] (4)"),
    (["demo", "--segment-lengths", "16,60,256", "--dilation-rates", "1,8,16"],
     "segment_lengths[1] (60) must be divisible by dilation_rates[1] (8)"),
    (["bench", "--device", "cpu", "--segment-lengths", "8,16", "--dilation-rates", "1,2,4"],
     "segment_lengths and dilation_rates must have same length: got 2 and 3"),
    (["bench", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["inspect", "--segment-lengths", "8,x"], "argument --segment-lengths: expected comma-separated positive integers"),
    (["inspect", "--segment-lengths", "8,16,32", "--dilation-rates", "1,2,4", "--heads", "2"],
     "num_heads (2) must be >= number of segment groups (3)"),
    (["demo", "--d-model", "60", "--heads", "8"], "embed_dim (60) must be divisible by num_heads (8)"),
    (["demo", "--steps", "0"], "steps must be a positive int: got 0"),
    (["bench", "--device", "cpu", "--impls", "dense,flash9"], "impls must be among"),
    (["bench", "--device", "cpu", "--mode", "sparse"], "mode must be 'groups' or 'longnet': got 'sparse'"),
    (["inspect", "--seq-len", "100000"], "seq_len must be at most 4096"),
])
def test_argument_errors_exit_2_with_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err and "usage: dilated-ops" in err


def test_cuda_device_without_cuda_is_an_argument_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cuda"])
    assert exc.value.code == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_subprocess_error_has_no_traceback():
    proc = run_cli("demo", "--segment-lengths", "16,64,250", "--dilation-rates", "1,4,16", timeout=120)
    assert proc.returncode == 2
    assert "segment_lengths[2] (250) must be divisible by dilation_rates[2] (16)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("sub", [None, "demo", "bench", "inspect", "plot"])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        main(([sub] if sub else []) + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dilated-ops")
    if sub in ("demo", "bench", "inspect"):
        assert "--segment-lengths" in out and "--dilation-rates" in out
    if sub == "bench":
        for flag in ("--device", "--dtype", "--seq-lens", "--heads", "--head-dim", "--batch", "--modes",
                     "--mode", "--impls", "--spread", "--compile", "--profile", "--dense-max", "--out-dir",
                     "--repeats", "--warmup"):
            assert flag in out


def test_tiny_demo_converts_trains_exports_and_reloads(tmp_path):
    """The whole flow, small: convert (compile backend) -> train -> export -> save -> reload in a
    fresh process -> compare. Too few steps to learn; the learning itself is the README run."""
    proc = run_cli("demo", "--device", "cpu", "--seq-len", "64", "--segment-lengths", "16,64",
                   "--dilation-rates", "1,16", "--steps", "3", "--baseline-steps", "2", "--batch", "4",
                   "--eval-size", "8", "--d-model", "16", "--heads", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "rewritten 2, refused 0, skipped 0" in out
    assert "2 torch.ops.dilated nodes in the program" in out
    assert "reloaded program: 2 dilated nodes" in out
    assert "export round trip: ok" in out
    assert "summary" in out and "local (torch.compile)" in out
    assert (tmp_path / "demo_model.pt2").is_file() and (tmp_path / "demo_inputs.pt").is_file()


def test_bench_under_torchrun_times_the_process_group_rows(tmp_path):
    """`torchrun -m dilated_ops bench`: 2 gloo ranks time the distributed row on shards of each
    seq_len (the slowest rank's times), say what each rank sends, leave one-process rows untimed,
    and only rank 0 writes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dilated_ops",
         "bench", "--device", "cpu", "--seq-lens", "256,255", "--heads", "4", "--head-dim", "8",
         "--segment-lengths", "64,128", "--dilation-rates", "1,2", "--repeats", "2", "--warmup", "1",
         "--impls", "dilated-distributed,dilated-ring,dense", "--strategy", "ulysses", "--layout", "zigzag",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    timed = [r for r in rows if r["median_ms"]]
    assert {(r["seq_len"], r["impl"], r["pass"]) for r in timed} == {
        ("256", impl, p) for impl in ("dilated-distributed", "dilated-ring") for p in ("fwd", "fwd+bwd")}
    assert all(float(r["median_ms"]) > 0 and r["world_size"] == "2" for r in timed)
    assert {r["note"] for r in rows if r["seq_len"] == "255" and r["impl"] == "dilated-distributed"} == {
        "skipped: seq_len 255 is not divisible by the 2 ranks"}
    assert all(r["note"].startswith("not timed here: a one-process row") for r in rows if r["impl"] == "dense")
    # 256 tokens, 2 ranks: shards (1, 128, 4, 8) of float32; q, k, v, out and lse in, dO and the
    # gradients out: half of each all-to-all leaves the rank.
    fwd, bwd = (4 * 128 * 4 * 8 * 4 + 128 * 4 * 4) // 2, 4 * 128 * 4 * 8 * 4 // 2
    assert (f"note: seq_len 256, groups, ulysses on 2 ranks: each sends {fwd / 2**20:.4g} MiB forward, "
            f"{(fwd + bwd) / 2**20:.4g} MiB forward+backward") in proc.stdout
    # the ring row on zigzag shards (--layout): chunks of 64, segment 128 spans two of them
    assert "note: seq_len 256, groups, ring (zigzag shards) on 2 ranks: each sends" in proc.stdout
    assert proc.stdout.count("| seq_len | impl") == 1, "rank 0 reports alone"


def test_tiny_bench_writes_csv_and_png(tmp_path):
    """The one benchmark command end to end in a fresh process, with its defaults' implementations."""
    from dilated_ops import variants
    proc = run_cli("bench", "--device", "cpu", "--seq-lens", "64,128", "--heads", "2", "--head-dim", "8",
                   "--segment-lengths", "16,32", "--dilation-rates", "1,2", "--repeats", "2", "--warmup", "1",
                   "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:7] == ["seq_len", "impl", "pass", "median_ms", "useful_tflops", "peak_mib", "note"]
    built = {f"dilated-{n}" for n, v in variants.VARIANTS.items() if v.built and n != "ring"}
    not_built = {f"dilated-{n}" for n, v in variants.VARIANTS.items() if not v.built}
    # Rows that run across processes are listed, not timed, by this one-process command.
    elsewhere = {f"dilated-{n}" for n, v in variants.VARIANTS.items() if v.needs_group}
    assert elsewhere == {"dilated-distributed"}
    impls = built | not_built | {"pregathered", "naive", "dense"}
    assert {r["impl"] for r in rows} == impls
    assert len(rows) == 2 * len(impls) * 2  # seq lens x impls x passes (CPU default: groups only)
    timed = [r for r in rows if r["impl"] not in not_built | elsewhere]
    assert {"dilated-improved", "dilated-standard"} <= {r["impl"] for r in timed}
    assert all(float(r["median_ms"]) > 0 and float(r["useful_tflops"]) > 0 for r in timed)
    assert all(r["note"].startswith("not built") and not r["median_ms"] for r in rows if r["impl"] in not_built)
    assert all(r["note"].startswith("not timed here") and not r["median_ms"] for r in rows if r["impl"] in elsewhere)
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"} and rows[0]["torch"] == torch.__version__
    assert "| seq_len | impl" in proc.stdout
    assert re.search(r"\|     all \| dilated-distributed +\| not timed here: distributed runs across processes",
                     proc.stdout), proc.stdout
    # Block-sparse rows: one per length, labelled with the pattern (--pattern, --density).
    assert {r["mode"] for r in timed if r["impl"] == "dilated-block_sparse"} == {"local_window, 0.1"}
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # plot redraws the PNG from the CSV alone.
    out_png = tmp_path / "again.png"
    assert main(["plot", str(tmp_path / "bench.csv"), "--out", str(out_png)]) == 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_without_matplotlib_still_writes_csv(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["bench", "--device", "cpu", "--seq-lens", "32", "--heads", "2", "--head-dim", "8",
                 "--segment-lengths", "16", "--dilation-rates", "1", "--impls", "dilated-standard",
                 "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "bench.csv").is_file() and not (tmp_path / "bench.png").exists()
    assert "the plot needs matplotlib" in out and "dilated_ops plot" in out


def reference_union(n, h, segs, rates, mode, causal):
    allowed = torch.zeros(h, n, n, dtype=torch.bool)
    heads = torch.arange(h)
    if mode == "groups":
        base, extra = divmod(h, len(segs))
        sizes = [base + (1 if i < extra else 0) for i in range(len(segs))]
        group = torch.repeat_interleave(torch.arange(len(segs)), torch.tensor(sizes))
        for i, (w, r) in enumerate(zip(segs, rates)):
            _, a = branch_masks(n, w, r, torch.full((h,), i % r), causal)
            allowed |= a & (group == i).view(h, 1, 1)
    else:
        for w, r in zip(segs, rates):
            allowed |= branch_masks(n, w, r, heads % r, causal)[1]
    return allowed


@pytest.mark.parametrize("n, h, segs, rates, mode, causal", [
    (32, 2, [8, 16], [1, 2], "groups", False),
    (37, 5, [4, 8, 16], [1, 2, 4], "groups", True),
    (30, 4, [8, 64], [2, 4], "longnet", False),
    (24, 3, [6, 12], [1, 3], "longnet", True),
])
def test_inspect_matches_reference_mask(n, h, segs, rates, mode, causal, capsys):
    argv = ["inspect", "--seq-len", str(n), "--heads", str(h), "--segment-lengths", ",".join(map(str, segs)),
            "--dilation-rates", ",".join(map(str, rates)), "--mode", mode, "--head-dim", "8"]
    assert main(argv + (["--causal"] if causal else [])) == 0
    out = capsys.readouterr().out
    ref = reference_union(n, h, segs, rates, mode, causal)
    union = ref.any(0)
    expected_grid = ["  " + "".join("#" if x else "." for x in row) for row in union.tolist()]
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("union over heads"))
    assert lines[start + 1:start + 1 + n] == expected_grid
    dense = n * (n + 1) // 2 if causal else n * n
    assert f"{int(union.sum())} of {dense} pairs" in lines[start]
    assert f"attended (query, key, head) triples: {int(ref.sum())} of {h * dense}" in out
    # Per-head grids: each distinct reference pattern is drawn once.
    for hh in range(h):
        grid = ["  " + "".join("#" if x else "." for x in row) for row in ref[hh].tolist()]
        assert "\n".join(grid) in out


def test_inspect_flops_count_branch_multiplicity(capsys):
    # longnet, one head, two identical dense branches: every pair computed twice.
    assert main(["inspect", "--seq-len", "8", "--heads", "1", "--segment-lengths", "8,8", "--dilation-rates", "1,1",
                 "--mode", "longnet", "--head-dim", "4"]) == 0
    out = capsys.readouterr().out
    assert f"{4 * 4 * 2 * 64:,} vs dense {4 * 4 * 64:,} = 200.00%" in out


def test_inspect_large_seq_is_drawn_in_blocks(capsys):
    assert main(["inspect", "--seq-len", "256", "--segment-lengths", "16,64,256", "--dilation-rates", "1,4,16",
                 "--union-only", "--max-cells", "32"]) == 0
    out = capsys.readouterr().out
    grid = [line for line in out.splitlines() if line.startswith("  ") and set(line.strip()) <= set("#+.")]
    assert len(grid) == 32 and all(len(line.strip()) == 32 for line in grid)


# Issue 18, item 5: these printed tracebacks (exit 1); each is an argument error: exit 2, no
# traceback, and stderr's last line is the one message naming the flag and its value.
def assert_argument_error(proc, sub, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dilated-ops {sub}: error: "), proc.stderr
    for needle in needles:
        assert needle in last, proc.stderr


@pytest.mark.parametrize("sub", ["bench", "demo"])
@pytest.mark.parametrize("device", ["foo", "cuda:abc", "", "cuda:5"])
def test_bad_device_is_an_argument_error(sub, device, capsys):
    if device == "cuda:5" and torch.cuda.device_count() > 5:
        pytest.skip("this machine has a cuda:5")
    proc = run_main(capsys, sub, "--device", device)
    assert_argument_error(proc, sub, f"--device {device or repr(device)}:")
    if device == "cuda:5":
        assert ("CUDA is not available" if not torch.cuda.is_available() else "no such CUDA device") in proc.stderr


def test_cuda_device_without_cuda_subprocess():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    assert_argument_error(run_cli("bench", "--device", "cuda", timeout=120), "bench",
                          "--device cuda:", "CUDA is not available")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bench_half_precision_on_cpu_runs(dtype, tmp_path, capsys):
    proc = run_main(capsys, "bench", "--device", "cpu", "--dtype", dtype, "--seq-lens", "64", "--segment-lengths",
                    "16,32", "--heads", "2", "--head-dim", "8", "--repeats", "2", "--warmup", "1", "--out-dir",
                    str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["dtype"] for r in rows} == {dtype}
    assert any(r["median_ms"] for r in rows if r["impl"] == "dilated-standard")


def _a_regular_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("not a directory\n")
    return f


def test_bench_unwritable_out_dir_is_an_argument_error_before_timing(tmp_path, capsys):
    out_dir = _a_regular_file(tmp_path) / "sub"  # its parent is a regular file: cannot be created
    proc = run_main(capsys, "bench", "--device", "cpu", "--seq-lens", "64", "--segment-lengths", "16,32", "--heads",
                    "2", "--head-dim", "8", "--repeats", "1", "--warmup", "0", "--out-dir", str(out_dir))
    assert_argument_error(proc, "bench", f"--out-dir {out_dir}:", "not a directory")
    assert "dilated_ops bench:" not in proc.stdout and "| seq_len" not in proc.stdout  # nothing timed
    # An --out-dir that is itself a regular file.
    proc = run_main(capsys, "bench", "--device", "cpu", "--out-dir", str(tmp_path / "a_file"))
    assert_argument_error(proc, "bench", f"--out-dir {tmp_path / 'a_file'}:", "not a directory")


def test_demo_unwritable_out_is_an_argument_error_before_training(tmp_path, capsys):
    out = _a_regular_file(tmp_path) / "sub"
    proc = run_main(capsys, "demo", "--device", "cpu", "--out", str(out))
    assert_argument_error(proc, "demo", f"--out {out}:", "not a directory")
    assert "train" not in proc.stdout and "train" not in proc.stderr


def test_plot_unwritable_out_is_an_argument_error(tmp_path, capsys):
    csv_path = tmp_path / "bench.csv"
    csv_path.write_text("seq_len,impl,pass,median_ms,peak_mib\n64,dense,fwd,1.0,\n")
    for out, reason in [(_a_regular_file(tmp_path) / "x.png", "not a directory"),
                        (tmp_path / "no_such_dir" / "x.png", "does not exist"),
                        (tmp_path, "is a directory")]:
        proc = run_main(capsys, "plot", str(csv_path), "--out", str(out))
        assert_argument_error(proc, "plot", f"--out {out}:", reason)
    proc = run_main(capsys, "plot", str(tmp_path / "missing.csv"))
    assert_argument_error(proc, "plot", "argument csv:", "missing.csv", "no such file")


def test_demo_unknown_inner_backend_is_an_argument_error_before_training(capsys):
    proc = run_main(capsys, "demo", "--device", "cpu", "--inner", "no_such_backend")
    assert_argument_error(proc, "demo", "--inner no_such_backend:", "not a registered torch.compile backend")
    assert "train" not in proc.stdout and "train" not in proc.stderr
