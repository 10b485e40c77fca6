#!/usr/bin/env bash
# Two haifctl builds side by side: a cluster of each (each through its own HTTP bridge, same
# machine, same model), measured by one client, `haifctl bench NEW --against OLD`, which
# interleaves them, counts tokens from usage and prints NEW/OLD ratios.  What a change costs or
# buys, e.g. CURVE on every ZeroMQ link:
#
#   OLD_HAIFCTL=/tmp/oldvenv/bin/haifctl bench/ab.sh            # levels 1,8; 256 tokens; 3 rounds
#   LEVELS=1,8,32 TOKENS=128 REPEAT=2 OLD_HAIFCTL=... bench/ab.sh
#
# OLD_HAIFCTL is a haifctl installed (not editable) from the older commit, e.g.
#   git worktree add /tmp/old-src REF && python3 -m venv /tmp/oldvenv \
#     && /tmp/oldvenv/bin/pip install /tmp/old-src
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
NEW=${NEW_HAIFCTL:-$here/.venv/bin/haifctl}
OLD=${OLD_HAIFCTL:?set OLD_HAIFCTL to the older build\'s haifctl}
new_home=$(mktemp -d)
old_home=$(mktemp -d)
trap 'HAIF_HOME=$new_home "$NEW" down >/dev/null 2>&1 || true; HAIF_HOME=$old_home "$OLD" down >/dev/null 2>&1 || true; rm -rf "$new_home" "$old_home"' EXIT
bridge() {  # the bridge address of the cluster whose home is $1, started by haifctl $2
    HAIF_HOME=$1 "$2" up --bridge-bind 127.0.0.1:0 >/dev/null
    HAIF_HOME=$1 "$2" status --json | python3 -c \
        'import json, sys; print(next(d["endpoint"] for d in json.load(sys.stdin)["daemons"] if d["name"] == "bridge"))'
}
a=$(bridge "$new_home" "$NEW")
b=$(bridge "$old_home" "$OLD")
echo "A: $("$NEW" --version) ($NEW); B: $("$OLD" --version) ($OLD); $(nproc) cores"
"$NEW" bench "$a" --against "$b" -c "${LEVELS:-1,8}" -n "${TOKENS:-256}" --repeat "${REPEAT:-3}"
