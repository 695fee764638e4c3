"""The process group of a distributed run: who this process is, and whether it writes files.

bbzo's forward parallelization has **no master**: every rank holds the same weights, seed and minibatch,
runs the same deterministic ``ask`` / ``tell`` and the same optimizer step, and evaluates only its shard
of each step's probes (:class:`~bbzo.parallel.executor.DistributedExecutor`). The ranks are started by
``torchrun`` (any number of nodes, a c10d rendezvous) or by ``--workers M``, which starts
``torch.distributed.run`` for the user (:mod:`bbzo.parallel.launch`).

:func:`setup` joins the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
``RANK``, ``MASTER_ADDR`` ...): gloo on CPU, NCCL when the run's device is CUDA. Only rank 0 writes
checkpoints, logs and results (:func:`is_writer`).
"""

from __future__ import annotations

import atexit
import datetime
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..signals import install as install_signals

__all__ = ["DistContext", "setup", "plan_devices", "current", "is_writer", "world_size", "rank", "under_launcher",
           "shutdown", "agree", "silent_peers",
           "DEFAULT_WORKER_TIMEOUT"]

#: Seconds a collective waits for the slowest rank before the run stops (``--worker-timeout``).
DEFAULT_WORKER_TIMEOUT = 30.0


@dataclass
class DistContext:
    """This process's place in a distributed run.

    Attributes:
        rank, world: Global rank and number of ranks.
        local_rank: Rank on this node (a CUDA run puts it on GPU ``local_rank % GPUs``, see :func:`plan_devices`).
        timeout: Seconds a collective waits for every rank (``--worker-timeout``).
        backend: ``"gloo"`` or ``"nccl"``.
        store: The c10d store of the rendezvous (heartbeats and error messages of the ranks).
    """

    rank: int
    world: int
    local_rank: int
    timeout: float
    backend: str
    store: Any

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collectives move their tensors (NCCL needs this rank's GPU)."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


_CONTEXT: Optional[DistContext] = None


def under_launcher() -> bool:
    """Whether this process was started by ``torchrun`` (``WORLD_SIZE`` and ``RANK`` are set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def plan_devices(device: Any, local_rank: int, local_world: int, n_gpus: int,
                 nccl: bool) -> tuple[str, Optional[int]]:
    """``(backend, GPU index or None)`` of one rank.

    A CUDA run puts local rank ``r`` on GPU ``r % n_gpus``, so several ranks may share a GPU (the queries of a
    small model do not fill one). NCCL needs one GPU per rank; when ranks share one, the collectives go through
    gloo on CPU (they move a few kilobytes of losses per step). An explicit ``cuda:i`` puts every rank on GPU i.
    Every node of a run is assumed alike (the same ranks and GPUs), so all ranks choose the same backend.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return "gloo", None
    if n_gpus < 1:
        raise ConfigError(f"device {device!r} asks for CUDA, but torch sees no GPU on this node: run with "
                          "--device cpu, or on a machine with a GPU and a CUDA build of torch.")
    if dev.index is not None:
        if dev.index >= n_gpus:
            raise ConfigError(f"device {device!r}: this node has {n_gpus} GPU(s) (cuda:0 .. cuda:{n_gpus - 1}).")
        return ("nccl" if nccl and local_world == 1 else "gloo"), dev.index
    return ("nccl" if nccl and local_world <= n_gpus else "gloo"), local_rank % n_gpus


def setup(timeout: float = DEFAULT_WORKER_TIMEOUT, device: Any = "cpu") -> Optional[DistContext]:
    """Join the process group ``torchrun`` described (once per process); ``None`` when not launched by it.

    Args:
        timeout: Seconds any collective waits before the run stops with a :class:`~bbzo.errors.WorkerError`.
        device: The run's device: CUDA selects NCCL and this rank's GPU (``LOCAL_RANK``), CPU gloo.
    """
    global _CONTEXT
    if not under_launcher():
        return None
    if not timeout > 0:
        raise ConfigError(f"--worker-timeout must be > 0 seconds, got {timeout}.")
    world, rank_, local = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if _CONTEXT is not None:
        return _CONTEXT
    cuda = torch.device(device).type == "cuda"
    n_gpus = torch.cuda.device_count() if cuda else 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend, gpu = plan_devices(device, local, local_world, n_gpus, cuda and dist.is_nccl_available())
    if gpu is not None:
        torch.cuda.set_device(gpu)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout)))
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(datetime.timedelta(seconds=float(timeout)))
    _CONTEXT = DistContext(rank=rank_, world=world, local_rank=local, timeout=float(timeout), backend=backend,
                           store=store)
    install_signals()  # a rank stopped by the launcher (another rank failed, or the run was interrupted) saves too
    atexit.register(shutdown)
    return _CONTEXT


def current() -> Optional[DistContext]:
    """The distributed context of this process, or ``None`` (a serial run)."""
    return _CONTEXT


def is_writer() -> bool:
    """Whether this process writes files: always in a serial run, only rank 0 in a distributed one."""
    return _CONTEXT is None or _CONTEXT.is_writer


def world_size() -> int:
    return 1 if _CONTEXT is None else _CONTEXT.world


def rank() -> int:
    return 0 if _CONTEXT is None else _CONTEXT.rank


def shutdown() -> None:
    """Leave the process group (end of a run)."""
    global _CONTEXT
    if _CONTEXT is not None and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


def agree(values: dict[str, str]) -> None:
    """Every rank's ``values`` equal rank 0's, or every rank stops with one line naming the rank and the key.

    A distributed run must be one run: the same settings, the same data, the same checkpoint on every node
    (a resumed run reads it from each node's ``--out``: shared storage, or the same file copied).
    """
    ctx = current()
    if ctx is None or ctx.world == 1:
        return
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, dict(values))
    ref = gathered[0]
    for r, theirs in enumerate(gathered[1:], start=1):
        for key in ref:
            if theirs.get(key) != ref[key]:
                raise ConfigError(
                    f"rank {r} does not agree with rank 0 on {key} ({theirs.get(key)} vs {ref[key]}): every node must "
                    "run the same command on the same data, and a resumed run needs the same checkpoint on every node "
                    "(shared storage, see docs/parallel.md). Nothing was trained; fix it and rerun.")


def silent_peers(wait: float = 5.0) -> list[int]:
    """After a signal stopped this rank: the other ranks that never said a signal stopped them (rank 0 only).

    Every rank stopped by a signal posts that in the rendezvous store; a rank that died cannot. A launcher
    stops the surviving ranks with SIGTERM as soon as one rank dies, so a missing post names the rank that
    died, and rank 0 reports it instead of the launcher's signal. Waits at most ``wait`` seconds."""
    ctx = current()
    if ctx is None or ctx.world == 1:
        return []
    try:
        ctx.store.set(f"bbzo/signalled/{ctx.rank}", "1")
    except Exception:  # noqa: BLE001 -- the store is gone: nothing to learn
        return []
    if ctx.rank != 0:
        return []
    missing = [r for r in range(ctx.world) if r != ctx.rank]
    deadline = time.monotonic() + wait
    while missing:
        try:
            missing = [r for r in missing if not ctx.store.check([f"bbzo/signalled/{r}"])]
        except Exception:  # noqa: BLE001
            return []
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return missing
