"""Device choice and torchrun / DistributedDataParallel set-up, shared by every training command."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place: rank 0 of 1 without torchrun."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over all ranks (x itself when alone)."""
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no usable CUDA GPU (torch.cuda.is_available() is False)")
    return torch.device(device)


def setup(device: str = "auto") -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world == 1:
        return Dist(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def teardown(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
