"""Process groups for data-parallel training under ``torchrun``.

``torchrun --nproc_per_node N -m cenet train ...`` starts N processes and gives each the
environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (and
``MASTER_ADDR``/``MASTER_PORT`` for the rendezvous). :func:`session` reads them, initializes the
default process group (gloo on the CPU, NCCL on CUDA unless told otherwise) and picks this
process's device (``cuda:LOCAL_RANK`` on CUDA). Without these variables, or with
``WORLD_SIZE=1``, there is a single process and no process group, and every helper here is a
cheap no-op (:func:`rank` 0, :func:`world_size` 1, sums returned unchanged).

The helpers wrap :mod:`torch.distributed`: sums of metrics over the processes, broadcast of
Python objects from rank 0, and :func:`agree` / :func:`run_on_main`, which turn an error on one
process into the same error on all of them instead of leaving the others waiting forever in
the next collective.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

T = TypeVar("T")

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""The variables ``torchrun`` sets that :func:`env_ranks` needs (``LOCAL_WORLD_SIZE`` is
optional)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    Attributes:
        rank: global rank, ``0..world_size-1``.
        world_size: number of processes ``W``.
        local_rank: rank within this node (selects the CUDA device).
        local_world_size: processes on this node.
        backend: the process group's backend, ``None`` when there is no process group
            (a single process).
        device: this process's device.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files and INFO logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group of more than one process is in use."""
        return self.backend is not None


def env_ranks(environ: dict[str, str] | None = None) -> tuple[int, int, int, int] | None:
    """``(rank, world_size, local_rank, local_world_size)`` from the ``torchrun`` variables.

    Args:
        environ: the environment (default ``os.environ``).

    Returns:
        The four numbers, or ``None`` when none of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` is
        set (a plain single-process start).

    Raises:
        ValueError: when only some of them are set, one is not an integer, or they are
            inconsistent (``rank`` outside ``0..world_size-1``).
    """
    env = os.environ if environ is None else environ
    present = [k for k in ENV_KEYS if k in env]
    if not present:
        return None
    if len(present) != len(ENV_KEYS):
        missing = [k for k in ENV_KEYS if k not in env]
        raise ValueError(
            f"distributed environment incomplete: {', '.join(present)} set but "
            f"{', '.join(missing)} missing; start with torchrun (which sets all of them) or "
            f"unset them for a single process"
        )
    try:
        rank, world, local = (int(env[k]) for k in ENV_KEYS)
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        values = {k: env.get(k) for k in (*ENV_KEYS, "LOCAL_WORLD_SIZE")}
        raise ValueError(
            f"distributed environment variables must be integers, got {values}"
        ) from None
    if world < 1 or not 0 <= rank < world or not 0 <= local < max(local_world, 1):
        raise ValueError(
            f"inconsistent distributed environment: RANK={rank} WORLD_SIZE={world} "
            f"LOCAL_RANK={local} LOCAL_WORLD_SIZE={local_world}"
        )
    return rank, world, local, max(local_world, 1)


def env_rank() -> int:
    """This process's ``RANK`` from the environment (0 without ``torchrun``); usable before
    and after :func:`session`, e.g. to print a summary on rank 0 only."""
    ranks = env_ranks()
    return 0 if ranks is None else ranks[0]


