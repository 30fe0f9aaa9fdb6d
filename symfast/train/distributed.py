"""torchrun / torch.distributed, as the training loop uses it: one process per device, gloo on the
CPU and NCCL on CUDA, rank 0 the only writer."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class World:
    """This process's place among the ranks, and its device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False
    launcher_pid: int | None = None  # torchrun's agent, this rank's parent

    def check_launcher(self) -> None:
        """RuntimeError once torchrun is gone. torchrun starts each rank in a session of its own,
        so a SIGKILL of torchrun (or of its process group) leaves the ranks training on and
        writing into the run's folder beside the next run a user starts there."""
        if self.launcher_pid is not None and os.getppid() != self.launcher_pid:
            raise RuntimeError(f"rank {self.rank}: its torchrun launcher (pid {self.launcher_pid}) is "
                               f"gone, so this rank stops; the run resumes from its newest "
                               f"checkpoint with --resume auto")

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (a no-op on one process)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | torch.device | None = None) -> World:
    """The World of this process. Under torchrun (WORLD_SIZE > 1 in the environment) the process
    group is initialised here unless the caller already did: NCCL when CUDA is available, else
    gloo. One device per rank: cuda:LOCAL_RANK, or the CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        size, rank = dist.get_world_size(), dist.get_rank()
    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
    return World(rank=rank, size=size, local_rank=local_rank, device=device, owns_group=owns,
                 launcher_pid=launcher)
