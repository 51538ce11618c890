"""`dilated-ops bench`, the one benchmark command, and its helpers (dilated_ops._bench) on the
CPU: timing, useful FLOPs, the baselines against the op, and the command's rows (variants from
the variant table, not-built rows listed and untimed, modes, --spread, --compile, --profile,
dense last, aliases, argument errors). The CUDA-event paths run on the GPU machine."""
import csv
import dataclasses
import re
import time

import pytest
import torch

from dilated_ops import _bench, variants
from dilated_ops.cli import bench, main
from dilated_ops.functional import dilated_attention

TINY = ["bench", "--device", "cpu", "--heads", "2", "--head-dim", "8", "--segment-lengths", "16,32",
        "--dilation-rates", "1,2", "--repeats", "2", "--warmup", "1"]


def _sleeper(ms):
    calls = []

    def fn():
        calls.append(1)
        time.sleep(ms / 1e3)
        return [torch.ones(2)]
    return fn, calls


def test_times_ms_runs_warmup_then_reps_and_measures_them():
    fn, calls = _sleeper(3)
    times = _bench.times_ms(fn, warmup=2, reps=5, device="cpu")
    assert len(calls) == 7 and len(times) == 5
    assert all(3.0 <= t < 1000 for t in times)
    assert _bench.time_ms(fn, 0, 3, device="cpu") >= 3.0


def test_forward_spread_orders_its_deciles_and_runs_without_grad():
    seen = []

    def make():
        seen.append(torch.is_grad_enabled())
        time.sleep(0.001 * (1 + len(seen) % 3))
        return [torch.ones(2)]
    p10, p50, p90, gpu = _bench.forward_spread(make, warmup=1, reps=9, device="cpu")
    assert 1.0 <= p10 <= p50 <= p90 and p90 >= 2.0
    assert gpu is None  # no GPU-only time without CUDA
    assert seen and not any(seen)


def test_measure_resets_gradients_and_has_no_cpu_peak():
    x = torch.randn(4, requires_grad=True)
    f, fb, peak = _bench.measure(lambda: [x * 2], (x,), warmup=1, reps=2, device="cpu")
    assert f > 0 and fb > 0 and peak is None
    assert x.grad is None  # else every timed backward after the first would also accumulate


def test_bad_arguments_name_themselves():
    fn, _ = _sleeper(0)
    with pytest.raises(ValueError, match=r"gpu_only needs a CUDA device, got device='cpu'"):
        _bench.times_ms(fn, 0, 1, device="cpu", gpu_only=True)
    with pytest.raises(ValueError, match=r"reps must be at least 2 for a spread, got reps=1"):
        _bench.forward_spread(fn, 0, 1, device="cpu")


def test_useful_flops_count_each_branch_once():
    # groups: one head per branch; branch (16, 1): 4*1*64*16*8, branch (32, 2): 4*1*64*(32/4)*8.
    assert _bench.useful_flops(64, 2, 8, [16, 32], [1, 2], "groups", False) == 32768 + 16384
    assert _bench.useful_flops(64, 2, 8, [16, 32], [1, 2], "longnet", False) == 2 * (32768 + 16384)
    assert _bench.useful_flops(64, 2, 8, [16, 32], [1, 2], "groups", True) == (32768 + 16384) / 2
    assert _bench.dense_flops(64, 2, 8, False) == 4 * 2 * 64 * 64 * 8


@pytest.mark.parametrize("causal", [False, True])
def test_naive_baseline_computes_the_op(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 64, 3, 8, dtype=torch.float64) for _ in range(3))
    want = dilated_attention(q, k, v, [16, 32], [1, 2], is_causal=causal)
    torch.testing.assert_close(_bench.naive(q, k, v, [16, 32], [1, 2], causal), want, rtol=0, atol=1e-12)


