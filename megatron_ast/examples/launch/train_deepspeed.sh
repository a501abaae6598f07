#!/usr/bin/env bash
# AST under the DeepSpeed launcher: one node (--num_gpus) or the nodes of a hostfile (pdsh/ssh).
# Resumes from the newest complete checkpoint in the run's output_dir, if there is one.
#
#   launch/train_deepspeed.sh run.yaml                     # all GPUs of this node
#   HOSTFILE=launch/hostfile.example launch/train_deepspeed.sh run.yaml          # over pdsh/ssh from node 1
#   HOSTFILE=hosts NODE_RANK=$i MASTER_ADDR=node01 launch/train_deepspeed.sh run.yaml  # no ssh: run on every node
#   launch/train_deepspeed.sh run.yaml --dry-run --world-size 64 --nodes 8   # plan only
set -euo pipefail
CONFIG=${1:?run.yaml}
shift
if [[ " $* " == *" --dry-run "* ]]; then
    exec megatron-ast train --config "$CONFIG" "$@"
fi
ARGS=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
    ARGS+=(--hostfile "$HOSTFILE")
    if [[ -n "${NODE_RANK:-}" ]]; then
        ARGS+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?MASTER_ADDR: the first node}")
    fi
elif [[ -n "${NUM_GPUS:-}" ]]; then
    ARGS+=(--num_gpus "$NUM_GPUS")
fi
exec deepspeed "${ARGS[@]}" "$(command -v megatron-ast)" train --config "$CONFIG" --resume auto "$@"
