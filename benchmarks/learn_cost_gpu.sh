#!/usr/bin/env bash
# learn_cost.py on a lent GPU machine (--full runs the default recipe unless said), most wanted first,
# each stage in a time box so that an overrun still returns what was measured. Results: $OUT/*.json
# (or ./gpu-results when OUT is unset).
# Usage, from the repository root: bash benchmarks/learn_cost_gpu.sh
set -u
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
W=/tmp/lc-gpu
stage() {  # stage SECONDS NAME ARGS...: one learn_cost.py run, its JSON in $OUT/NAME.json
    local limit=$1 name=$2; shift 2
    echo "== $name ($(date +%T))"
    timeout "$limit" python3 benchmarks/learn_cost.py --device cuda --direct --workdir $W --json "$OUT/$name.json" "$@"
    echo "== $name: exit $?"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
stage 80 b16 --arch ViT-B-16 --ratings 10 --ratings 100 --steps 20
stage 140 b16-full --arch ViT-B-16 --ratings 10 --no-phases --full ViT-B-16:10
stage 170 l14 --arch ViT-L-14 --ratings 10 --steps 20 --full ViT-L-14:10
stage 70 linear --arch ViT-B-16 --arch ViT-L-14 --ratings 10 --no-phases --drift 0 --full ViT-B-16:10 --full ViT-L-14:10
stage 200 b16-100 --arch ViT-B-16 --ratings 100 --no-phases --full ViT-B-16:100
