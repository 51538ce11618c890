"""The machine state the factory's "auto" choice and the ring modules look at, as small
functions so tests can simulate CUDA machines and process groups (monkeypatch these)."""
from __future__ import annotations

import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


def distributed_world_size() -> int:
    """World size of the default torch.distributed process group, 1 when none is initialized."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
