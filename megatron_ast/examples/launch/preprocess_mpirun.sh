#!/usr/bin/env bash
# Tokenize across the nodes of a hostfile with mpirun: one rank per node, WORKERS processes each.
#
#   launch/preprocess_mpirun.sh hostfile /data/redpajama /data/shards /models/tokenizer
#
# hostfile: one line per node, e.g. "node01 slots=1" (Open MPI) or "node01:1" (MPICH).
set -euo pipefail
HOSTFILE=${1:?hostfile}
INPUT=${2:?input dir}
OUTPUT=${3:?output dir}
TOKENIZER=${4:?tokenizer}
NODES=$(grep -cve '^\s*\(#\|$\)' "$HOSTFILE")
WORKERS=${WORKERS:-$(nproc)}
mpirun -np "$NODES" --hostfile "$HOSTFILE" megatron-ast preprocess --input "$INPUT" \
    --output-dir "$OUTPUT" --tokenizer "$TOKENIZER" --workers "$WORKERS"
