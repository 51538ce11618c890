"""``dilated-ops bench``: the project's one benchmark command.

Times, side by side in one process, over a range of sequence lengths, forward and
forward+backward:

- ``dilated-NAME`` for each row NAME of the variant table (:data:`dilated_ops.variants.VARIANTS`),
  run through the row's single-head module (block-sparse rows with ``--pattern``,
  ``--block-size``, ``--density``: one row per length, labelled with the pattern); a row that is not built
  is listed with its reason and not timed, and a row whose call is the same as an earlier one's
  (same op, same op arguments: ``ring`` and ``improved`` in one process) is listed as such and
  timed once;
- the baselines of :mod:`dilated_ops._bench`: ``pregathered`` (SDPA on segments gathered
  beforehand, the floor of this design) and ``naive`` (index gather, SDPA, scatter);
- ``dense`` (SDPA over the whole sequence, up to ``--dense-max``), run after all the others.

Options add the forward's spread and GPU-only time (``--spread``), a ``torch.compile`` row per
dilated row (``--compile``), and a kernel or host profile of one call (``--profile``).
Writes ``bench.csv`` and, with matplotlib, ``bench.png`` (time and peak memory vs sequence
length, log-log); ``dilated-ops plot CSV`` draws the PNG from a CSV afterwards.
"""
from __future__ import annotations

import csv
import datetime
import io
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

from .. import _bench, _checks, functional, modules, sequence_parallel, variants
from .._progress import Progress
from ..config import SparsePatternConfig
from ..kernels import block_sparse, distributed
from ._paths import check_out_dir, makedirs

COLUMNS = ["seq_len", "impl", "pass", "median_ms", "useful_tflops", "peak_mib", "note", "mode", "compile",
           "fwd_p10_ms", "fwd_p50_ms", "fwd_p90_ms", "fwd_gpu_ms",
           "device", "dtype", "torch", "triton", "date", "batch", "heads", "head_dim", "segment_lengths",
           "dilation_rates", "causal", "repeats", "warmup", "world_size", "inputs"]
PASSES = ("fwd", "fwd+bwd")
MODES = ("groups", "longnet")
BASELINES = ("pregathered", "naive")
FLEX = "flex"  # FlexAttention with a BlockMask of the block-sparse rows' layout (CUDA)
DENSE = "dense"
# Names users know from earlier versions of this command and of the removed benchmark script.
ALIASES = {"block-sparse": "dilated-block_sparse", "op": "dilated-improved", "op-sdpa": "dilated-standard"}
PROFILES = ("kernels", "host")
NOT_BUILT = "not built"
NOT_HERE = "not timed here"  # a row this one-process command cannot run


def dilated_name(variant_name: str) -> str:
    return f"dilated-{variant_name}"


def impl_names() -> List[str]:
    """Every name ``--impls`` accepts besides the aliases: one per variant, the baselines, dense."""
    return [dilated_name(v) for v in variants.VARIANTS] + list(BASELINES) + [FLEX, DENSE]


def default_impls() -> List[str]:
    """Every variant except ring (in one process it is improved's call), the baselines, dense."""
    return [dilated_name(v) for v in variants.VARIANTS if v != "ring"] + list(BASELINES) + [DENSE]


def canonical_impl(name: str) -> Optional[str]:
    """The name a user typed -> the canonical impl name, or None if unknown. ``dilated-X``
    also takes X with dashes for underscores (``dilated-block-sparse``)."""
    name = ALIASES.get(name, name)
    if name.startswith("dilated-"):
        variant = name[len("dilated-"):].replace("-", "_")
        return dilated_name(variant) if variant in variants.VARIANTS else None
    return name if name in BASELINES or name in (FLEX, DENSE) else None


def _variant(impl: str) -> Optional[variants.Variant]:
    return variants.VARIANTS[impl[len("dilated-"):]] if impl.startswith("dilated-") else None


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return getattr(triton, "__version__", "")


