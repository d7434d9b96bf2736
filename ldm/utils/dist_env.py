"""Where this process sits in a distributed job: rank, world size, local rank and DataLoader worker.

Launchers describe a process differently, and a DataLoader worker started with `spawn` has no process
group, so the answer comes from the first source that has it (see `dist_env`).
"""

import os
from dataclasses import dataclass

import torch
from torch.utils.data import get_worker_info


@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank of the training process (a worker reports its parent's)
    world_size: int
    local_rank: int  # rank on this node (the GPU index)
    worker: int  # DataLoader worker id, 0 outside a worker
    num_workers: int  # DataLoader workers of this rank, 1 outside a worker
    source: str  # where rank and world size came from: torch.distributed, torchrun, lightning, slurm or single


def _int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _local_rank(default: int) -> int:
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if name in os.environ:
            return _int(name)
    return default


def _set(*names: str) -> bool:
    return all(name in os.environ for name in names)


def _lightning_rank() -> int:
    """Lightning's own launcher gives children LOCAL_RANK, NODE_RANK and WORLD_SIZE but no RANK."""
    local_rank, node_rank = _int("LOCAL_RANK"), _int("NODE_RANK") if "NODE_RANK" in os.environ else 0
    if node_rank == 0:
        return local_rank
    if "LOCAL_WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"NODE_RANK={node_rank} and LOCAL_RANK={local_rank} without RANK: the global rank needs LOCAL_WORLD_SIZE "
            "(processes per node); set it, launch with torchrun or srun, or pin the dataset's rank with set_rank()"
        )
    return node_rank * _int("LOCAL_WORLD_SIZE") + local_rank


def dist_env() -> DistEnv:
    """This process's rank and world size from the first of these that has them, plus its DataLoader worker.

    1. torch.distributed, when initialised here (also in DataLoader workers forked after it was);
    2. RANK, WORLD_SIZE: torchrun / torch elastic (wins over SLURM_*, so `srun torchrun` works);
    3. LOCAL_RANK, WORLD_SIZE without RANK: Lightning's launcher (rank = NODE_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK);
       it wins over SLURM_*, which a Lightning launch inside an allocation inherits from the batch step;
    4. SLURM_PROCID, SLURM_NTASKS: srun, one task per GPU;
    5. otherwise a single process.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size, source = torch.distributed.get_rank(), torch.distributed.get_world_size(), "torch.distributed"
        local_rank = _local_rank(default=rank)
    elif _set("RANK", "WORLD_SIZE"):
        rank, world_size, source = _int("RANK"), _int("WORLD_SIZE"), "torchrun"
        local_rank = _local_rank(default=rank)
    elif _set("LOCAL_RANK", "WORLD_SIZE"):
        rank, world_size, source = _lightning_rank(), _int("WORLD_SIZE"), "lightning"
        local_rank = _int("LOCAL_RANK")
    elif _set("SLURM_PROCID", "SLURM_NTASKS"):
        rank, world_size, source = _int("SLURM_PROCID"), _int("SLURM_NTASKS"), "slurm"
        local_rank = _int("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else rank
    else:
        rank, world_size, local_rank, source = 0, 1, 0, "single"
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size}) (read from {source})")
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return DistEnv(rank, world_size, local_rank, worker, num_workers, source)
