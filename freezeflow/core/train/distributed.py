"""Data-parallel training: what changes when torchrun starts N copies of one training run.

`torchrun --nproc-per-node N -m freezeflow.core.train` (or `freezeflow train --nproc N`) sets RANK,
WORLD_SIZE and LOCAL_RANK; `init_distributed` joins the process group (NCCL on GPU, gloo on CPU).
The rest of freezeflow asks `current()` and stays single-process code when the world is 1:

- every global batch is the one a single process would draw (same seed, same permutation) and
  each rank trains on its contiguous slice of it (`shard_order`): DDP averages the gradients, so
  for the same global batch the update is the single-process update (BatchNorm in trainable
  stages sees per-rank batch statistics: the only difference, as in any DDP run);
- the frozen-feature cache is built once, its batches split across ranks (`split_range`), then
  read by all of them from disk;
- only rank 0 writes checkpoints, models and reports and logs to MLflow.
Multi-node runs need the project folder (prepared data, feature cache, checkpoints) on a shared
filesystem, as usual for torchrun jobs.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from freezeflow.core.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_world() -> World:
    """The launcher's view (torchrun's env vars), valid before and after the group is joined."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise UserError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun): {exc}") from None


def is_main_process() -> bool:
    return read_world().is_main


def current() -> World:
    """The joined group's world, or a world of one when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), read_world().local_rank)
    return World()


def init_distributed(device: str = "auto", timeout_min: int = 60) -> World:
    """Join the process group torchrun set up (no-op for a single process or when joined already)."""
    world = read_world()
    if world.enabled and device.startswith("cuda:"):
        raise UserError(f"params/train.yaml: device: {device!r} would put every torchrun rank on that one GPU; "
                        "allowed under torchrun: auto or cuda (rank r uses GPU LOCAL_RANK r; choose the GPUs "
                        "with CUDA_VISIBLE_DEVICES)")
    if not world.enabled or (dist.is_available() and dist.is_initialized()):
        return current()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} CUDA device(s): "
                            "start at most one process per GPU (--nproc)")
        torch.cuda.set_device(world.local_rank)  # "cuda" now means this rank's GPU
    # a long feature-cache build on one rank keeps the others waiting at a barrier: generous timeout
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min))
    return current()


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().enabled:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. writes a cache), then the others (which find it written)."""
    world = current()
    if world.enabled and not world.is_main:
        dist.barrier()
    yield
    if world.enabled and world.is_main:
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank: decisions (a file exists, val accuracy) must agree everywhere."""
    if not current().enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_values(values: list[float]) -> list[float]:
    """Sums over ranks (e.g. loss sum, correct, seen of an epoch)."""
    if not current().enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def check_batch_size(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise UserError(f"params/train.yaml: batch_size: {batch_size} is the global batch and must split evenly "
                        f"over {world.size} processes; allowed: a multiple of {world.size}")


def shard_order(order: np.ndarray, batch_size: int, world: World) -> np.ndarray:
    """This rank's slice of every global batch: order (steps * B,) -> (steps * B / world,)."""
    if not world.enabled:
        return order
    per_rank = batch_size // world.size
    batches = order.reshape(-1, batch_size)  # (steps, B): whole batches only (the engine drops the rest)
    return batches[:, world.rank * per_rank:(world.rank + 1) * per_rank].reshape(-1)


def split_range(n_batches: int, world: World) -> tuple[int, int]:
    """Contiguous batch indices [lo, hi) this rank computes, so parts concatenate in rank order."""
    bounds = np.linspace(0, n_batches, world.size + 1).round().astype(int)
    return int(bounds[world.rank]), int(bounds[world.rank + 1])


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over the parameters that train now (rebuilt when freezing changes)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    # BatchNorm statistics stay per rank (rank 0's are saved): no buffer broadcast before every step
    names = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, **no_sync)


def build_launch_command(nproc: int, module: str, args: list[str]) -> list[str]:
    """torchrun on this machine: `nproc` copies of `python -m module args` in one process group."""
    if nproc < 1:
        raise UserError(f"--nproc: {nproc}; allowed: 1 or more (one process per GPU, or CPU processes with gloo)")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc: {nproc} but this machine has {torch.cuda.device_count()} GPU(s); allowed: at "
                        f"most {torch.cuda.device_count()}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]