def validate(args) -> None:
    from .demo import resolve_device
    args.device = resolve_device(args.device)
    _checks.check_segments(args.segment_lengths, args.dilation_rates)
    sparse_config(args)  # --pattern, --block-size, --density checked as SparsePatternConfig fields
    sequence_parallel.check_strategy(args.strategy)
    sequence_parallel.check_layout(args.layout)
    for mode in args.modes:
        _checks.check_mode(mode)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    for name in ("heads", "head_dim", "batch", "repeats", "warmup", "dense_max", "kv_heads", "documents"):
        value = getattr(args, name)
        if name in ("warmup", "dense_max") and value == 0:
            continue
        _checks.check_positive_int(name, value)
    _checks.check_int_list("seq_lens", args.seq_lens)
    if args.heads % args.kv_heads:
        raise ValueError(f"kv_heads must divide heads ({args.heads}): got {args.kv_heads}")
    if not 0.0 <= args.padding < 1.0:
        raise ValueError(f"padding must be a fraction in [0, 1): got {args.padding}")
    bad = [n for n in args.seq_lens if n % args.documents]
    if bad:
        raise ValueError(f"documents ({args.documents}) must divide every seq_len: got seq_lens {bad}")
    if "groups" in args.modes:
        _checks.check_num_groups(args.heads, len(args.segment_lengths))
    unknown = [i for i in args.impls if canonical_impl(i) is None]
    if unknown:
        raise ValueError(f"impls must be among {', '.join(impl_names())} (aliases: "
                         f"{', '.join(f'{a} = {c}' for a, c in ALIASES.items())}): got {unknown}")
    args.impls = list(dict.fromkeys(canonical_impl(i) for i in args.impls))
    if args.decode and (args.documents > 1 or _world(args) > 1):
        raise ValueError("decode times one step in one process: it takes no --documents or torchrun")
    if args.spread and args.repeats < 2:
        raise ValueError(f"repeats must be at least 2 with --spread (it takes deciles): got {args.repeats}")
    bad = [p for p in args.profile if p not in PROFILES]
    if bad:
        raise ValueError(f"profile must be among {', '.join(PROFILES)}: got {bad}")
    check_out_dir("--out-dir", args.out_dir, files=("bench.csv", "bench.png"))


def _jobs(args) -> List[Tuple[int, str, str, Optional[str]]]:
    """(seq_len, impl, mode, compile mode) in the order they run: every implementation but dense
    for each seq_len, then dense for each seq_len. Dense runs last because its calls are long
    full-GPU loads, and right after them the next row's first timings were seen to run slower
    with its kernels' own time unchanged: a transient that would be charged to whatever row
    happened to follow dense."""
    jobs = []
    for n in args.seq_lens:
        for impl in args.impls:
            if impl == DENSE:
                continue
            if _variant(impl) is not None and not _variant(impl).built:
                jobs.append((n, impl, "", None))  # listed once per seq_len, whatever the modes
                continue
            modes = args.modes if impl not in BASELINES else ["groups"]
            if impl == FLEX or (_variant(impl) is not None and "sparse_config" in _variant(impl).options):
                modes = [_pattern_label(args)]  # one row: the pattern, not a combine mode
            for mode in modes:
                jobs.append((n, impl, mode, None))
                if args.compile and _variant(impl) is not None and _variant(impl).built:
                    jobs.append((n, impl, mode, args.compile))
    if DENSE in args.impls:
        for n in args.seq_lens:
            jobs.append((n, DENSE, "", None))
            if args.decode and args.compile:  # a dense decode step as a serving loop runs it too
                jobs.append((n, DENSE, "", args.compile))
    return jobs


def _inputs(n, args, dtype):
    torch.manual_seed(0)
    return [torch.randn(args.batch, n, h, args.head_dim, device=args.device, dtype=dtype, requires_grad=True)
            for h in (args.heads, args.kv_heads, args.kv_heads)]


def _extras(args) -> bool:
    """Whether the inputs carry grouped-query K/V, padding or packed documents."""
    return args.kv_heads != args.heads or args.padding > 0 or args.documents > 1


def _keep(n, args) -> Optional[torch.Tensor]:
    """``--padding``: every sequence's last keys masked (True = keep), or None."""
    if not args.padding:
        return None
    return (torch.arange(n, device=args.device) < n - round(args.padding * n)).expand(args.batch, n)


