"""Process layout from the launcher's environment (torchrun / accelerate launch set RANK, WORLD_SIZE, LOCAL_RANK) and
a barrier through a gloo process group; a single process needs neither. No DeepSpeed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def dist_info() -> DistInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK from the environment (defaults 0 / 1 / RANK)."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank} WORLD_SIZE={world}")
    return DistInfo(rank, world, _env_int("LOCAL_RANK", rank))


def init(info: DistInfo, timeout_hours: float = 48.0) -> None:
    """Join a gloo process group (only for the barriers) when there are several processes."""
    if info.world_size == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size,
                                timeout=timedelta(hours=timeout_hours))


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
