#!/usr/bin/env bash
# Tokenize a RedPajama tree on a CPU partition: one MPI rank per node, --workers processes per rank.
# Each rank takes a disjoint, size-balanced set of input files; finished shards are skipped, so
# resubmitting the same job after a time limit or node failure resumes it.
#
#   sbatch -N 8 launch/preprocess_slurm.sh /data/redpajama /data/shards /models/llama-tokenizer
#
#SBATCH --job-name=megatron-ast-preprocess
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
set -euo pipefail
INPUT=${1:?input dir (RedPajama jsonl tree)}
OUTPUT=${2:?output dir for token shards}
TOKENIZER=${3:?HF tokenizer dir or SentencePiece .model}
WORKERS=${SLURM_CPUS_PER_TASK:-$(nproc)}
# srun starts the ranks; mpi4py (pip install 'megatron-ast[mpi]') discovers them through PMI.
srun --mpi=pmix megatron-ast preprocess --input "$INPUT" --output-dir "$OUTPUT" \
    --tokenizer "$TOKENIZER" --workers "$WORKERS"
