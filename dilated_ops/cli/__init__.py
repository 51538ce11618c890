"""``dilated-ops`` / ``python -m dilated_ops``: the command-line tool.

Subcommands: ``demo`` (the default: convert a stock transformer through the compile backend,
train it on a long-range task, export, reload, check), ``bench`` (the one benchmark: the
dilated variants, baselines and dense SDPA over sequence lengths; table, CSV + PNG),
``inspect`` (draw the attention pattern of a config, with its density and FLOPs) and ``plot``
(the bench PNG from a bench CSV).

Bad arguments exit with code 2 and a message naming the argument, no traceback: argparse's own
errors, and the package's validation messages (:mod:`dilated_ops._checks`) raised before any
work starts.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

DTYPES = ("float16", "bfloat16", "float32", "float64")


def int_list(text: str) -> List[int]:
    """``"16,64,256"`` -> ``[16, 64, 256]`` (also space-separated)."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, e.g. 16,64,256: got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer: got {text!r}")
    return values


def str_list(text: str) -> List[str]:
    return [p for p in text.replace(",", " ").split() if p]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        # Flags whose help already states their default (or that default to None: computed
        # from other flags) get no second "(default: ...)".
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dilated-ops", formatter_class=_Formatter,
        description="LongNet dilated attention as PyTorch custom ops: demo, bench, inspect. "
                    "With no subcommand, runs `demo` with its defaults.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"dilated-ops {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,inspect,plot}")

    demo = sub.add_parser(
        "demo", formatter_class=_Formatter,
        help="convert a stock nn.TransformerEncoder to dilated attention, train, export, reload",
        description="Builds a stock nn.TransformerEncoder (nn.MultiheadAttention), compiles it with "
                    "dilated_ops.backend (which rewrites its attention calls into the dilated op), "
                    "trains it to retrieve a key placed at least seq_len/2 tokens before the query "
                    "(a local-attention baseline cannot), exports it with dilated_ops.export, saves "
                    "the .pt2, reloads it in a fresh process and checks its outputs. The defaults take "
                    "about a minute on a laptop CPU; `--device cuda --seq-len 65536` scales up.")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    demo.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (>= 64)")
    demo.add_argument("--segment-lengths", type=int_list, default=None,
                      help="dilated model's segment lengths (default: 16,64,SEQ_LEN)")
    demo.add_argument("--dilation-rates", type=int_list, default=None,
                      help="dilated model's dilation rates (default: 1,4,16)")
    demo.add_argument("--mode", choices=("groups", "longnet"), default="groups", help="dilated attention mode")
    demo.add_argument("--implementation", choices=_implementations(), default="auto",
                      help="the variant the attention is rewritten into (dilated_ops.variants)")
    demo.add_argument("--steps", type=int, default=300, help="training steps")
    demo.add_argument("--baseline-steps", type=int, default=None,
                      help="training steps of the local-only baseline (default: --steps; 0 skips it)")
    demo.add_argument("--batch", type=int, default=32, help="sequences per training step")
    demo.add_argument("--lr", type=float, default=1e-2, help="AdamW peak learning rate")
    demo.add_argument("--layers", type=int, default=2, help="encoder layers")
    demo.add_argument("--d-model", type=int, default=64, help="model width")
    demo.add_argument("--heads", type=int, default=4, help="attention heads")
    demo.add_argument("--key-len", type=int, default=16, help="how many times the key is repeated")
    demo.add_argument("--eval-size", type=int, default=512, help="held-out sequences for the accuracy")
    demo.add_argument("--inner", default=None,
                      help="compile backend for the rewritten graph (default: aot_eager on CPU, "
                           "inductor on CUDA)")
    demo.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    demo.add_argument("--out", default=None,
                      help="directory for demo_model.pt2 and demo_inputs.pt (default: a temporary "
                           "directory, removed at the end)")

    bench = sub.add_parser(
        "bench", formatter_class=_Formatter,
        help="the benchmark: the dilated variants, baselines and dense SDPA over sequence lengths; "
             "table + CSV + PNG",
        description="Times, side by side in one process, forward and forward+backward over sequence "
                    "lengths: dilated-NAME for each row of the variant table (dilated_ops.variants; "
                    "rows not built are listed, not timed; ring is improved's call in one process), "
                    "the baselines 'pregathered' (SDPA on segments gathered beforehand: the floor) "
                    "and 'naive' (index gather, SDPA, scatter), and dense SDPA, which runs after all "
                    "others. CUDA: median of CUDA-event timings after warm-up and peak allocated "
                    "memory; CPU: median of time.perf_counter timings, no peak memory. TF/s count "
                    "useful FLOPs. Prints a Markdown table and writes OUT_DIR/bench.csv and "
                    "OUT_DIR/bench.png (matplotlib; without it, only the CSV: draw the PNG later "
                    "with `dilated-ops plot OUT_DIR/bench.csv`).")
    bench.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    bench.add_argument("--dtype", choices=DTYPES, default=None,
                       help="default: bfloat16 on CUDA, float32 on CPU")
    bench.add_argument("--seq-lens", type=int_list, nargs="+", default=None,
                       help="comma- or space-separated (default: 4096,16384,65536,262144 on CUDA, "
                            "1024,2048,4096 on CPU)")
    bench.add_argument("--batch", type=int, default=1, help="batch size")
    bench.add_argument("--heads", type=int, default=12, help="attention heads")
    bench.add_argument("--head-dim", type=int, default=64, help="head dimension")
    bench.add_argument("--segment-lengths", type=int_list, default=None,
                       help="default: 2048,4096,8192 on CUDA, 256,512,1024 on CPU")
    bench.add_argument("--dilation-rates", type=int_list, default=None,
                       help="comma-separated (default: 1,2,4,... one per segment length)")
    bench.add_argument("--modes", "--mode", dest="modes", type=str_list, nargs="+", default=None,
                       help="dilated attention modes, each timed for every dilated implementation "
                            "(the baselines run groups only): groups, longnet (default: both on CUDA, "
                            "groups on CPU)")
    bench.add_argument("--causal", action="store_true", help="causal attention")
    bench.add_argument("--impls", type=str_list, nargs="+", default=None,
                       help="comma- or space-separated, among: " + ", ".join(_bench_impls())
                            + "; aliases block-sparse, op, op-sdpa (default: every variant but ring, "
                              "then pregathered, naive, dense)")
    bench.add_argument("--pattern", choices=("local_window", "global_local", "dilated_sparse"),
                       default="local_window", help="block-sparse rows: the SparsePatternConfig pattern")
    bench.add_argument("--block-size", type=int, default=128, help="block-sparse rows: tokens per block")
    bench.add_argument("--density", type=float, default=0.1,
                       help="block-sparse rows: the sparsity_ratio (fraction of blocks a query row reads, where "
                            "the pattern leaves it free)")
    bench.add_argument("--strategy", default="auto",
                       help="process-group rows (under torchrun): the sequence-parallel strategy, auto, "
                            "longnet, ring or ulysses")
    bench.add_argument("--layout", default="contiguous",
                       help="ring rows (dilated-ring, under torchrun): the shards, contiguous or zigzag")
    bench.add_argument("--kv-heads", type=int, default=None,
                       help="grouped-query attention: K/V heads, a divisor of --heads (default: --heads); "
                            "rows of variants without GQA are skipped, dense runs SDPA with enable_gqa")
    bench.add_argument("--padding", type=float, default=0.0,
                       help="fraction of each sequence's last keys masked as padding (key_padding_mask); "
                            "rows of variants without masks are skipped, dense runs SDPA with the boolean mask")
    bench.add_argument("--documents", type=int, default=1,
                       help="packed sequences: each sequence is this many equal documents (cu_seqlens, "
                            "through dilated_ops.dilated_attention); only dilated rows with masks run")
    bench.add_argument("--decode", action="store_true",
                       help="time one decoding step instead: one query at the end of a KV cache of seq_len keys "
                            "(dilated rows: dilated_attention_decode, causal; dense: SDPA over the whole cache)")
    bench.add_argument("--dense-max", type=int, default=65536,
                       help="largest seq_len timed with dense SDPA (0: no dense rows)")
    bench.add_argument("--repeats", type=int, default=None, help="timed runs (median); default 20 CUDA, 5 CPU")
    bench.add_argument("--warmup", type=int, default=None, help="default 5 CUDA, 1 CPU")
    bench.add_argument("--spread", action="store_true",
                       help="also the forward's p10 / median / p90 per call and, on CUDA, its GPU-only "
                            "median (the GPU held busy while the host enqueues), measured first in "
                            "each row: tells host-bound rows from GPU-bound ones")
    bench.add_argument("--compile", choices=("default", "reduce-overhead"), default=None,
                       help="also time each dilated row through torch.compile(fn, mode=..., "
                            "fullgraph=True), next to the eager row (reduce-overhead: CUDA graphs "
                            "replay the launches, which removes the eager host overhead)")
    bench.add_argument("--profile", type=str_list, nargs="?", const=["kernels"], default=[],
                       help="before the timings, profile one call of the first implementation at the "
                            "first seq_len: 'kernels' (the default when given bare: torch.profiler "
                            "table of one forward+backward, kernels by GPU time on CUDA), 'host' "
                            "(cProfile of many forward and forward+backward calls, by own time), or "
                            "'kernels,host'")
    bench.add_argument("--out-dir", default="bench_out", help="where bench.csv and bench.png go")

    insp = sub.add_parser(
        "inspect", formatter_class=_Formatter,
        help="draw which keys each query sees, with density and FLOPs vs dense",
        description="Prints the attention pattern of a dilated config as an ASCII grid (rows: "
                    "queries, columns: keys; one grid per distinct head pattern, then their union), "
                    "its density and its attention FLOPs against dense attention. Derived from the "
                    "package's own segment math. Sequences longer than --max-cells are drawn in blocks.")
    insp.add_argument("--seq-len", type=int, default=32, help="tokens (at most 4096)")
    insp.add_argument("--segment-lengths", type=int_list, default=[8, 16], help="comma-separated (default: 8,16)")
    insp.add_argument("--dilation-rates", type=int_list, default=[1, 2], help="comma-separated (default: 1,2)")
    insp.add_argument("--mode", choices=("groups", "longnet"), default="groups", help="dilated attention mode")
    insp.add_argument("--heads", type=int, default=None, help="default: the number of branches")
    insp.add_argument("--head-dim", type=int, default=64, help="for the FLOP count")
    insp.add_argument("--causal", action="store_true", help="causal attention")
    insp.add_argument("--union-only", action="store_true", help="draw only the union over heads")
    insp.add_argument("--max-cells", type=int, default=64, help="grid width in characters")

    plot = sub.add_parser("plot", formatter_class=_Formatter,
                          help="draw the bench PNG from a bench CSV (needs matplotlib)",
                          description="Draws the two-panel bench plot from a CSV written by `dilated-ops bench`.")
    plot.add_argument("csv", help="bench.csv")
    plot.add_argument("--out", default=None, help="PNG path (default: the CSV's path with .png)")
    return parser


