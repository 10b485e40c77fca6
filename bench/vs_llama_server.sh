#!/usr/bin/env bash
# haifctl's cluster (through the HTTP bridge) side by side with llama-server built from the same
# llama.cpp, on the shipped model, with one client: `haifctl bench URL --against URL2`, which
# interleaves the two, counts tokens from usage and prints the ratios.
#
#   bench/vs_llama_server.sh                # levels 1,8,32; 256 tokens; 2 rounds
#   LEVELS=1 TOKENS=128 REPEAT=3 NP=8 LST=2 bench/vs_llama_server.sh
#
# llama-server is built (about 4 minutes on 2 cores, then reused) by the peer script beside the
# checkout (../shared/peer/build-llama-server.sh) or taken from $LLAMA_SERVER.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
HAIFCTL=${HAIFCTL:-$here/.venv/bin/haifctl}
BENCH=${BENCH:-$HAIFCTL}  # the client: the same haifctl bench whichever haifctl serves
LLAMA_SERVER=${LLAMA_SERVER:-$(bash "$here/../shared/peer/build-llama-server.sh")}
MODEL=$here/haifctl/data/stories260K.gguf
NP=${NP:-8}
PORT=${PORT:-18081}
HAIF_HOME=$(mktemp -d)
export HAIF_HOME
"$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -np "$NP" -c $((2048 * NP)) \
    -t "${LST:-2}" --no-webui >"$HAIF_HOME/llama-server.log" 2>&1 &
peer=$!
trap 'kill $peer 2>/dev/null || true; "$HAIFCTL" down >/dev/null 2>&1 || true; rm -rf "$HAIF_HOME"' EXIT
"$HAIFCTL" up --bridge-bind 127.0.0.1:0 >/dev/null
bridge=$("$HAIFCTL" status --json | python3 -c \
    'import json, sys; print(next(d["endpoint"] for d in json.load(sys.stdin)["daemons"] if d["name"] == "bridge"))')
for _ in $(seq 150); do  # readiness probe with a deadline
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.2
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null
echo "haifctl $("$HAIFCTL" --version | cut -d' ' -f2) (A) against llama-server -np $NP -t ${LST:-2} (B); $(nproc) cores"
# shellcheck disable=SC2086  # EXTRA holds several options
"$BENCH" bench "$bridge" --against "http://127.0.0.1:$PORT" -c "${LEVELS:-1,8,32}" \
    -n "${TOKENS:-256}" --repeat "${REPEAT:-2}" ${EXTRA:-}
