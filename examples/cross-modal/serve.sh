#!/usr/bin/env bash
# Train the cross-modal experts once (a text code teacher, a multimodal visual teacher, a multimodal student; a few
# minutes on 2 cores, cached), write the code and visual datasets, then serve both teachers and the student's
# rollout server on loopback.
# Usage: UNIOPD_ROLLOUT_ADMIN_KEY=some-secret examples/cross-modal/serve.sh     (Ctrl-C stops all three)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=.venv/bin
experts=.cache/experts
"$bin/uniopd" models prepare --out "$experts" --only code-teacher visual-teacher mm-student >/dev/null
export UNIOPD_ADMIN_KEYS="${UNIOPD_ROLLOUT_ADMIN_KEY:?set UNIOPD_ROLLOUT_ADMIN_KEY to the key the trainer will use}"
trap 'kill $(jobs -p) 2>/dev/null' INT TERM EXIT
"$bin/uniopd" teacher serve --model "$experts/models/code-teacher" --domain code --port 8102 --log-level warning &
"$bin/uniopd" teacher serve --model "$experts/models/visual-teacher" --domain visual --port 8103 --log-level warning &
"$bin/uniopd" rollout serve --model "$experts/models/mm-student" --port 8100 --log-level warning &
wait