def _implementations():
    """The built variants' names (the variant table), "auto" first."""
    from .. import variants
    return ("auto",) + tuple(v.name for v in variants.VARIANTS.values() if v.built)


def _bench_impls():
    """The names ``bench --impls`` accepts (besides aliases): one per row of the variant table,
    then the baselines and dense."""
    from .bench import impl_names
    return tuple(impl_names())


def _flatten(values):
    return None if values is None else [x for part in values for x in part]


def _bench_defaults(args) -> None:
    import torch

    from .bench import default_impls
    from .demo import resolve_device
    args.device = resolve_device(args.device)
    cuda = torch.device(args.device).type == "cuda"
    # Defaults sized per device: the CUDA ones are the table benchmarks/RESULTS.md reports, the
    # CPU ones finish in seconds.
    if args.dtype is None:
        args.dtype = "bfloat16" if cuda else "float32"
    args.seq_lens = _flatten(args.seq_lens) or ([4096, 16384, 65536, 262144] if cuda else [1024, 2048, 4096])
    if args.segment_lengths is None:
        args.segment_lengths = [2048, 4096, 8192] if cuda else [256, 512, 1024]
    if args.dilation_rates is None:
        args.dilation_rates = [2**i for i in range(len(args.segment_lengths))]
    args.modes = list(dict.fromkeys(_flatten(args.modes) or (["groups", "longnet"] if cuda else ["groups"])))
    args.impls = _flatten(args.impls) or default_impls()
    if args.repeats is None:
        args.repeats = 20 if cuda else 5
    if args.warmup is None:
        args.warmup = 5 if cuda else 1


