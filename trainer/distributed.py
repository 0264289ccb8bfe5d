"""Several processes, one job: the trainer under torchrun (torch.distributed).

torchrun starts one process per device and sets RANK, LOCAL_RANK and WORLD_SIZE; `from_env()`
joins the process group (nccl on CUDA, gloo on CPU). Without torchrun (WORLD_SIZE unset or 1)
nothing here does anything and the trainer runs as a single process.

Rank 0 is the only reader: it owns the source, its offsets, the de-duplication and staleness
decisions, and sends every rank its share of each step's samples. So the source position in a
checkpoint describes what the whole job trained, whatever the world size. The small objects that
travel this way (a step's samples, the resume state, RNG states) go over a gloo group of their
own with a long timeout: a stream can keep rank 0 waiting for samples for hours while the other
ranks wait for it, and the NCCL watchdog of the main group would end the job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from cai.errors import InvalidArgument

T = TypeVar("T")

OBJECT_TIMEOUT = timedelta(days=7)  # rank 0 may wait this long for a stream's samples


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    objects: Any = None  # the gloo process group for Python objects

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: T | None) -> T:
        """Rank 0's `obj` on every rank (the others pass None)."""
        if not self.enabled:
            return cast(T, obj)
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.objects)
        return box[0]  # type: ignore[return-value]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on rank 0 (an empty list elsewhere)."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.leader else None
        dist.gather_object(obj, out, dst=0, group=self.objects)
        return out or []

    def all_gather(self, obj: T) -> list[T]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.objects)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=self.objects)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        return bool(self.sum([float(flag)])[0]) if self.enabled else flag

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.objects)

    def device(self, configured: str | None, default: str) -> str:
        """One device per process: `cuda` means this process's GPU (LOCAL_RANK)."""
        device = configured or default
        if self.enabled and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device


_current: Dist | None = None


def from_env() -> Dist:
    """This process's place in the job; joins the process group the first time under torchrun."""
    global _current
    if _current is not None:
        return _current
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise InvalidArgument(f"WORLD_SIZE, RANK, LOCAL_RANK: expected integers (torchrun's): {exc}") from exc
    if world <= 1:
        _current = Dist()
        return _current
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    objects = dist.new_group(backend="gloo", timeout=OBJECT_TIMEOUT)
    _current = Dist(rank, world, local, objects)
    return _current


def shutdown() -> None:
    """Leave the process group (at the end of `cai train`)."""
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = None


def share(count: int, rank: int, world_size: int) -> range:
    """The rows of a step's `count` samples that `rank` trains: a contiguous block of
    ceil(count / world_size), the last ranks' blocks shorter or empty when it does not divide."""
    per_rank = -(-count // world_size)
    start = min(count, rank * per_rank)
    return range(start, min(count, start + per_rank))


class FollowerSource:
    """What a rank other than 0 holds in place of the source: rank 0 reads, and sends each rank
    its share of every step (so the other ranks, on other nodes, need neither the run folder
    nor a Kafka connection)."""

    epoch = 0
    size: int | None = None

    def next(self) -> None:
        raise RuntimeError("only rank 0 reads the source")

    def state(self) -> dict[str, Any]:
        return {"kind": "rank-0"}

    def restore(self, state: dict[str, Any]) -> None:
        pass

    def committed(self) -> None:
        pass

    def close(self) -> None:
        pass
