#!/usr/bin/env bash
# GPU check of the torch ISNet (parity, ms/img, end-to-end scans/s); run from anywhere in the repo.
#
# The model (88 MB) is larger than the device tool's 64 MiB per-call transfer, so it travels in two
# halves to one warm machine (it is handed back ~30 s after a call: make the second call at once):
#   here:    bash benchmarks/gpu_check.sh split /path/to/isnet.onnx   # -> .models/isnet.part{1,2}.onnx
#   call 1:  bash benchmarks/gpu_check.sh receive      carry: .models/isnet.part1.onnx .models/images
#   call 2:  bash benchmarks/gpu_check.sh [--compile]  carry: .models/isnet.part2.onnx
# Where the whole model is already there ($BSHM_WATCHD_MODEL_DIR or .models/isnet.onnx) call 2 alone does.
# Other arguments go to gpu_check.py (--cpu-smoke, --compile, --e2e-scans N, --images DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${BSHM_WATCHD_MODEL_DIR:-.models}
MODEL=$DIR/isnet.onnx
PART1=.models/isnet.part1.onnx
PART2=.models/isnet.part2.onnx
SHA=$($PY -c 'import json; print(json.load(open("models/manifest.json"))["isnet"]["sha256"])')

case "${1:-}" in
split)
    src=${2:?usage: gpu_check.sh split /path/to/isnet.onnx}
    mkdir -p .models/images
    half=$(($(stat -c %s "$src") / 2))
    head -c "$half" "$src" >"$PART1"
    tail -c +"$((half + 1))" "$src" >"$PART2"
    # A few real photos make parity meaningful there (synthetic images are used otherwise).
    for f in deoldify__1860Girls.jpg deoldify__1870Girl.jpg deoldify__1908FamilyPhoto.jpg; do
        [ -f "../shared/data/old_photos/$f" ] && cp "../shared/data/old_photos/$f" .models/images/
    done
    ls -l "$PART1" "$PART2" .models/images
    exit 0
    ;;
receive)
    test -s "$PART1" || { echo "no $PART1: carry it in this call" >&2; exit 2; }
    echo "part1 received ($(stat -c %s "$PART1") bytes); now call 2 carrying $PART2, within ~30 s"
    exit 0
    ;;
esac

if [ ! -f "$MODEL" ]; then
    if [ -s "$PART1" ] && [ -s "$PART2" ]; then
        mkdir -p "$DIR"
        cat "$PART1" "$PART2" >"$MODEL.tmp" && mv "$MODEL.tmp" "$MODEL"
    else
        echo "no $MODEL and not both halves ($PART1 from call 1 is gone if the machine was handed back:" \
            "repeat call 1, then call 2 at once)" >&2
        exit 2
    fi
fi
got=$(sha256sum "$MODEL" | cut -d' ' -f1)
if [ "$got" != "$SHA" ]; then
    echo "$MODEL sha256 $got != manifest $SHA" >&2
    exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
export BSHM_WATCHD_MODEL_DIR=$DIR PYTHONPATH=. PYTHONUNBUFFERED=1
# 470 s keeps the whole call under 8 minutes; the JSON in $OUT is saved after every section anyway.
exec timeout 470 "$PY" benchmarks/gpu_check.py --model "$MODEL" "$@"