def _validate_inspect(args) -> None:
    from .. import _checks
    _checks.check_segments(args.segment_lengths, args.dilation_rates)
    _checks.check_positive_int("seq_len", args.seq_len)
    if args.seq_len > 4096:
        raise ValueError(f"seq_len must be at most 4096 for inspect (it builds the full n x n pattern): "
                         f"got {args.seq_len}")
    if args.heads is None:
        args.heads = len(args.segment_lengths)
    _checks.check_positive_int("heads", args.heads)
    _checks.check_positive_int("head_dim", args.head_dim)
    _checks.check_positive_int("max_cells", args.max_cells)
    if args.mode == "groups":
        _checks.check_num_groups(args.heads, len(args.segment_lengths))


def _validate_plot(args) -> None:
    import os

    from ._paths import check_out_file
    if not os.path.isfile(args.csv):
        raise ValueError(f"argument csv: {args.csv}: " + ("is a directory" if os.path.isdir(args.csv)
                                                          else "no such file"))
    if not os.access(args.csv, os.R_OK):
        raise ValueError(f"argument csv: {args.csv}: not readable")
    if args.out is None:  # the CSV's path with .png
        args.out = (args.csv[:-4] if args.csv.endswith(".csv") else args.csv) + ".png"
        check_out_file("--out", args.out, hint=" (the default: the CSV's path with .png; pass --out PATH)")
    else:
        check_out_file("--out", args.out)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["demo"] + argv  # no subcommand: the demo (options go to it)
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # for sub.error(...)
    try:  # validation, before any work: TypeError/ValueError are the user's arguments
        if args.command == "demo":
            from . import demo
            demo.validate(args)
        elif args.command == "bench":
            from . import bench
            _bench_defaults(args)
            bench.validate(args)
        elif args.command == "inspect":
            _validate_inspect(args)
        elif args.command == "plot":
            _validate_plot(args)
    except (ValueError, TypeError) as e:
        sub.error(str(e))  # the package's messages name the argument; exit 2 like argparse
    try:
        if args.command == "demo":
            demo.run(args)
        elif args.command == "bench":
            bench.run(args)
        elif args.command == "inspect":
            from .pattern import describe
            print(describe(args.seq_len, args.heads, args.head_dim, args.segment_lengths, args.dilation_rates,
                           args.mode, args.causal, args.max_cells, per_head=not args.union_only))
        elif args.command == "plot":
            from . import bench
            out = args.out
            try:
                bench.plot(args.csv, out)
            except ImportError:
                sub.exit(1, "dilated-ops plot: error: matplotlib is not installed "
                            "(pip install 'dilated-ops[bench]' or pip install matplotlib)\n")
            except FileNotFoundError as e:
                sub.error(f"argument csv: {e}")
            except OSError as e:  # the CSV was readable (checked first): writing the PNG failed
                sub.error(f"--out {out}: cannot write it ({e.strerror or e})")
            print(f"wrote {out}")
    except ValueError as e:
        sub.error(str(e))
    except KeyboardInterrupt:
        return 130
    return 0
