"""Sharding categories over processes started by torchrun, and gathering their results on rank 0.

    torchrun --nproc_per_node 4 run_training.py --type all ...

Each category's model is independent, so ranks never exchange tensors: every rank trains its share
of the categories (round robin, in the order of --type) on its own device, one GPU per rank
(cuda:LOCAL_RANK) when CUDA is used, and rank 0 gathers the result rows into one table. The
process group therefore uses gloo, which carries those Python objects on CPUs and GPUs alike.
Without torchrun's environment everything here is a no-op and a run is a world of one.

Nothing here runs at import time.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from support.errors import CutPasteError

# Ranks wait for each other only once, at the end; a rank with fewer or faster categories may
# wait hours for the slowest, so the group's timeout is generous.
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
    """This rank's share: every world_size-th item, starting at its rank."""
    return list(items[world.rank::world.world_size])


def gather_rows(rows: list[dict], world: World) -> list[dict] | None:
    """All ranks' rows on rank 0 (in rank order); None on the other ranks."""
    if world.world_size == 1:
        return list(rows)
    gathered = [None] * world.world_size if world.is_main else None
    dist.gather_object(rows, gathered, dst=0)
    return [row for part in gathered for row in part] if world.is_main else None
