"""Process-group setup for training and inference on one or many processes.

One entry point, `setup_dist`, covers the three ways a job is started:

- a plain `python ...`: a single process, nothing to initialise;
- `torchrun`: rank, world size and rendezvous address come from RANK / WORLD_SIZE /
  LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
- `mpiexec` (as the original Diffiner was launched): rank and world size come from MPI;
  rank 0 picks the rendezvous address and a free port and broadcasts them over MPI.

mpi4py is imported only in the last case, so a CPU-only or torchrun user never needs an MPI
installation. The other helpers degrade to no-ops in a single process, so calling code does
not need to branch on whether it is distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist

from .audio.folders import FolderError, output_lock
from .errors import DiffinerError, error_text, first_line

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0

# Variables that MPI launchers export to each process: Open MPI, MPICH / Intel MPI (hydra),
# PMIx-based launchers (Open MPI 5, srun --mpi=pmix), MVAPICH.
MPI_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool


_INFO: Optional[DistInfo] = None
_TIMEOUT = datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_by_mpi() -> bool:
    return any(name in os.environ for name in MPI_ENV_VARS)


def setup_dist(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
               device: Optional[str] = None) -> DistInfo:
    """Join the job's process group (if there is more than one process) and pick the device.

    :param backend: "nccl" or "gloo"; default nccl when CUDA is used, else gloo.
    :param timeout_s: how long a collective may wait for a missing rank before failing, so a
        dead rank ends the job with an error instead of a hang.
    :param device: force a device type ("cpu" or "cuda"); default cuda when available. With
        CUDA each process takes GPU `local_rank % visible GPUs` (CUDA_VISIBLE_DEVICES applies).
    """
    global _INFO, _TIMEOUT
    _TIMEOUT = datetime.timedelta(seconds=timeout_s)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    elif launched_by_torchrun():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    elif launched_by_mpi():
        rank, world_size, local_rank = _rendezvous_over_mpi()
    else:
        rank, world_size, local_rank = 0, 1, 0

    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but this torch sees no GPU")
    if use_cuda:
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        torch_device = torch.device("cuda", index)
    else:
        torch_device = torch.device("cpu")

    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed; cannot run on several processes")
        backend = backend or ("nccl" if use_cuda else "gloo")
        # Without this, a NCCL collective waiting for a dead rank blocks forever instead of
        # failing after the timeout (the variable was renamed in torch 2.2; set both).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        os.environ.setdefault("NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=_TIMEOUT)
        logger.info("rank %d/%d (local %d) joined the %s process group on %s",
                    rank, world_size, local_rank, backend, torch_device)
    _INFO = DistInfo(rank, world_size, local_rank, torch_device, distributed)
    return _INFO


def _rendezvous_over_mpi():
    """Rank, world size and local rank from MPI; exports the torch.distributed env variables."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    address = port = None
    if rank == 0:
        # On one node the loopback always works, even where the host name does not resolve.
        address = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if local_size == world_size else socket.gethostname())
        port = os.environ.get("MASTER_PORT") or str(find_free_port())
    address, port = comm.bcast((address, port), root=0)
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(local_rank))
    return rank, world_size, local_rank


