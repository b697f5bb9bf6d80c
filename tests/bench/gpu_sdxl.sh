#!/usr/bin/env bash
# The prepared accelerator run (issue 14): SDXL at full size (1024 px, latents 128x128, random
# weights from shared/reference/sdxl_unet_config.json) through the real DMDR step, one variant
# set per process, then a tiny `dmdr train` on CUDA with bf16 that checkpoints and resumes.
#
#   bash tests/bench/gpu_sdxl.sh            # on a CUDA machine, from the repository root
#
# Results: $OUT/results.jsonl (one JSON row per variant: s/generator-step, images/s, peak GPU
# memory, FLOPs per generator step, MFU) and $OUT/gpu_sdxl.log (everything printed).
# Packages the machine lacks can travel as wheels in .whl/ (see the README's "Memory" section):
# they are installed into /tmp/site first; .whl/extra/ is put on PYTHONPATH as it is.
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
OUT=${OUT:-$repo/gpu-out}
mkdir -p "$OUT"
LOG=$OUT/gpu_sdxl.log RESULTS=$OUT/results.jsonl
: >"$RESULTS"
exec > >(tee -a "$LOG") 2>&1

PY=${PY:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .whl/extra ] && export PYTHONPATH=$repo/.whl/extra:$PYTHONPATH
export PYTHONPATH=$repo:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
UNET_CONFIG=${UNET_CONFIG:-}
for c in "$UNET_CONFIG" "$repo/.whl/sdxl_unet_config.json" "$repo/../shared/reference/sdxl_unet_config.json"; do
    [ -n "$c" ] && [ -f "$c" ] && { UNET_CONFIG=$c; break; }
done
STEPS=${STEPS:-3}

t0=$SECONDS
stamp() { printf '\n=== [%4ds] %s\n' "$((SECONDS - t0))" "$*"; }
stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF'
import importlib
for name in ("torch", "accelerate", "diffusers", "peft", "transformers", "open_clip", "bitsandbytes"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:
        print(f"{name} missing ({type(e).__name__}: {e})")
EOF

bench() {  # bench LIMIT_S VARIANT... : one process, its rows appended to $RESULTS
    local limit=$1; shift
    stamp "variants: $*"
    timeout -k 10 "$limit" "$PY" tests/bench/bench_step.py --mode sdxl --flops --steps "$STEPS" --warmup 1 \
        --unet-config "$UNET_CONFIG" --variants "$@" | tee "$OUT/last.out"
    local rc=${PIPESTATUS[0]}
    grep '^{"mode"' "$OUT/last.out" >>"$RESULTS"
    [ "$rc" = 0 ] || echo "exit status $rc (124 = over ${limit}s)"
}

bench 150 bf16/nockpt/b1 bf16/ckpt/b1 bf16/ckpt/b4 bf16/ckpt/b8
bench 80 fp16/nockpt/b1/rewards
bench 60 bf16/ckpt/b4/adam8bit

stamp "variants: bf16/nockpt/b1/fsdp (torchrun, 1 process)"
timeout -k 10 70 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 tests/bench/bench_step.py \
    --mode sdxl --flops --steps "$STEPS" --warmup 1 --unet-config "$UNET_CONFIG" --variants bf16/nockpt/b1/fsdp \
    | tee "$OUT/last.out"
grep '^{"mode"' "$OUT/last.out" >>"$RESULTS"

stamp "dmdr train --preset tiny on CUDA, bf16: 10 steps, then resume to 12"
W=$(mktemp -d)
common=(--preset tiny --mixed-precision bf16 --output-dir "$W" --exp-name gpu --cache-dir "$W/cache"
        --checkpoint-steps 5 --sample-steps 5)
timeout -k 10 80 "$PY" -m dmdr train "${common[@]}" --max-train-steps 10 && \
timeout -k 10 50 "$PY" -m dmdr train "${common[@]}" --max-train-steps 12 --resume-ckpt auto
echo "tiny train exit status $?"
ls "$W/gpu/checkpoints/torch_units" 2>/dev/null
grep -h "resumed from\|training done\|device" "$W/gpu/log.txt" 2>/dev/null | tail -5
"$PY" - "$W/gpu/loss_logs/loss_gen_log.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("gen log steps:", [r["step"] for r in rows])
EOF

stamp "results"
cat "$RESULTS"
stamp "done"
