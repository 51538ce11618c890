import random

import pytest
import torch


def random_configs(count: int, seed: int):
    """Random (batch, seq, heads, head_dim, segment_lengths, dilation_rates) with odd head
    counts, batch > 1, seq not a multiple of any segment, w > n, and r = w among them."""
    rng = random.Random(seed)
    fixed = [
        (2, 37, 5, 8, [4, 8, 16], [1, 2, 4]),      # n not a multiple of any w
        (1, 100, 3, 16, [64, 128], [2, 4]),        # w > n for the second branch
        (3, 20, 4, 8, [8], [8]),                   # r = w: one query per segment
        (2, 9, 7, 8, [4, 16], [2, 4]),             # tiny n, w > n
        (1, 1, 3, 8, [2, 4], [1, 2]),              # n = 1
        (2, 64, 13, 8, [16, 32, 64], [1, 2, 4]),   # 13 heads over 3 groups
        (3, 50, 1, 8, [16], [2]),                  # one head
    ]
    configs = list(fixed)
    while len(configs) < count:
        g = rng.randint(1, 4)
        rates = [rng.choice([1, 2, 3, 4]) for _ in range(g)]
        segs = [r * rng.choice([1, 2, 3, 5, 8]) for r in rates]
        h = rng.randint(g, 13)
        configs.append((rng.randint(1, 3), rng.randint(1, 300), h, rng.choice([8, 16, 32, 64]), segs, rates))
    return configs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def reset_dynamo():
    """Dynamo's caches cleared before and after the test (use with
    ``pytestmark = pytest.mark.usefixtures("reset_dynamo")``)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
