"""Command lines that start 2-process jobs on the CPU, for the multi-process tests."""

import importlib.util
import os
import shutil
import subprocess
import sys
from typing import Callable, List, Optional

import pytest

from diffiner import dist_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launcher_env():
    """The environment of a fresh job: this checkout importable, one thread per process."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               # Open MPI refuses to start as root without these; other MPIs ignore them.
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") + dist_util.MPI_ENV_VARS:
        env.pop(name, None)
    return env


def torchrun(script: str, *args: str) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(dist_util.find_free_port()), script, *args]


def find_mpiexec() -> Optional[str]:
    """mpiexec of the MPI that mpi4py uses (the mpich wheel puts it beside python), or None."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def mpiexec_or_skip() -> Callable[..., List[str]]:
    """A launcher for `mpiexec -n 2`; skips the test when no working MPI is installed."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("needs mpi4py and mpiexec (pip install mpi4py mpich)")
    probe = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c",
                            "import sys; from mpi4py import MPI; sys.exit(MPI.COMM_WORLD.Get_size() != 2)"],
                           env=launcher_env(), capture_output=True, text=True, timeout=120)
    if probe.returncode:
        pytest.skip(f"{mpiexec} does not start a 2-process job of mpi4py's MPI: {probe.stderr[-500:]}")
    return lambda script, *args: [mpiexec, "-n", "2", sys.executable, script, *args]
