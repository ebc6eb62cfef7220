"""Data parallelism over torchrun: one process per GPU (or CPU process with gloo), FSDP2.

`parallel.data_parallel=fsdp` under `torchrun --nproc_per_node=N -m fp8lab train ...` shards
parameters, gradients and optimizer state over the ranks (FSDP2 `fully_shard`, per block
then the root, as torchtitan does). Each rank reads its own slice of every global batch (the
loader shards by rank), so N ranks with micro_batch_size B train on the batches one process
with N x B would. With `parallel.float8_all_gather` (fp8-tensorwise), weights are
all-gathered in FP8: half the bytes of bf16.

Only rank 0 writes files (logs, summary, checkpoint metadata) and prints; every rank joins
the collective parts (forward/backward, DCP checkpoint payloads, evaluation).

Several nodes: one torchrun per node with a c10d rendezvous (README, scripts/slurm-fsdp.sh),
and `parallel.replicate` = nodes for HSDP. Every rank writes its shards into the run directory
and rank 0 the metadata, so the run directory must be on a file system all nodes share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fp8lab.errors import FP8LabError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()


SINGLE = DistEnv()


def current() -> DistEnv:
    """This process's place: SINGLE unless a process group is up."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init(mode: str, device: str) -> DistEnv:
    """Start the process group for `parallel.data_parallel=mode` (none: nothing to do)."""
    if mode == "none":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise FP8LabError("launched by torchrun with WORLD_SIZE > 1 but parallel.data_parallel=none: every "
                              "rank would train the same run; set --parallel.data_parallel=fsdp")
        return SINGLE
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise FP8LabError("parallel.data_parallel=fsdp needs torchrun: "
                          "torchrun --nproc_per_node=N -m fp8lab train -c CONFIG ...")
    if dist.is_initialized():
        return current()
    cuda = device != "cpu" and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        # Modulo: a scheduler may show each process only its own GPU (CUDA_VISIBLE_DEVICES).
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    return current()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast(obj):
    """rank 0's `obj` on every rank (a name, a decision): one small pickle."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