def _cu_seqlens(n, args) -> Optional[torch.Tensor]:
    """``--documents``: equal documents' boundaries, or None."""
    if args.documents == 1:
        return None
    return torch.arange(0, n + 1, n // args.documents, device=args.device, dtype=torch.int32)


def _extras_label(args) -> str:
    parts = [f"GQA {args.heads}:{args.kv_heads}" if args.kv_heads != args.heads else "",
             f"last {args.padding:g} of keys padded" if args.padding else "",
             f"{args.documents} packed documents" if args.documents > 1 else ""]
    return ", ".join(p for p in parts if p)


def _decode_callable(n, impl, mode, compile_mode, args, dtype):
    """``--decode``: one query at the end of a cache of ``n`` keys (as :func:`_callable`); with
    ``--compile reduce-overhead`` each step replays a CUDA graph, as a serving loop runs it."""
    h, d = args.heads, args.head_dim
    q, k, v = _inputs(n, args, dtype)
    q = q[:, -1:].detach().requires_grad_()
    keep = _keep(n, args)
    segs, rates = args.segment_lengths, args.dilation_rates

    def step(q, k, v):
        if impl == DENSE:
            # one query at the end: not causal (it sees every cached key), as a dense model's decode step
            return _bench.dense(q, k, v, False, keep)
        return functional.dilated_attention_decode(q, k, v, segs, rates, mode=mode, is_causal=True,
                                                   key_padding_mask=keep)
    if compile_mode:
        torch._dynamo.reset()  # as _callable: a fresh Dynamo cache per row
        for t in (k, v):
            # A serving loop's cache lives at one address (transformers' StaticCache marks it so);
            # unmarked, a CUDA graph would copy the whole cache into its own pool every step.
            torch._dynamo.mark_static_address(t)
        step = torch.compile(step, mode=compile_mode, fullgraph=True)
    flops = 4 * d * h * n if impl == DENSE else _bench.decode_flops(n, h, d, segs, rates, mode)
    return (lambda: [step(q, k, v)]), (q, k, v), flops


def _callable(n, impl, mode, compile_mode, args, dtype):
    """(make_out, params, useful forward FLOPs) for one row: ``make_out()`` returns the list of
    outputs, ``params`` the leaves the backward fills."""
    if args.decode:
        return _decode_callable(n, impl, mode, compile_mode, args, dtype)
    h, d = args.heads, args.head_dim
    segs, rates, causal = args.segment_lengths, args.dilation_rates, args.causal
    variant = _variant(impl)
    ranks = max(_world(args), 1) if variant is not None and variant.process_group else 1
    q, k, v = _inputs(n // ranks, args, dtype)  # a process-group row: this rank's shard
    if impl == DENSE:
        keep = _keep(n, args)
        return ((lambda: [_bench.dense(q, k, v, causal, keep)]), (q, k, v),
                _bench.dense_flops(n, h, d, causal))
    flops = _bench.useful_flops(n, h, d, segs, rates, mode, causal)
    if impl == "naive":
        return (lambda: [_bench.naive(q, k, v, segs, rates, causal)]), (q, k, v), flops
    if impl == FLEX:
        layout = block_sparse.pattern_layout(
            args.pattern, n, h, args.block_size, None, args.block_size, args.density, tuple(segs), tuple(rates),
            causal, q.device)
        mask = _bench.flex_block_mask(layout, n, args.block_size, causal)
        flops = _bench.block_sparse_flops(layout, h, d, args.block_size, causal)
        return (lambda: [_bench.flex(q, k, v, mask)]), (q, k, v), flops
    if impl == "pregathered":
        batches = _bench.pregather(q, k, v, segs, rates)
        return (lambda: _bench.pregathered(batches, causal)), [t for bt in batches for t in bt], flops
    options = {}
    flops /= ranks  # this rank's share: TF/s per GPU
    if "sparse_config" in variant.options:
        options["sparse_config"] = sparse_config(args)
        layout = block_sparse.pattern_layout(
            args.pattern, n, h, args.block_size, None, args.block_size, args.density, tuple(segs), tuple(rates),
            causal, torch.device("cpu"))
        flops = _bench.block_sparse_flops(layout, h, d, args.block_size, causal)
    # The row's own single-head module (variants.Variant.module): what a user of the row runs.
    if "strategy" in variant.options:
        options["strategy"] = args.strategy
    if "layout" in variant.options:
        options["layout"] = args.layout
    module = getattr(modules, variant.module)(segs, rates, mode=mode if mode in MODES else "groups", **options)

    keep, cu_seqlens = _keep(n, args), _cu_seqlens(n, args)

    def call(q, k, v):
        if cu_seqlens is not None:  # the modules take no cu_seqlens: the function, on the row's op arguments
            return functional.dilated_attention(q, k, v, segs, rates, mode=mode, is_causal=causal,
                                                key_padding_mask=keep, cu_seqlens=cu_seqlens, **variant.op_kwargs)
        if keep is not None:
            return module(q, k, v, is_causal=causal, key_padding_mask=keep)
        return module(q, k, v, is_causal=causal)
    if compile_mode:
        # A fresh Dynamo cache per row: every row compiles the same function, and after a few
        # recompiles Dynamo would silently fall back to eager for the rest of the table.
        torch._dynamo.reset()
        call = torch.compile(call, mode=compile_mode, fullgraph=True)
    return (lambda: [call(q, k, v)]), (q, k, v), flops


def sparse_config(args) -> SparsePatternConfig:
    """The block-sparse rows' pattern: ``--pattern`` with ``--block-size``, its band or extra
    density set by ``--density`` (``local_window_size=None``), global blocks of one block."""
    return SparsePatternConfig(args.pattern, sparsity_ratio=args.density, block_size=args.block_size,
                               local_window_size=None, global_tokens=args.block_size)


def _pattern_label(args) -> str:
    return f"{args.pattern}, {args.density:g}"


def launched_group(args) -> int:
    """Under ``torchrun`` (``WORLD_SIZE`` set): the process group this command runs in, set up
    here if the caller has not (NCCL on CUDA, one GPU per local rank; gloo on CPU); returns its
    size, 0 when not launched so."""
    if "WORLD_SIZE" not in os.environ:
        return 0
    dist = torch.distributed
    if torch.device(args.device).type == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(args.device).type == "cuda" else "gloo")
        args.own_group = True  # destroyed at the end of run()
    return dist.get_world_size()


def _world(args) -> int:
    return getattr(args, "world_size", 0)


def _why_not_timed(n, impl, mode, args, dtype, timed_calls) -> Optional[str]:
    variant = _variant(impl)
    world = _world(args)
    if args.decode:
        if impl == DENSE:
            return None
        if variant is None or variant.process_group or "sparse_config" in variant.options:
            return f"skipped: {impl} has no decode step (--decode times dilated_attention_decode and dense)"
        same = timed_calls.setdefault("decode", impl)  # every dilated row steps through the one decode op
        return None if same == impl else f"same call as {same} (dilated_attention_decode): timed once, under that name"
    if variant is not None:
        if not variant.built:
            return f"{NOT_BUILT}: {variant.missing}"
        if variant.needs_group and not world:
            return (f"{NOT_HERE}: {variant.name} runs across processes (torchrun --nproc-per-node P -m "
                    f"dilated_ops bench --impls {impl} ...)")
    if world > 1 and (variant is None or not variant.process_group):
        return f"{NOT_HERE}: a one-process row (under torchrun only the process-group rows run)"
    if world > 1 and n % world:
        return f"skipped: seq_len {n} is not divisible by the {world} ranks"
    if _extras(args):
        if variant is not None and (not variant.masks if args.padding or args.documents > 1 else not variant.gqa):
            return f"skipped: {variant.name} takes no {'masks' if args.padding or args.documents > 1 else 'GQA'}"
        if variant is None and impl != DENSE:
            return f"skipped: {impl} takes no GQA, padding or packed documents"
        if impl == DENSE and args.documents > 1:
            return "skipped: dense takes no packed documents"
        if impl == DENSE and args.padding and args.causal:
            return "skipped: dense SDPA takes a padding mask or is_causal, not both"
    if variant is not None:
        device_type = torch.device(args.device).type
        if dtype not in variant.dtypes(device_type):
            return f"skipped: {variant.name} does not run {args.dtype} on {device_type}"
        same = timed_calls.get((id(variant.op), tuple(sorted(variant.op_kwargs.items()))))
        if same is not None and same != impl:
            return f"same call as {same} (op arguments {variant.op_kwargs}): timed once, under that name"
    elif impl == FLEX:
        if torch.device(args.device).type != "cuda" or n % args.block_size:
            return "skipped: flex rows need CUDA and seq_len a multiple of --block-size"
    elif impl in BASELINES:
        return _bench.baseline_applies(n, args.segment_lengths, mode)
    elif impl == DENSE and n > args.dense_max:
        return f"skipped: seq_len > --dense-max {args.dense_max}"
    return None


def _rows_for(n, impl, mode, compile_mode, args, dtype, meta, timed_calls) -> List[Dict]:
    base = dict(meta, seq_len=n, impl=impl, mode=mode, compile=compile_mode or "")
    note = _why_not_timed(n, impl, mode, args, dtype, timed_calls)
    if note:
        return [dict(base, **{"pass": p, "note": note}) for p in PASSES]
    variant = _variant(impl)
    if variant is not None:
        timed_calls.setdefault((id(variant.op), tuple(sorted(variant.op_kwargs.items()))), impl)
    # The first calls of a compiled function compile it (and with reduce-overhead record its
    # CUDA graph): at least three warm-up calls keep that out of the timings.
    warmup = max(args.warmup, 3) if compile_mode else args.warmup
    try:
        make, params, flops = _callable(n, impl, mode, compile_mode, args, dtype)
        # Measured first in the row, as a row's first timings are the ones a transient hits.
        spread = _bench.forward_spread(make, warmup, args.repeats, args.device) if args.spread else None
        f, fb, peak = _bench.measure(make, params, warmup, args.repeats, args.device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return [dict(base, **{"pass": p, "note": "out of memory"}) for p in PASSES]
    if _world(args) > 1:  # the slowest rank's times, the largest peak
        f, fb, peak = _max_over_ranks(f, fb, peak, args.device)
        base["note"] = _comm_note(variant, n, mode, args, dtype)
    peak_mib = "" if peak is None else f"{peak * 1024:.1f}"
    fwd = dict(base, **{"pass": "fwd", "median_ms": f"{f:.5g}", "useful_tflops": f"{flops / f / 1e9:.4g}",
                        "peak_mib": peak_mib})
    if spread is not None:
        p10, p50, p90, gpu = spread
        fwd.update(fwd_p10_ms=f"{p10:.5g}", fwd_p50_ms=f"{p50:.5g}", fwd_p90_ms=f"{p90:.5g}",
                   fwd_gpu_ms="" if gpu is None else f"{gpu:.5g}")
    total_flops = (1 + _bench.BACKWARD_FLOP_FACTOR) * flops
    fb_row = dict(base, **{"pass": "fwd+bwd", "median_ms": f"{fb:.5g}",
                           "useful_tflops": f"{total_flops / fb / 1e9:.4g}", "peak_mib": peak_mib})
    return [fwd, fb_row]


def _max_over_ranks(f: float, fb: float, peak: Optional[float], device: str):
    dist = torch.distributed
    t = torch.tensor([f, fb, -1.0 if peak is None else peak], dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    f, fb, peak_all = t.tolist()
    return f, fb, (None if peak is None else peak_all)


def _comm_note(variant, n: int, mode: str, args, dtype) -> str:
    """The strategy a process-group row ran and what one rank sends per call."""
    world = _world(args)
    shard = (args.batch, n // world, args.heads, args.head_dim)
    q = torch.empty(shard, dtype=dtype, device="meta")
    strategy = "ring" if variant.name == "ring" else sequence_parallel.choose_strategy(
        args.strategy, q, world, args.segment_lengths, args.dilation_rates)
    element = q.element_size()
    wide = 8 if dtype == torch.float64 else 4  # the log-sum-exp's and the accumulation's
    if strategy in ("longnet", "ring"):
        count = distributed.longnet_bytes if strategy == "longnet" else distributed.ring_bytes
        layout = (args.layout,) if variant.name == "ring" else ()
        fwd, bwd = count(shard, element, wide, world, args.segment_lengths, args.dilation_rates, mode, *layout)
        if layout:
            strategy += f" ({args.layout} shards)"
    else:
        fwd, bwd = distributed.ulysses_bytes(shard, element, wide, world)
    # The counts take every head as a KV head and no mask: with --kv-heads or --padding an upper bound.
    bound = " at most" if args.kv_heads not in (None, args.heads) or args.padding else ""
    return (f"seq_len {n}, {mode}, {strategy} on {world} ranks: each sends{bound} {fwd / 2**20:.4g} MiB forward, "
            f"{(fwd + bwd) / 2**20:.4g} MiB forward+backward")


def row_label(row: Dict) -> str:
    """``impl (mode, compile)`` as the table and the plot show a row."""
    extra = [x for x in (row.get("mode", ""), row.get("compile", "") and f"compiled {row['compile']}") if x]
    return row["impl"] + (f" ({', '.join(extra)})" if extra else "")


def _profile(args, dtype, out) -> None:
    """The ``--profile`` outputs, for the first timed implementation at the first seq_len."""
    n, mode = args.seq_lens[0], args.modes[0]
    impl = next((i for i in args.impls
                 if _why_not_timed(n, i, mode if i not in BASELINES else "groups", args, dtype, {}) is None), None)
    if impl is None:
        print("profile: nothing to profile (no implementation runs at the first seq_len)", file=out)
        return
    mode = "groups" if impl in BASELINES else "" if impl == DENSE else mode
    make, params, _ = _callable(n, impl, mode, None, args, dtype)
    label = row_label({"impl": impl, "mode": mode})
    fwd, fwd_bwd = _bench._no_grad(make), _bench._fwd_bwd(make, params)
    if "kernels" in args.profile:
        print(f"\nprofile (kernels): {label}, seq_len {n}, one forward+backward (torch.profiler)", file=out)
        print(_bench.kernel_profile(fwd_bwd, args.device), file=out, flush=True)
    if "host" in args.profile:
        reps = 10 * args.repeats
        for name, call in (("forward, no grad", fwd), ("forward+backward", fwd_bwd)):
            print(f"\nprofile (host): {label}, seq_len {n}, {name}: cProfile of {reps} calls, by own time",
                  file=out)
            print(_bench.host_profile(call, args.device, reps=reps), file=out, flush=True)


def _tflops(text: str) -> str:
    x = float(text)
    return f"{x:.1f}" if x >= 1 else f"{x:.3g}"


def _table(rows: List[Dict], spread: bool) -> List[str]:
    label_w = max([len("impl")] + [len(row_label(r)) for r in rows])
    head = ["seq_len", "impl".ljust(label_w), "fwd ms", "fwd TF/s", "fwd+bwd ms", "f+b TF/s", "peak MiB"]
    if spread:
        head += ["fwd p10", "fwd p50", "fwd p90", "fwd GPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("-" * (len(c) + 2) for c in head) + "|"]
    not_built = {}  # impl -> note: one line for all seq_lens, after the others (not built, not here)
    for fwd, fb in zip(rows[::2], rows[1::2]):
        cells = [f"{fwd['seq_len']:>7}", row_label(fwd).ljust(label_w)]
        if fwd.get("note", "").startswith((NOT_BUILT, NOT_HERE)):
            not_built.setdefault(fwd["impl"], fwd["note"])
            continue
        if not fwd.get("median_ms"):
            lines.append("| " + " | ".join(cells) + f" | {fwd['note']} |")
            continue
        cells += [f"{float(fwd['median_ms']):>6.3f}", f"{_tflops(fwd['useful_tflops']):>8}",
                  f"{float(fb['median_ms']):>10.3f}", f"{_tflops(fb['useful_tflops']):>8}",
                  f"{fb['peak_mib'] or '-':>8}"]
        if spread:
            cells += [f"{float(fwd[c]):>7.3f}" if fwd.get(c) else f"{'-':>7}"
                      for c in ("fwd_p10_ms", "fwd_p50_ms", "fwd_p90_ms", "fwd_gpu_ms")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"| {'all':>7} | {impl.ljust(label_w)} | {note} |" for impl, note in not_built.items()]
    return lines


def run(args, out=None) -> dict:
    out = out or sys.stdout
    validate(args)
    args.world_size = launched_group(args)
    lead = args.world_size == 0 or torch.distributed.get_rank() == 0  # under torchrun rank 0 reports
    say = (lambda *a: print(*a, file=out, flush=True)) if lead else (lambda *a: None)  # noqa: E731
    dtype = getattr(torch, args.dtype)
    cuda = torch.device(args.device).type == "cuda"
    makedirs("--out-dir", args.out_dir)
    meta = {"device": device_name(args.device), "dtype": args.dtype, "torch": torch.__version__,
            "triton": triton_version(), "date": datetime.date.today().isoformat(), "batch": args.batch,
            "heads": args.heads, "head_dim": args.head_dim,
            "segment_lengths": " ".join(map(str, args.segment_lengths)),
            "dilation_rates": " ".join(map(str, args.dilation_rates)), "causal": args.causal,
            "repeats": args.repeats, "warmup": args.warmup, "world_size": args.world_size or 1,
            "inputs": _extras_label(args)}
    if args.world_size:
        say(f"under torchrun: {args.world_size} ranks ({torch.distributed.get_backend()}); seq_len is the whole "
            "sequence, each rank holds seq_len / ranks; times and peak memory: the largest over the ranks; "
            "TF/s: per rank")
    say(f"dilated_ops bench: {meta['device']}, torch {meta['torch']}, Triton {meta['triton'] or 'none'}, "
        f"{args.dtype}, batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, segment_lengths "
        f"{args.segment_lengths}, dilation_rates {args.dilation_rates}, modes {args.modes}, causal {args.causal}"
        + (f"; inputs: {_extras_label(args)}" if _extras(args) else ""))
    say(f"median of {args.repeats} runs after {args.warmup} warm-up runs "
        + ("(CUDA events); peak = max allocated in one forward+backward, inputs included"
           if cuda else "(time.perf_counter); no peak memory on CPU")
        + "; TF/s = useful FLOPs per second; every row in this process, dense rows last")
    for impl in args.impls:
        variant = _variant(impl)
        if variant is not None and not variant.built:
            say(f"{impl}: {NOT_BUILT} ({variant.missing}); listed, not timed")
    if args.profile:
        _profile(args, dtype, out)
    jobs = _jobs(args)
    rows: List[Tuple[tuple, List[Dict]]] = []
    timed_calls: Dict[tuple, str] = {}
    order = {impl: i for i, impl in enumerate(args.impls)}
    with Progress(len(jobs), desc="  bench", stream=out if lead else io.StringIO()) as bar:
        for n, impl, mode, compile_mode in jobs:
            new = _rows_for(n, impl, mode, compile_mode, args, dtype, meta, timed_calls)
            key = (args.seq_lens.index(n), order[impl], args.modes.index(mode) if mode in args.modes else -1,
                   bool(compile_mode))
            rows.append((key, new))
            bar.update(1, seq_len=n, impl=impl)
            if cuda:
                torch.cuda.empty_cache()
    # Printed and written grouped by seq_len in the order of --impls (not in the order run).
    flat = [r for _, pair in sorted(rows, key=lambda kr: kr[0]) for r in pair]
    if getattr(args, "own_group", False):
        torch.distributed.destroy_process_group()
    if not lead:
        return {"csv": None, "png": None, "rows": flat}
    csv_path = os.path.join(args.out_dir, "bench.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in flat:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})
    say("\n".join(_table(flat, args.spread)))
    for note in dict.fromkeys(r["note"] for r in flat if r.get("median_ms") and r.get("note")):
        say(f"note: {note}")
    say(f"wrote {csv_path} ({len(flat)} rows)")
    png_path = os.path.join(args.out_dir, "bench.png")
    try:
        plot(csv_path, png_path)
        say(f"wrote {png_path}")
    except ImportError:
        png_path = None
        say(f"note: the plot needs matplotlib, which is not installed here; draw it later with "
            f"`python -m dilated_ops plot {csv_path}` on a machine that has it "
            f"(pip install 'dilated-ops[bench]' or pip install matplotlib)")
    return {"csv": csv_path, "png": png_path, "rows": flat}


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
    labels = list(dict.fromkeys(row_label(r) for r in rows if r["median_ms"]))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    any_memory = False
    for label in labels:
        mine = [r for r in rows if row_label(r) == label and r["median_ms"]]
        for p in PASSES:
            pts = sorted((int(r["seq_len"]), float(r["median_ms"])) for r in mine if r["pass"] == p)
            if pts:
                ax_t.plot(*zip(*pts), styles[p], marker="o", color=colors[label], label=f"{label} {p}")
        mem = sorted((int(r["seq_len"]), float(r["peak_mib"])) for r in mine
                     if r["pass"] == "fwd+bwd" and r.get("peak_mib"))
        if mem:
            any_memory = True
            ax_m.plot(*zip(*mem), "-", marker="o", color=colors[label], label=f"{label} fwd+bwd")
    ax_t.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="median time (ms)",
             title="time (dashed: forward, solid: forward+backward)")
    if labels:
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
    not_built = sorted({r["impl"] for r in rows if r.get("note", "").startswith(NOT_BUILT)})
    triton = f", Triton {meta['triton']}" if meta.get("triton") else ""
    fig.suptitle(f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}{triton}, {meta.get('dtype', '?')}, "
                 f"{meta.get('date', '?')}; batch {meta.get('batch')}, heads {meta.get('heads')}, "
                 f"head_dim {meta.get('head_dim')}, segments [{meta.get('segment_lengths')}], "
                 f"rates [{meta.get('dilation_rates')}]"
                 + (f"\nnot built, not shown: {', '.join(not_built)}" if not_built else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
