#!/usr/bin/env bash
# One prepared check of an accelerator machine (GPU; TPU works the same), under 8 minutes on one GPU:
#   - the full model (R(2+1)D-18 + ResNet-18 + fusion) in bf16 at batch 64, frozen and trainable
#     encoders (trainable: 16 per device up to 64, as batch 64 does not fit on one GPU): step time, sequences/s, MFU (matmul FLOPs counted from the step's jaxpr over the
#     measured bf16 matmul peak), XLA's FLOPs, compile time, peak device memory;
#   - the fusion model (cached features) in bf16 at batch 64 and 512: sequences/s, the same figures.
# A case that does not fit in device memory is retried at half the batch (down to 8), recorded as such.
#
#   bash bench/accelerator_check.sh                 # writes bench/results/accelerator_check_<backend>.json
#   ACCEL_CHECK_SMOKE=1 bash bench/accelerator_check.sh   # CPU smoke run: tiny batches, 1-2 steps
#
# Environment: PYTHON (default .venv/bin/python, else python3), OUT (the JSON file), ACCEL_CHECK_SMOKE,
# ACCEL_CHECK_RUNS (space-separated case:batch:steps:warmup, instead of the list below).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH=${PYTHONPATH:-$PWD}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
SMOKE=${ACCEL_CHECK_SMOKE:-0}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
START=$(date +%s)

# case  batch  steps  warmup   (smoke: tiny batches so that a 2-core CPU finishes in a few minutes;
# the trainable full model takes ~100 s per sequence there and is left out)
if [ -n "${ACCEL_CHECK_RUNS:-}" ]; then
  RUNS=$ACCEL_CHECK_RUNS  # e.g. "fusion:64:30:3 full_frozen:32:10:2"
elif [ "$SMOKE" = 1 ]; then
  RUNS="fusion:8:2:1 fusion:16:2:1 full_frozen:1:1:1"
else
  # Trainable encoders need ~3 GiB of temporaries per sequence even in bf16 (docs/PERFORMANCE.md):
  # batch 64 needs several devices; on fewer, start at 16 per device instead of failing slowly.
  NDEV=$("$PYTHON" -c 'import jax; print(jax.device_count())' 2>/dev/null || echo 1)
  TRAINABLE_BATCH=$(( NDEV * 16 < 64 ? NDEV * 16 : 64 ))
  RUNS="full_frozen:64:10:2 full_trainable:$TRAINABLE_BATCH:10:2 fusion:64:30:3 fusion:512:20:3"
fi

for run in $RUNS; do
  IFS=: read -r case batch steps warmup <<<"$run"
  while :; do
    out="$TMP/${case}_${batch}.json"
    echo "--- $case bf16 batch $batch ($(( $(date +%s) - START )) s so far)"
    "$PYTHON" bench/train_step.py --case="$case" --dtype=bf16 --batch="$batch" --steps="$steps" \
      --warmup="$warmup" --noinput --out="$out" || true
    if "$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][0]; sys.exit('error' in r)" "$out" 2>/dev/null; then
      break
    fi
    if [ "$batch" -le 8 ]; then
      echo "    $case failed down to batch $batch"
      break
    fi
    batch=$(( batch / 2 ))  # most likely out of device memory: try half the batch
    echo "    failed; retrying at batch $batch"
  done
done

"$PYTHON" - "$TMP" "${OUT:-}" "$SMOKE" "$(( $(date +%s) - START ))" <<'EOF'
import glob, json, os, sys
tmp, out, smoke, wall = sys.argv[1], sys.argv[2], sys.argv[3] == '1', int(sys.argv[4])
keep = ('case', 'dtype', 'batch', 'steps', 'devices', 'error', 'trace_lower_s', 'compile_s', 'first_step_s',
        'step_median_s', 'sequences_per_s', 'matmul_flops', 'flops', 'peak_flops_per_s',
        'matmul_share_of_peak', 'share_of_peak', 'device_peak_bytes', 'memory_analysis', 'parameters')
runs, machine = [], {}
for path in sorted(glob.glob(os.path.join(tmp, '*.json'))):
  with open(path) as f:
    data = json.load(f)
  for r in data['results']:
    machine = machine or r.get('machine') or data.get('machine', {})
    runs.append({k: r[k] for k in keep if k in r})
    runs[-1]['mfu'] = runs[-1].get('matmul_share_of_peak')  # counted matmul FLOPs / measured bf16 peak
backend = machine.get('backend', 'unknown')
out = out or os.path.join('bench', 'results', f'accelerator_check_{backend}{"_smoke" if smoke else ""}.json')
result = dict(command='bash bench/accelerator_check.sh', smoke=smoke, wall_s=wall, machine=machine, runs=runs)
with open(out, 'w') as f:
  json.dump(result, f, indent=1)
for r in runs:
  if 'error' in r:
    print(f"{r['case']:15s} batch {r.get('batch', '?'):>4}: {r['error']}")
  else:
    print(f"{r['case']:15s} batch {r['batch']:>4}: {r['sequences_per_s']:9.1f} seq/s, MFU {100 * (r['mfu'] or 0):5.1f}%, "
          f"compile {r['trace_lower_s'] + r['compile_s']:6.1f} s, peak device memory "
          f"{(r.get('device_peak_bytes') or 0) / 2**30:.1f} GiB")
print(f'wrote {out} ({wall} s)')
EOF
