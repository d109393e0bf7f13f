"""Sharding categories over torchrun's processes (torchrun --nproc_per_node 4 run_training.py --type all ...).

Ranks train independent models on their own devices (cuda:LOCAL_RANK); rank 0 gathers only result rows, hence gloo,
which carries Python objects on CPUs and GPUs alike. Without torchrun's environment a run is a world of one."""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.errors import CutPasteError

# Ranks meet only once, at the end, where one may wait hours for the slowest: a generous timeout.
GATHER_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise CutPasteError(f"environment variable {name}={value!r} is not an integer; "
                            f"start the run with torchrun or unset it") from None


def setup() -> World:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the gloo group when there is more than one rank."""
    world = World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if world.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
    return world


def teardown(world: World) -> None:
    if world.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, world: World) -> torch.device:
    """With several ranks, CUDA without an index means this rank's own GPU, cuda:LOCAL_RANK."""
    if device.type != "cuda" or device.index is not None or world.world_size == 1:
        return device
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise CutPasteError(f"rank {world.rank} wants cuda:{world.local_rank} but this node has {count} GPU(s); "
                            f"give torchrun --nproc_per_node {count} or fewer")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def shard(items: list, world: World) -> list:
    return list(items[world.rank::world.world_size])


def gather_rows(rows: list[dict], world: World) -> list[dict] | None:
    if world.world_size == 1:
        return list(rows)
    gathered = [None] * world.world_size if world.is_main else None
    dist.gather_object(rows, gathered, dst=0)
    return [row for part in gathered for row in part] if world.is_main else None
