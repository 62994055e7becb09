#!/usr/bin/env bash
# Build the tiny models once, then serve two domain teachers and the student's rollout server on loopback.
# Usage: UNIOPD_ROLLOUT_ADMIN_KEY=some-secret examples/opd-tiny/serve.sh     (Ctrl-C stops all three)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=.venv/bin
models=.cache/models
for spec in student:0 math-teacher:1 code-teacher:2; do
  name=${spec%%:*}
  [ -f "$models/$name/config.json" ] || "$bin/uniopd" models tiny --out "$models/$name" --seed "${spec##*:}"
done
export UNIOPD_ADMIN_KEYS="${UNIOPD_ROLLOUT_ADMIN_KEY:?set UNIOPD_ROLLOUT_ADMIN_KEY to the key the trainer will use}"
trap 'kill $(jobs -p) 2>/dev/null' INT TERM EXIT
"$bin/uniopd" teacher serve --model "$models/math-teacher" --domain math --port 8101 --log-level warning &
"$bin/uniopd" teacher serve --model "$models/code-teacher" --domain code --port 8102 --log-level warning &
"$bin/uniopd" rollout serve --model "$models/student" --port 8100 --log-level warning &
wait
