"""Collectives objectives need beyond Accelerate's: an all-gather that carries gradients and takes
processes holding different numbers of rows (a process whose batch lost images to bad files), the
offset of a process's rows in it, making non-trained modules identical on every process, and the
two pieces that let a process with no rows at all still join every collective: a forward of
stand-in rows whose buffers are put back (`kept_buffers`), and the step's row count over processes
(`StepRows`), so that a step no process had a row for changes no weight and no optimizer state."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn


def launcher_flag(name: str) -> bool:
    """A yes/no variable of ``accelerate launch``'s environment (``ACCELERATE_USE_FSDP``, ...)."""
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def on_cpu_processes(cpu: bool) -> bool:
    """Whether this run's processes are CPU ones: ``trainer.cpu``, ``ACCELERATE_USE_CPU``, or no GPU."""
    return cpu or launcher_flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def launched_on_cpu_only() -> bool:
    """Several processes (torchrun's ``WORLD_SIZE``) on a machine with no accelerator: they must meet
    over gloo. Accelerate 1.16 sets that up only when told the run is on CPU (``cpu=True`` or
    ``ACCELERATE_USE_CPU``); otherwise each process trains alone, in a world of one."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _world() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def gather_sizes(rows: int, device: torch.device | str = "cpu") -> list[int]:
    """Every process's ``rows``, in rank order (``[rows]`` on one process). A collective: every
    process must call it. ``device`` is where the backend gathers (CUDA for NCCL)."""
    if _world() == 1:
        return [rows]
    mine = torch.tensor([rows], dtype=torch.long, device=device)
    parts = [torch.zeros_like(mine) for _ in range(_world())]
    torch.distributed.all_gather(parts, mine)
    return [int(p) for p in parts]


def rows_before(rows: int, device: torch.device | str = "cpu") -> int:
    """Where this process's ``rows`` start in a gather over processes (the rows of lower ranks); 0
    on one process. A collective: every process must call it."""
    if _world() == 1:
        return 0
    return sum(gather_sizes(rows, device)[: torch.distributed.get_rank()])


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, in rank order, with gradients flowing
    back to each process's own part (Accelerate's ``gather`` drops them). Identity on one process.

    Processes may hold different numbers of rows, none included: the sizes are gathered first, each
    part is padded to the largest, gathered, and cut back, so the padding neither reaches the result
    nor takes a gradient. Every process must call it, and every process's loss must depend on the
    result, since its backward is a collective too."""
    if _world() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    sizes = gather_sizes(tensor.shape[0], tensor.device)
    largest = max(sizes)
    if largest == 0:  # nothing anywhere: every process knows it, so none gathers
        return tensor
    if min(sizes) == largest:
        return torch.cat(all_gather(tensor.contiguous()), dim=0)
    padding = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
    parts = all_gather(torch.cat([tensor, padding]).contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)


@contextlib.contextmanager
def kept_buffers(*modules: nn.Module | None) -> Iterator[None]:
    """Run the block on scratch copies of every buffer of ``modules`` (batch-norm running statistics
    and their counters), then put the originals back, untouched: for a forward of stand-in rows that
    only makes a process with no images join DDP's and the losses' collectives, and must teach the
    model nothing. The copies are swapped in rather than the originals restored afterwards, since
    the backward of a batch norm checks that its running statistics were not changed in place."""
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    seen: set[int] = set()
    for module in modules:
        for sub in module.modules() if module is not None else ():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            for name, buffer in list(sub.named_buffers(recurse=False)):
                setattr(sub, name, buffer.detach().clone())
                swapped.append((sub, name, buffer))
    try:
        yield
    finally:
        for sub, name, buffer in swapped:
            setattr(sub, name, buffer)


class StepRows:
    """The rows one optimizer step learnt from, over its micro-batches and every process. A step
    without any (every image of it was bad, everywhere) should leave the weights and the optimizer
    state alone: `none_anywhere` tells so from ``before_optimizer_step`` (where every process is,
    so its reduce cannot hang) and `drop_gradients` makes the optimizer skip every parameter (torch's
    optimizers skip a parameter whose ``grad`` is None: no AdamW moment decay, no step count, no
    weight decay)."""

    def __init__(self) -> None:
        self.rows = 0
        self.batches = 0
        self.empty = False
        """Whether the step just taken had no rows anywhere (read by ``after_optimizer_step``)."""

    def add(self, rows: int) -> None:
        """One training micro-batch of ``rows`` usable rows."""
        self.rows += rows
        self.batches += 1

    def none_anywhere(self, device: torch.device | str = "cpu") -> bool:
        """Whether no process had a row this step: False when no batch was added (nothing is known;
        every process of a run adds its micro-batches alike). A collective under several processes."""
        if self.batches == 0:
            self.empty = False
            return False
        rows = self.rows
        if _world() > 1:
            total = torch.tensor([float(rows)], device=device)
            torch.distributed.all_reduce(total)
            rows = int(total.item())
        self.empty = rows == 0
        return self.empty

    @staticmethod
    def drop_gradients(model: nn.Module) -> None:
        for p in model.parameters():
            p.grad = None

    def reset(self) -> None:
        """After every step, taken or skipped."""
        self.rows = self.batches = 0


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every process's ``module`` (an EMA teacher
    built from a differently seeded init must start equal everywhere)."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(tensor.data, src=src)


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average ``module``'s floating-point buffers over processes: an EMA teacher's batch-norm running
    statistics, gathered from each process's own batches, become one estimate, the same everywhere."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return
    world = torch.distributed.get_world_size()
    for buffer in module.buffers():
        if buffer.is_floating_point():
            torch.distributed.all_reduce(buffer)
            buffer.div_(world)


class AttributeForwardingDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP whose unknown attributes come from the wrapped module, so an objective's ``compute`` can
    read ``model.config`` or ``model.backbone`` whether or not it runs under several processes."""

    def __getattr__(self, name: str):  # noqa: ANN204 - nn.Module's signature
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)
