"""``dilated-ops bench``: dense SDPA, the dilated op (implementations "improved" = op backend
"auto", "standard" = op backend "sdpa") and block-sparse (not built: listed, not timed) over a
range of sequence lengths, forward and forward+backward; writes ``bench.csv`` and, with
matplotlib, ``bench.png`` (time and peak memory vs sequence length, log-log).
``dilated-ops plot CSV`` draws the PNG from a CSV afterwards (e.g. when the machine that ran the
bench has no matplotlib). Timing: :mod:`dilated_ops._bench`, shared with
``benchmarks/bench_dilated.py``."""
from __future__ import annotations

import csv
import datetime
import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

from .. import _bench, _checks
from .._progress import Progress
from ..registrations import dilated_attention

COLUMNS = ["seq_len", "impl", "pass", "median_ms", "useful_tflops", "peak_mib", "note",
           "device", "dtype", "torch", "date", "batch", "heads", "head_dim", "segment_lengths",
           "dilation_rates", "mode", "causal", "repeats"]
IMPLS = ["dense", "dilated-improved", "dilated-standard", "block-sparse"]
PASSES = ("fwd", "fwd+bwd")
NOT_BUILT = "not built yet (no block-sparse implementation exists)"


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def validate(args) -> None:
    from .demo import resolve_device
    args.device = resolve_device(args.device)
    _checks.check_segments(args.segment_lengths, args.dilation_rates)
    _checks.check_mode(args.mode)
    for name in ("heads", "head_dim", "batch", "repeats", "warmup"):
        value = getattr(args, name)
        if name == "warmup" and value == 0:
            continue
        _checks.check_positive_int(name, value)
    _checks.check_int_list("seq_lens", args.seq_lens)
    if args.mode == "groups":
        _checks.check_num_groups(args.heads, len(args.segment_lengths))
    dtype = getattr(torch, args.dtype)
    if torch.device(args.device).type == "cpu" and dtype in (torch.float16,):
        raise ValueError(f"dtype float16 is not supported on the CPU by PyTorch's attention kernels; "
                         f"use float32, float64 or bfloat16")
    unknown = [i for i in args.impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"impls must be among {', '.join(IMPLS)}: got {unknown}")


def _rows_for(n, impl, args, dtype, meta) -> List[Dict]:
    b, h, d = args.batch, args.heads, args.head_dim
    segs, rates = args.segment_lengths, args.dilation_rates
    base = dict(meta, seq_len=n, impl=impl)
    if impl == "block-sparse":
        return [dict(base, **{"pass": p, "note": NOT_BUILT}) for p in PASSES]
    if impl == "dense" and n > args.dense_max:
        return [dict(base, **{"pass": p, "note": f"skipped: seq_len > --dense-max {args.dense_max}"}) for p in PASSES]
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, device=args.device, dtype=dtype, requires_grad=True) for _ in range(3))
    if impl == "dense":
        flops = _bench.dense_flops(n, h, d, args.causal)
        make = lambda: [F.scaled_dot_product_attention(  # noqa: E731
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=args.causal)]
    else:
        flops = _bench.useful_flops(n, h, d, segs, rates, args.mode, args.causal)
        op_backend = "auto" if impl == "dilated-improved" else "sdpa"
        make = lambda: [dilated_attention(q, k, v, segs, rates, mode=args.mode,  # noqa: E731
                                          is_causal=args.causal, backend=op_backend)]
    try:
        f, fb, peak = _bench.measure(make, (q, k, v), args.warmup, args.repeats, args.device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return [dict(base, **{"pass": p, "note": "out of memory"}) for p in PASSES]
    peak_mib = "" if peak is None else f"{peak * 1024:.1f}"
    note = "" if peak is not None else "peak memory: CUDA only"
    return [
        dict(base, **{"pass": "fwd", "median_ms": f"{f:.5g}", "useful_tflops": f"{flops / f / 1e9:.4g}",
                      "peak_mib": peak_mib, "note": note}),
        dict(base, **{"pass": "fwd+bwd", "median_ms": f"{fb:.5g}", "useful_tflops": f"{3.5 * flops / fb / 1e9:.4g}",
                      "peak_mib": peak_mib, "note": note}),
    ]


def run(args, out=None) -> dict:
    out = out or sys.stdout
    validate(args)
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out_dir, exist_ok=True)
    meta = {"device": device_name(args.device), "dtype": args.dtype, "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "batch": args.batch, "heads": args.heads,
            "head_dim": args.head_dim, "segment_lengths": " ".join(map(str, args.segment_lengths)),
            "dilation_rates": " ".join(map(str, args.dilation_rates)), "mode": args.mode,
            "causal": args.causal, "repeats": args.repeats}
    say(f"dilated_ops bench: {meta['device']}, torch {meta['torch']}, {args.dtype}, batch {args.batch}, "
        f"heads {args.heads}, head_dim {args.head_dim}, segment_lengths {args.segment_lengths}, "
        f"dilation_rates {args.dilation_rates}, mode {args.mode}, causal {args.causal}")
    say(f"median of {args.repeats} runs after {args.warmup} warm-up runs "
        + ("(CUDA events); peak = max allocated in one forward+backward, inputs included"
           if torch.device(args.device).type == "cuda" else "(time.perf_counter); no peak memory on CPU"))
    if "block-sparse" in args.impls:
        say(f"block-sparse: {NOT_BUILT}; listed in the CSV, not timed")
    csv_path = os.path.join(args.out_dir, "bench.csv")
    rows: List[Dict] = []
    jobs = [(n, impl) for n in args.seq_lens for impl in args.impls]
    header = f"  {'seq_len':>8}  {'impl':<17} {'fwd ms':>10} {'fwd+bwd ms':>11} {'f+b TFLOP/s':>11} {'peak MiB':>9}"
    lines = [header]
    with Progress(len(jobs), desc="  bench", stream=out) as bar:
        for n, impl in jobs:
            new = _rows_for(n, impl, args, dtype, meta)
            rows.extend(new)
            fwd, fb = new
            if fwd.get("median_ms"):
                lines.append(f"  {n:>8}  {impl:<17} {float(fwd['median_ms']):>10.3f} {float(fb['median_ms']):>11.3f} "
                             f"{float(fb['useful_tflops']):>11.3f} {fb['peak_mib'] or '-':>9}")
            else:
                lines.append(f"  {n:>8}  {impl:<17} {fwd['note']}")
            bar.update(1, seq_len=n, impl=impl)
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})
    say("\n".join(lines))
    say(f"wrote {csv_path} ({len(rows)} rows)")
    png_path = os.path.join(args.out_dir, "bench.png")
    try:
        plot(csv_path, png_path)
        say(f"wrote {png_path}")
    except ImportError:
        png_path = None
        say(f"note: the plot needs matplotlib, which is not installed here; draw it later with "
            f"`python -m dilated_ops plot {csv_path}` on a machine that has it "
            f"(pip install 'dilated-ops[bench]' or pip install matplotlib)")
    return {"csv": csv_path, "png": png_path, "rows": rows}


