#!/usr/bin/env bash
# The product on a lent GPU machine in two calls: the torch ISNet's and rvm's GPU tests, rvm's parity and
# speed (benchmarks/rvm_device.py, rvm_cold.py), `eval` and `bench` on cuda
# against cpu on the same machine, then gpu_check.py (parity, ms/img by batch, end-to-end scans/s).
#
# The device tool moves at most 64 MiB a call and has no package index, so what the machine lacks travels
# in two halves (carried paths stay on a warm machine between calls; it is handed back ~30 s after one):
#   here:    bash benchmarks/gpu_session.sh pack          # -> .models/gpu/ (git-ignored, ~105 MB)
#   call 1:  bash benchmarks/gpu_session.sh receive       carry: .models/gpu/isnet.xz.1 .models/gpu/data
#                                                                .models/gpu/models
#   call 2:  bash benchmarks/gpu_session.sh run           carry: .models/gpu/isnet.xz.2 .models/gpu/whl
#            (timeout_s 560; everything lands in $OUT: session.log, eval_{cuda,cpu}/report.*, bench.jsonl,
#            gpu_summary.json)
# `run --cpu-smoke` runs every section here on CPU with tiny counts (PYTHON=.venv/bin/python, no wheels).
set -uo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
G=.models/gpu
PY=${PYTHON:-python3}

