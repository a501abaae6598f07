#!/usr/bin/env bash
# AST under mpirun (Open MPI or MPICH): ranks are discovered through mpi4py
# (pip install 'megatron-ast[mpi]'); the master address is rank 0's.
#
#   NP=16 HOSTFILE=hosts launch/train_mpirun.sh run.yaml
# hostfile: "node01 slots=8" (Open MPI) or "node01:8" (MPICH). As root, Open MPI needs --allow-run-as-root.
set -euo pipefail
CONFIG=${1:?run.yaml}
shift
ARGS=(-np "${NP:?NP: number of ranks}")
[[ -n "${HOSTFILE:-}" ]] && ARGS+=(--hostfile "$HOSTFILE")
if mpirun --version 2>&1 | grep -q "Open MPI"; then
    # mpi4py's binary wheels serve several MPIs: tell it which one this is
    export MPI4PY_MPIABI=${MPI4PY_MPIABI:-openmpi}
    ARGS+=(-x MASTER_PORT="${MASTER_PORT:-29500}" -x PATH -x MPI4PY_MPIABI)
    [[ -n "${DS_ACCELERATOR:-}" ]] && ARGS+=(-x DS_ACCELERATOR)
    [[ $(id -u) == 0 ]] && ARGS+=(--allow-run-as-root)
else
    ARGS+=(-genv MASTER_PORT "${MASTER_PORT:-29500}")
fi
exec mpirun "${ARGS[@]}" megatron-ast train --config "$CONFIG" --resume auto "$@"