def read_csv(path: str) -> List[Dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("seq_len", "impl", "pass", "median_ms", "peak_mib") if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: not a `dilated-ops bench` CSV (no rows, or missing columns {missing})")
    return rows


def plot(csv_path: str, png_path: str) -> str:
    """Two log-log panels from a bench CSV: median time and peak memory vs sequence length.
    Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(csv_path)
    meta = rows[0]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"fwd": "--", "fwd+bwd": "-"}
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    colors = dict(zip(impls, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    any_memory = False
    for impl in impls:
        for p in PASSES:
            pts = sorted((int(r["seq_len"]), float(r["median_ms"])) for r in rows
                         if r["impl"] == impl and r["pass"] == p and r["median_ms"])
            if pts:
                ax_t.plot(*zip(*pts), styles[p], marker="o", color=colors[impl], label=f"{impl} {p}")
        mem = sorted((int(r["seq_len"]), float(r["peak_mib"])) for r in rows
                     if r["impl"] == impl and r["pass"] == "fwd+bwd" and r.get("peak_mib"))
        if mem:
            any_memory = True
            ax_m.plot(*zip(*mem), "-", marker="o", color=colors[impl], label=f"{impl} fwd+bwd")
    ax_t.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="median time (ms)",
             title="time (dashed: forward, solid: forward+backward)")
    ax_t.legend(fontsize=7)
    ax_t.grid(True, which="both", alpha=0.3)
    ax_m.set(xlabel="sequence length", ylabel="peak memory (MiB)", title="peak memory, forward+backward")
    if any_memory:
        ax_m.set(xscale="log", yscale="log")
        ax_m.legend(fontsize=7)
        ax_m.grid(True, which="both", alpha=0.3)
    else:
        ax_m.text(0.5, 0.5, "peak memory is measured on CUDA only", ha="center", va="center",
                  transform=ax_m.transAxes)
    not_built = sorted({r["impl"] for r in rows if r.get("note", "").startswith("not built")})
    fig.suptitle(f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}, {meta.get('dtype', '?')}, "
                 f"{meta.get('date', '?')}; batch {meta.get('batch')}, heads {meta.get('heads')}, "
                 f"head_dim {meta.get('head_dim')}, segments [{meta.get('segment_lengths')}], "
                 f"rates [{meta.get('dilation_rates')}], {meta.get('mode')}"
                 + (f"\nnot built, not shown: {', '.join(not_built)}" if not_built else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
