"""dilated_ops._bench: the one timing helper of the benchmarks and `dilated-ops bench` (CPU here;
the CUDA-event paths run in the benchmarks on the GPU machine)."""
import time

import pytest
import torch

from dilated_ops import _bench


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


def test_bad_arguments_name_themselves():
    fn, _ = _sleeper(0)
    with pytest.raises(ValueError, match=r"gpu_only needs a CUDA device, got device='cpu'"):
        _bench.times_ms(fn, 0, 1, device="cpu", gpu_only=True)
    with pytest.raises(ValueError, match=r"reps must be at least 2 for a spread, got reps=1"):
        _bench.forward_spread(fn, 0, 1, device="cpu")