def test_pregathered_baseline_is_attention_on_the_gathered_segments():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    batches = _bench.pregather(q, k, v, [16], [2])
    assert len(batches) == 1 and all(t.is_leaf and t.requires_grad for t in batches[0])
    (out,) = _bench.pregathered(batches)
    assert out.shape == (64 // 16, 2, 16 // 2, 8)  # (segments, heads, w / r, head_dim)
    # The op's output at the attended positions (offset 0, every 2nd token) of each segment.
    want = dilated_attention(q, k, v, [16], [2]).detach()[0, 0::2]  # (n / r, heads, head_dim)
    torch.testing.assert_close(out.detach().transpose(1, 2).reshape(32, 2, 8), want)
    assert _bench.baseline_applies(64, [16, 32], "groups") is None
    assert "divide seq_len 48" in _bench.baseline_applies(48, [16, 32], "groups")
    assert "groups mode only" in _bench.baseline_applies(64, [16], "longnet")


def _csv(path):
    with open(path / "bench.csv", newline="") as f:
        return list(csv.DictReader(f))


def _timed(rows):
    return [r for r in rows if r["median_ms"]]


def test_default_impls_come_from_the_variant_table(tmp_path, capsys, monkeypatch):
    # Every row is built now: "block_sparse" is marked unbuilt here (as the table marks one) to
    # check that such a row is listed with its reason and not timed.
    missing = "block_sparse: block-sparse attention is not built yet"
    monkeypatch.setitem(variants.VARIANTS, "block_sparse",
                        dataclasses.replace(variants.VARIANTS["block_sparse"], missing=missing))
    assert main(TINY + ["--seq-lens", "64", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = _csv(tmp_path)
    built = [f"dilated-{n}" for n, v in variants.VARIANTS.items() if v.built and n != "ring" and not v.needs_group]
    assert {r["impl"] for r in _timed(rows)} == set(built) | {"pregathered", "naive", "dense"}
    assert all(float(r["median_ms"]) > 0 and float(r["useful_tflops"]) > 0 for r in _timed(rows))
    mine = [r for r in rows if r["impl"] == "dilated-block_sparse"]
    assert len(mine) == 2 and all(r["note"] == f"not built: {missing}" and not r["median_ms"] for r in mine)
    assert re.search(r"\|     all \| dilated-block_sparse +\| not built", out), out
    # A process-group row is listed, not timed, by the one-process command.
    mine = [r for r in rows if r["impl"] == "dilated-distributed"]
    assert len(mine) == 2 and all(r["note"].startswith("not timed here") and not r["median_ms"] for r in mine)
    assert "dilated-ring" not in {r["impl"] for r in rows}
    assert "| seq_len | impl" in out and f"wrote {tmp_path / 'bench.csv'}" in out


def test_modes_spread_and_csv_columns(tmp_path):
    assert main(TINY + ["--seq-lens", "64", "128", "--modes", "groups", "longnet", "--spread", "--repeats", "3",
                        "--impls", "dilated-improved,dilated-standard,pregathered,naive,dense",
                        "--out-dir", str(tmp_path)]) == 0
    rows = _csv(tmp_path)
    assert list(rows[0]) == bench.COLUMNS
    got = {(int(r["seq_len"]), r["impl"], r["mode"]) for r in rows}
    want = {(n, i, m) for n in (64, 128) for i in ("dilated-improved", "dilated-standard")
            for m in ("groups", "longnet")}
    want |= {(n, i, "groups") for n in (64, 128) for i in ("pregathered", "naive")}
    want |= {(64, "dense", ""), (128, "dense", "")}
    assert got == want and len(rows) == 2 * len(want)
    for r in rows:
        assert float(r["median_ms"]) > 0 and r["torch"] == torch.__version__ and r["device"].startswith("CPU")
        if r["pass"] == "fwd":
            p10, p50, p90 = (float(r[c]) for c in ("fwd_p10_ms", "fwd_p50_ms", "fwd_p90_ms"))
            assert 0 < p10 <= p50 <= p90
            assert r["fwd_gpu_ms"] == ""  # GPU-only time needs CUDA
        else:
            assert r["fwd_p50_ms"] == ""
    # Useful FLOPs: longnet runs every head in every branch, twice groups' work here.
    fl = {(r["impl"], r["mode"]): float(r["useful_tflops"]) * float(r["median_ms"]) for r in rows
          if r["pass"] == "fwd" and r["seq_len"] == "64"}
    groups_flops = _bench.useful_flops(64, 2, 8, [16, 32], [1, 2], "groups", False)
    assert fl[("dilated-standard", "groups")] == pytest.approx(groups_flops / 1e9, rel=1e-3)
    assert fl[("dilated-standard", "longnet")] == pytest.approx(2 * fl[("dilated-standard", "groups")], rel=1e-3)


def test_dense_rows_run_after_all_others(tmp_path, monkeypatch):
    order = []
    real = bench._callable

    def spy(n, impl, *a, **k):
        order.append((n, impl))
        return real(n, impl, *a, **k)
    monkeypatch.setattr(bench, "_callable", spy)
    assert main(TINY + ["--seq-lens", "32,64", "--impls", "dense,dilated-standard,pregathered", "--repeats", "1",
                        "--out-dir", str(tmp_path)]) == 0
    assert order == [(32, "dilated-standard"), (32, "pregathered"), (64, "dilated-standard"), (64, "pregathered"),
                     (32, "dense"), (64, "dense")]
    # Written grouped by seq_len, in the order of --impls.
    assert [(r["seq_len"], r["impl"]) for r in _csv(tmp_path)][::2] == [
        ("32", "dense"), ("32", "dilated-standard"), ("32", "pregathered"),
        ("64", "dense"), ("64", "dilated-standard"), ("64", "pregathered")]


def test_aliases_and_the_same_call_timed_once(tmp_path, capsys):
    assert main(TINY + ["--seq-lens", "64", "--impls", "op,op-sdpa,dilated-ring,block-sparse,dilated-block-sparse",
                        "--out-dir", str(tmp_path)]) == 0
    rows = _csv(tmp_path)
    assert [r["impl"] for r in rows[::2]] == ["dilated-improved", "dilated-standard", "dilated-ring",
                                              "dilated-block_sparse"]
    ring = [r for r in rows if r["impl"] == "dilated-ring"]
    assert ring and all(not r["median_ms"] and r["note"].startswith("same call as dilated-improved") for r in ring)
    assert all(float(r["median_ms"]) > 0 for r in rows if r["impl"] in ("dilated-improved", "dilated-standard"))


def test_rows_that_cannot_run_say_why(tmp_path, monkeypatch):
    # A row the variant table lists without CPU bfloat16 (made so here: every row runs it since
    # the CPU half-precision backward works); 48 tokens: the gather baselines need every segment
    # length to divide seq_len; --dense-max 0: no dense rows.
    import dataclasses

    from dilated_ops import variants
    row = variants.VARIANTS["standard"]
    monkeypatch.setitem(variants.VARIANTS, "standard", dataclasses.replace(row, devices=row.devices[1:]))
    assert main(TINY + ["--seq-lens", "48", "--dtype", "bfloat16", "--dense-max", "0",
                        "--impls", "dilated-standard,dilated-improved,naive,dense", "--out-dir", str(tmp_path)]) == 0
    rows = _csv(tmp_path)
    notes = {r["impl"]: r["note"] for r in rows if not r["median_ms"]}
    assert set(notes) == {"dilated-standard", "naive", "dense"}
    assert notes["dilated-standard"] == "skipped: standard does not run bfloat16 on cpu"
    assert "divide seq_len 48" in notes["naive"] and notes["dense"] == "skipped: seq_len > --dense-max 0"
    assert all(float(r["median_ms"]) > 0 for r in rows if r["impl"] == "dilated-improved")  # CPU bf16 runs


def test_compile_adds_a_compiled_row_next_to_each_eager_one(tmp_path):
    assert main(TINY + ["--seq-lens", "64", "--impls", "dilated-standard,dense", "--compile", "default",
                        "--out-dir", str(tmp_path)]) == 0
    rows = _csv(tmp_path)
    assert [(r["impl"], r["compile"]) for r in rows[::2]] == [
        ("dilated-standard", ""), ("dilated-standard", "default"), ("dense", "")]
    assert all(float(r["median_ms"]) > 0 for r in rows)


def test_profile_prints_the_kernel_table_and_the_host_profile(tmp_path, capsys):
    assert main(TINY + ["--seq-lens", "64", "--impls", "dilated-standard", "--profile", "kernels,host",
                        "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "profile (kernels): dilated-standard (groups), seq_len 64" in out and "Self CPU" in out
    assert "profile (host): dilated-standard (groups), seq_len 64, forward, no grad: cProfile of 20 calls" in out
    assert "profile (host): dilated-standard (groups), seq_len 64, forward+backward" in out
    assert "dilated_attention" in out.split("profile (host)")[1]  # the op's own frames are listed
    assert main(TINY + ["--seq-lens", "64", "--impls", "dense", "--profile", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "profile (kernels): dense, seq_len 64" in out and "profile (host)" not in out


@pytest.mark.parametrize("argv, needle", [
    (["--impls", "dense,flash9"], "impls must be among dilated-standard, dilated-improved"),
    (["--impls", "dilated-nope"], "got ['dilated-nope']"),
    (["--modes", "groups,sparse"], "mode must be 'groups' or 'longnet': got 'sparse'"),
    (["--spread", "--repeats", "1"], "repeats must be at least 2 with --spread"),
    (["--profile", "gpu"], "profile must be among kernels, host: got ['gpu']"),
    (["--compile", "fast"], "argument --compile: invalid choice: 'fast'"),
    (["--dense-max", "-1"], "dense_max must be a positive int: got -1"),
    (["--decode", "--documents", "2"], "decode times one step in one process: it takes no --documents"),
])
def test_bad_bench_arguments_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(TINY + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and "usage: dilated-ops bench" in err


@pytest.mark.parametrize("extra, inputs", [
    (["--kv-heads", "1"], "GQA 2:1"),
    (["--padding", "0.25"], "last 0.25 of keys padded"),
    (["--documents", "4"], "4 packed documents"),
])
def test_gqa_padding_and_documents_reach_the_op(extra, inputs, tmp_path, monkeypatch):
    """--kv-heads, --padding, --documents: the dilated rows' kernels get K/V of that many heads,
    the padding mask or one call per document; rows that take none of them say so."""
    from dilated_ops.kernels import packed
    from dilated_ops.registrations import dilated_attention as reg
    seen = []

    def spy(real):
        def forward(q, k, v, *args):
            seen.append((q.shape[1], k.shape[2], args[-1] if len(args) >= 11 else None))
            return real(q, k, v, *args)
        return forward
    for mod in (reg, packed):
        monkeypatch.setattr(mod, "dilated_attention_forward", spy(mod.dilated_attention_forward))
    assert main(TINY + ["--seq-lens", "64", "--impls", "dilated-standard,naive,dense", "--out-dir", str(tmp_path)]
                + extra) == 0
    rows = _csv(tmp_path)
    assert all(r["inputs"] == inputs for r in rows)
    notes = {r["impl"]: r["note"] for r in rows}
    assert notes["naive"] == "skipped: naive takes no GQA, padding or packed documents"
    assert all(float(r["median_ms"]) > 0 for r in rows if r["impl"] == "dilated-standard")
    assert (notes["dense"] == "skipped: dense takes no packed documents") == (extra[0] == "--documents")
    assert seen
    if extra[0] == "--kv-heads":
        assert {(n, kv) for n, kv, _ in seen} == {(64, 1)}
    if extra[0] == "--padding":
        masks = [m for _, _, m in seen]
        assert all(m is not None and m.sum().item() == 48 and m[:, 48:].sum() == 0 for m in masks)
    if extra[0] == "--documents":
        assert {n for n, _, _ in seen} == {16}  # every call is one 16-token document (equal runs batched)


@pytest.mark.parametrize("argv, needle", [
    (["--kv-heads", "3"], "kv_heads must divide heads (2): got 3"),
    (["--padding", "1.5"], "padding must be a fraction in [0, 1): got 1.5"),
    (["--documents", "3", "--seq-lens", "64"], "documents (3) must divide every seq_len: got seq_lens [64]"),
])
def test_bad_input_options_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(TINY + argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_decode_times_one_step_of_the_decode_op_and_dense(tmp_path, monkeypatch):
    """--decode: each dilated row times dilated_attention_decode on one query at the end of a
    cache of seq_len keys (timed once for all dilated rows: one op), dense SDPA over the whole
    cache; rows without a decode step say so."""
    from dilated_ops import functional
    seen, real = [], functional.dilated_attention_decode

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1], k.shape[2], kwargs["is_causal"]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(functional, "dilated_attention_decode", spy)
    assert main(TINY + ["--seq-lens", "64,96", "--decode", "--kv-heads", "1", "--modes", "longnet",
                        "--impls", "dilated-standard,dilated-improved,naive,dense", "--out-dir", str(tmp_path)]) == 0
    rows = _csv(tmp_path)
    notes = {(r["seq_len"], r["impl"]): r["note"] for r in rows if not r["median_ms"]}
    assert notes == {
        ("64", "dilated-improved"): "same call as dilated-standard (dilated_attention_decode): timed once, under "
                                    "that name",
        ("96", "dilated-improved"): "same call as dilated-standard (dilated_attention_decode): timed once, under "
                                    "that name",
        ("64", "naive"): "skipped: naive has no decode step (--decode times dilated_attention_decode and dense)",
        ("96", "naive"): "skipped: naive has no decode step (--decode times dilated_attention_decode and dense)",
    }
    assert all(float(r["median_ms"]) > 0 for r in rows if r["impl"] in ("dilated-standard", "dense"))
    assert {s for s in seen} == {(1, 64, 1, True), (1, 96, 1, True)}
    flops = {r["seq_len"]: float(r["useful_tflops"]) * float(r["median_ms"]) * 1e9
             for r in rows if r["impl"] == "dense" and r["pass"] == "fwd"}
    assert flops["64"] == pytest.approx(4 * 8 * 2 * 64, rel=1e-3)  # 4 d h n: one query, every key


def test_decode_flops_count_the_keys_a_step_reads():
    # n = 20, the query at 19: branch (8, 1) reads 16..19 (4 keys, every head); branch (16, 2):
    # segment 16.., class 1, keys 17 and 19, in longnet the heads with offset 1 (2 of 4)
    assert _bench.decode_flops(20, 4, 8, [8, 16], [1, 2], "longnet") == 4 * 8 * (4 * 4 + 2 * 2)
    # groups: heads 0-1 branch 0 (4 keys each), heads 2-3 branch 1 with offset 1 % 2 = 1 (2 keys each)
    assert _bench.decode_flops(20, 4, 8, [8, 16], [1, 2], "groups") == 4 * 8 * (2 * 4 + 2 * 2)