pack() {
    local src=${1:-${BSHM_WATCHD_MODEL_DIR:-$HOME/.local/share/bshm-watchd/models}}
    local data=../shared/data
    rm -rf "$G" && mkdir -p "$G/whl" "$G/data/old" "$G/models"
    # xz takes isnet's 88 MB to ~80 MB: two halves of 40 MB leave room for the wheels in call 2.
    xz -T0 -6 -c "$src/isnet.onnx" >"$G/isnet.xz"
    local half=$(($(stat -c %s "$G/isnet.xz") / 2))
    head -c "$half" "$G/isnet.xz" >"$G/isnet.xz.1"
    tail -c +"$((half + 1))" "$G/isnet.xz" >"$G/isnet.xz.2"
    rm "$G/isnet.xz"
    cp "$src/selfie.tflite" "$src/rvm.zip" "$G/models/"
    cp -r "$data/portraits/image" "$data/portraits/alpha" "$G/data/"
    cp "$data"/old_photos/deoldify__*.jpg "$G/data/old/" 2>/dev/null
    ls "$G"/data/old/* | tail -n +11 | xargs -r rm  # the first 10, as the CPU bench uses
    # The service's pure-Python and CPython 3.12 wheels the GPU image lacks, at this venv's versions.
    local pins
    pins=$(.venv/bin/python -m pip freeze 2>/dev/null | grep -iE \
        '^(ai-edge-litert|pydantic|pydantic_core|structlog|watchdog|pymatting|annotated-types|typing-inspection|backports\.strenum)==')
    # shellcheck disable=SC2086
    .venv/bin/python -m pip download -q -d "$G/whl" --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        $pins
    du -sh "$G"/*
}

receive() {
    for p in "$G/isnet.xz.1" "$G/models/selfie.tflite" "$G/models/rvm.zip" "$G/data/image"; do
        test -e "$p" || { echo "no $p: carry it in this call" >&2; exit 2; }
    done
    du -sh "$G"/*
    $PY -c 'import torch, onnxruntime, cv2, numpy, numba; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
        "ort", onnxruntime.__version__, "cv2", cv2.__version__, "numpy", numpy.__version__, "numba", numba.__version__)'
    echo "received; now call 2 carrying $G/isnet.xz.2 $G/whl, within ~30 s"
}

# ---- run: each section has its own time limit and writes under $OUT as it goes
section() {  # section NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then  # ONLY='eval cuda|bench fusion': a short rerun
        echo "== $name: not in ONLY" | tee -a "$LOG"
        return
    fi
    local left=$((DEADLINE - SECONDS))
    if ((left < 20)); then
        echo "== $name: skipped, $left s left" | tee -a "$LOG"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tail -n 60 | tee -a "$LOG"
    echo "== $name: rc ${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$LOG"
}

bench_pair() {  # bench_pair MODEL: the same scans on each of $DEVICES (cuda, then cpu), one JSON line each
    local model=$1 dev
    for dev in $DEVICES; do
        $PY -m bshm_watchd bench --model "$model" -n "$BENCH_N" -i "$G"/data/old/* --json -c "$G/eval_$dev.yaml" |
            $PY -c 'import json, sys; b = json.load(sys.stdin); p = b["pipeline"]
print(json.dumps(b), file=open(sys.argv[1], "a"))
print(b["model"], b["device"], "scans/s", p["scans_per_s"], "failed", p["failed"], "stage ms", p["stage_ms"])' \
                "$OUT/bench.jsonl"
    done
}

run() {
    local smoke=0
    [ "${1:-}" = "--cpu-smoke" ] && smoke=1
    OUT=${OUT:-/tmp/gpu_session_out}
    mkdir -p "$OUT"
    LOG=$OUT/session.log
    DEADLINE=$((SECONDS + ${GPU_SESSION_S:-520}))
    export BSHM_WATCHD_MODEL_DIR=$G/models PYTHONUNBUFFERED=1
    if [ ! -f "$G/models/isnet.onnx" ]; then
        if [ -f "$G/isnet.xz.1" ] && [ -f "$G/isnet.xz.2" ]; then
            cat "$G/isnet.xz.1" "$G/isnet.xz.2" | xz -d -T0 >"$G/models/isnet.onnx.tmp" &&
                mv "$G/models/isnet.onnx.tmp" "$G/models/isnet.onnx"
        elif ((smoke)); then
            cp "${HOME}/.local/share/bshm-watchd/models/isnet.onnx" "$G/models/"
        fi
    fi
    local want got
    want=$($PY -c 'import json; print(json.load(open("models/manifest.json"))["isnet"]["sha256"])')
    got=$(sha256sum "$G/models/isnet.onnx" 2>/dev/null | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
        echo "isnet.onnx sha256 '$got' != manifest $want (call 1's half is gone if the machine was handed back)" |
            tee -a "$LOG" >&2
        exit 3
    fi
    if ((!smoke)); then
        $PY -m pip install -q --no-deps --no-index --target "$G/site" "$G"/whl/*.whl 2>&1 | tail -n 3
        export PYTHONPATH=$PWD:$PWD/$G/site
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
    fi
    local n=30 scans=192 dev
    DEVICES="cuda cpu"
    BENCH_N=20
    if ((smoke)); then n=2 scans=4 DEVICES=cpu BENCH_N=2; fi
    export PY G OUT DEVICES BENCH_N
    # cpu = onnxruntime fp32, the runtime of the CPU numbers in the README (auto would pick torch bf16 on AMX).
    for dev in $DEVICES; do
        printf 'device: %s\ncpu_runtime: onnxruntime\nworkers: 0\n' "$dev" >"$G/eval_$dev.yaml"
    done
    section "pytest (torch ISNet, rvm, bench)" 120 $PY -m pytest -q -x -p no:cacheprovider tests/test_isnet_torch.py \
        tests/test_tfjs_graph.py tests/test_fusion_matting.py tests/test_bench.py
    local smoke_arg=()
    ((smoke)) && smoke_arg=(--cpu-smoke)
    section "rvm cuda vs cpu" 60 $PY benchmarks/rvm_device.py "${smoke_arg[@]}" "$G"/data/old/*
    local cold_dev=cuda
    ((smoke)) && cold_dev=cpu
    section "rvm at new sizes, cudnn on/off" 90 $PY benchmarks/rvm_cold.py --model "$G/models/rvm.zip" \
        --device "$cold_dev" "$G"/data/old/*
    for dev in $DEVICES; do
        local base=()
        [ "$dev" = cuda ] && base=(--baseline)
        ((smoke)) && base=(--baseline)
        section "eval $dev" 150 $PY -m bshm_watchd eval -n "$n" --seed 0 "${base[@]}" --data "$G/data" \
            -c "$G/eval_$dev.yaml" -o "$OUT/eval_$dev"
    done
    : >"$OUT/bench.jsonl"
    section "bench isnet" 90 bash "$SELF" bench-pair isnet
    section "bench fusion" 150 bash "$SELF" bench-pair fusion
    local args=(--images "$G/data/old" --e2e-scans "$scans")
    ((smoke)) && args+=(--cpu-smoke)
    section "gpu_check" 200 $PY benchmarks/gpu_check.py --model "$G/models/isnet.onnx" "${args[@]}"
    echo "== done in $SECONDS s" | tee -a "$LOG"
}

case "${1:-}" in
pack) shift; pack "$@" ;;
receive) receive ;;
run) shift; run "$@" ;;
bench-pair) bench_pair "$2" ;;
*) echo "usage: $0 pack [MODEL_DIR] | receive | run [--cpu-smoke]" >&2; exit 2 ;;
esac
