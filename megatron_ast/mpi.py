"""Rank discovery through mpi4py when started by mpirun/mpiexec/srun; a world of one otherwise."""
from __future__ import annotations

import os
from typing import Any

from megatron_ast.errors import UsageError

_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def launched_by_mpi() -> bool:
    if any(v in os.environ for v in _LAUNCHER_VARS):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def world() -> tuple[Any, int, int]:
    """(comm or None, rank, size)."""
    if not launched_by_mpi():
        return None, 0, 1
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise UsageError("started under an MPI launcher but mpi4py is missing: pip install 'megatron-ast[mpi]'") from e
    comm = MPI.COMM_WORLD
    return comm, comm.Get_rank(), comm.Get_size()