def find_free_port() -> int:
    """A TCP port that is free now (the OS picks it); another process could still take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def dev() -> torch.device:
    """The device chosen by `setup_dist` (before it: cuda if available, else cpu)."""
    if _INFO is not None:
        return _INFO.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def barrier(timeout_s: Optional[float] = None) -> None:
    """Wait for every rank, failing after `timeout_s` (default: setup's) if one never arrives.

    gloo's monitored barrier names the ranks that did not arrive; other backends rely on the
    process group's own timeout.
    """
    if not is_distributed():
        return
    if dist.get_backend() == "gloo" and hasattr(dist, "monitored_barrier"):
        timeout = _TIMEOUT if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
    else:
        dist.barrier()


def sync_params(params: Iterable[torch.Tensor]) -> None:
    """Overwrite every rank's tensors with rank 0's."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0, in rank order; sizes may differ by rank."""
    if not is_distributed():
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros((longest,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:int(s)] for g, s in zip(gathered, sizes)])


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` overwritten with its element-wise maximum over ranks (same shape on every rank);
    one collective, unlike `all_gather_cat`, which must first exchange the sizes."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj) -> List:
    """Every rank's picklable `obj`, in rank order (a one-element list in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    global _INFO
    if is_distributed():
        dist.destroy_process_group()
    _INFO = None


@contextlib.contextmanager
def job_output_lock(folder: str, writer: str) -> Iterator[None]:
    """Hold `audio.folders.output_lock` on `folder` for the block, taken by process 0 of the job
    for all of them (flock is per open file: the job's own processes would refuse each other);
    every process raises process 0's refusal, so that the job ends together."""
    with contextlib.ExitStack() as held:
        refusal = ""
        if is_main():
            try:
                held.enter_context(output_lock(folder, writer))
            except FolderError as exc:
                refusal = str(exc)
        refusal = all_gather_objects(refusal)[0]
        if refusal:
            raise FolderError(refusal)
        yield


# The key under which a failing process tells the others, in the job's rendezvous store.
_FAILURE_KEY = "diffiner/failed"


class ProcessFailed(DiffinerError):
    """A process of the job failed: every process ends with this one line naming the rank that
    failed and its error, and with that error's exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _PeerFailed(Exception):
    """Raised by the check of `shared_fate` when another process has announced a failure."""


def _store():
    """The job's rendezvous store (a private accessor of torch.distributed; None where absent)."""
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None else None
    except RuntimeError:  # no default store (a group not made by init_process_group)
        return None


def _check_peers() -> None:
    """Raise _PeerFailed if another process has announced a failure; cheap (one store query)."""
    store = _store()
    try:
        # add(key, 0) reads the count of failures announced (Store.add is in every torch we support).
        failed = store is not None and store.add(_FAILURE_KEY, 0) > 0
    except RuntimeError:  # the store's host (rank 0's process or the launcher) is gone
        failed = True
    if failed:
        raise _PeerFailed()


@contextlib.contextmanager
def shared_fate() -> Iterator[Callable[[], None]]:
    """A block of work that the job's processes end together: if the block raises on any
    process, every process raises ProcessFailed at its end, naming the rank that failed and
    its error (with that error's exit status), instead of waiting for it at a later collective.

    The block gets a check to call between units of work: it raises (and so ends the block)
    as soon as another process has failed, so that the others stop within one unit of work,
    not after their whole share. Every process must enter and leave the block together: its
    end is a collective. In a single process it is a plain block.
    """
    if not is_distributed():
        yield lambda: None
        return
    rank, error, status = get_rank(), None, None
    try:
        yield _check_peers
    except _PeerFailed:
        status = "stopped"
    except Exception as exc:  # any error: the others must hear of it, whatever it is
        error = exc
        text = error_text(exc) if isinstance(exc, DiffinerError) else f"{type(exc).__name__}: {first_line(exc)}"
        status = (getattr(exc, "exit_code", 1), text)
        store = _store()
        if store is not None:
            try:
                store.add(_FAILURE_KEY, 1)
            except RuntimeError:
                pass  # the others still learn of it at the end of the block
    try:
        statuses = all_gather_objects(status)
    except RuntimeError as exc:  # a process died without a word (killed): gloo's raw error
        raise ProcessFailed(f"rank {rank}: lost contact with the other processes of the job "
                            f"({first_line(exc)})", 1) from (error or exc)
    for failed, outcome in enumerate(statuses):
        if isinstance(outcome, tuple):
            exit_code, text = outcome
            stopped = "" if failed == rank else f" (rank {rank} stopped with it)"
            raise ProcessFailed(f"rank {failed} of {len(statuses)} failed: {text}{stopped}", exit_code) from error
    if status == "stopped":  # cannot happen: a failure is announced only by a process that fails
        raise ProcessFailed(f"rank {rank}: stopped for a failure that no process reports", 1)