def default_backend(device: torch.device) -> str:
    """``"nccl"`` for a CUDA device, ``"gloo"`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def _device_for(device: str, local_rank: int, multi: bool) -> torch.device:
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device=cpu")
    # one device per process: cuda:LOCAL_RANK; a single process keeps the device it was given
    index = local_rank if multi else (dev.index if dev.index is not None else 0)
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"this process needs cuda:{index} (device={device!r}, LOCAL_RANK={local_rank}) but "
            f"there are only {torch.cuda.device_count()} CUDA device(s); start at most that many "
            f"processes per node"
        )
    return torch.device("cuda", index)


@contextlib.contextmanager
def session(device: str = "cpu", backend: str | None = None) -> Iterator[DistContext]:
    """Initialize the process group from the ``torchrun`` environment for the duration of the
    ``with`` block, and destroy it afterwards (also on error).

    Nothing is initialized for a single process (no ``torchrun`` variables, or
    ``WORLD_SIZE=1``), nor when a process group already exists (the caller owns it; it is then
    used and left alone). On ranks other than 0 the ``cenet`` logger is raised to WARNING
    for the block, so that INFO lines come from rank 0 only.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; with several processes a CUDA run uses
            ``cuda:LOCAL_RANK`` on each (and makes it the current device).
        backend: ``torch.distributed`` backend; ``None`` = NCCL on CUDA, gloo on the CPU.

    Yields:
        The :class:`DistContext` of this process.

    Raises:
        ValueError: for an incomplete or inconsistent environment, a CUDA device that is not
            there, or ``backend="nccl"`` with ``device="cpu"``.
    """
    ranks = env_ranks()
    owned = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = ranks[2] if ranks else 0
        local_world = ranks[3] if ranks else 1
        dev = _device_for(device, local, world > 1)
        used_backend: str | None = dist.get_backend()
    else:
        rank, world, local, local_world = ranks if ranks is not None else (0, 1, 0, 1)
        dev = _device_for(device, local, world > 1)
        used_backend = None
        if world > 1:
            used_backend = backend or default_backend(dev)
            if used_backend == "nccl" and dev.type != "cuda":
                raise ValueError(
                    f"dist_backend='nccl' needs CUDA devices, but device={device!r}; use "
                    f"dist_backend=gloo (or null) on the CPU"
                )
            if not dist.is_available():
                raise ValueError("this torch build has no torch.distributed support")
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=used_backend, **kwargs)
            owned = True
    ctx = DistContext(rank, world, local, local_world, used_backend, dev)
    cenet_logger = logging.getLogger("cenet")
    old_level = cenet_logger.level
    if rank != 0 and cenet_logger.getEffectiveLevel() < logging.WARNING:
        cenet_logger.setLevel(logging.WARNING)
    try:
        yield ctx
    finally:
        cenet_logger.setLevel(old_level)
        if owned:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- queries


def is_distributed() -> bool:
    """True when a default process group of more than one process exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def _comm_device() -> torch.device:
    """Where tensors must be for collectives: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- collectives


def barrier() -> None:
    """Wait for every process (a no-op for one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor | Sequence[float]) -> torch.Tensor | list[float]:
    """Sum ``values`` over the processes.

    Args:
        values: a tensor (any shape, dtype and device; returned on its own device and dtype,
            reduced in float64 for floating values), or a sequence of Python numbers (summed
            in float64 and returned as a list of floats).

    Returns:
        The sums, in the type given; ``values`` itself (as a tensor or list) for one process.
    """
    if isinstance(values, torch.Tensor):
        if not is_distributed():
            return values
        wide = torch.float64 if values.is_floating_point() else torch.int64
        buf = values.detach().to(_comm_device(), wide).clone()
        dist.all_reduce(buf)
        return buf.to(values.device, values.dtype)
    numbers = [float(v) for v in values]
    if not is_distributed():
        return numbers
    buf = torch.tensor(numbers, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(buf)
    return buf.cpu().tolist()


def broadcast_object(obj: T, *, src: int = 0, weights_only: bool = False) -> T:
    """``obj`` of rank ``src`` on every process (``obj`` of the others is ignored).

    Args:
        obj: a picklable object.
        src: the sending rank.
        weights_only: receive with ``torch.load(weights_only=True)`` semantics (tensors and
            plain data only), e.g. for checkpoints.

    Returns:
        Rank ``src``'s object; ``obj`` itself for one process.
    """
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, weights_only=weights_only)
    return box[0]


def all_gather_objects(obj: T) -> list[T]:
    """The ``obj`` of every process, indexed by rank (``[obj]`` for one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module, *, src: int = 0) -> None:
    """Copy the buffers of ``module`` on rank ``src`` (e.g. BN and CE running statistics) into
    the same module on every other process, in place; a no-op for one process. Every process
    must call it with a module of the same structure. (Parameters need no such copy in DDP
    training: every process applies the same averaged gradients to the same weights.)"""
    if not is_distributed():
        return
    dev = _comm_device()
    with torch.no_grad():
        for buf in module.buffers():
            if buf.device == dev:
                dist.broadcast(buf, src=src)
            else:
                tmp = buf.to(dev)
                dist.broadcast(tmp, src=src)
                buf.copy_(tmp)


# ----------------------------------------------------------------------------- errors


class RemoteError(RuntimeError):
    """Another process failed with an error that could not be sent as such (not picklable)."""


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else a :class:`RemoteError` with its type and text."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return RemoteError(f"{type(err).__name__}: {err}")
    return err


@contextlib.contextmanager
def agree(what: str) -> Iterator[None]:
    """Run the block on every process, then make all of them fail if any of them failed.

    Every process must enter the block (it may do nothing on some ranks). After it, the
    processes exchange whether they failed (one ``all_gather_object``); a process whose block
    raised re-raises its own error, the others raise the error of the lowest failing rank
    (the same type and message). So an error during setup ends every process with the same
    message instead of leaving the others waiting in the next collective. The block must not
    itself run collectives that could be left unmatched by a failing rank.

    Args:
        what: what the block does, for the debug log.

    Raises:
        BaseException: the block's error, or that of another rank.
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as err:  # any error must reach the other ranks, then is raised here too
        error = err
    if is_distributed():
        statuses = all_gather_objects(None if error is None else _portable(error))
        failed = [(r, e) for r, e in enumerate(statuses) if e is not None]
        if failed and error is None:
            r, remote = failed[0]
            logger.debug("%s failed on rank %d: %s", what, r, remote)
            raise remote
    if error is not None:
        raise error


def run_on_main(fn: Callable[[], T], *, weights_only: bool = False) -> T:
    """``fn()`` evaluated on rank 0 only, its result (or its error) sent to every process.

    Args:
        fn: what rank 0 computes (e.g. checking the run directory, loading a checkpoint).
        weights_only: receive the result with ``torch.load(weights_only=True)`` semantics.

    Returns:
        Rank 0's result, on every process.

    Raises:
        BaseException: rank 0's error, on every process.
    """
    if not is_distributed():
        return fn()
    result: Any = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except Exception as err:  # sent to the other ranks, then raised here too
            error = err
    remote = broadcast_object(None if error is None else _portable(error))
    if error is not None:
        raise error
    if remote is not None:
        raise remote
    return broadcast_object(result, weights_only=weights_only)
