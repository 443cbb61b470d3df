#!/usr/bin/env bash
# Start, stop or freeze the GLUE grid (experiments/glue_grid.py) in the background on this machine.
#   start [COMMIT]  this checkout's runner (`glue_grid.py run --code $WT`) training with the src/ of a git
#                   worktree of COMMIT at $WT (default: the commit the grid's cells ran on): 2 cells at a time,
#                   one thread each, nice 10, log $LOG; finished cells are skipped; UNTIL=HH:MM (UTC): start
#                   only cells estimated to end by then (a session's end: a new machine loses running cells)
#   stop            SIGTERM to the runner: running cells checkpoint, the next start resumes them
#   pause | cont    SIGSTOP / SIGCONT the runner and its cells (quiet cores for a timing); logged in
#                   ROOT/pauses.log so train_seconds exclude the frozen time
#   status          cells done / left and a time estimate
#   report          docs/results.md's grid section, docs/results.json and docs/results_grid.png from ROOT (commit
#                   them: on a new machine docs/results.json is all that is left of the finished cells)
#   restore         a new machine: the finished cells from docs/results.json into ROOT (glue_grid.py restore)
# On a new machine: README's set-up (the venv at .venv), then restore, then start.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
ROOT=${ROOT:-/work/runs_glue_grid}
WT=${WT:-/work/wt-grid}
LOG=${LOG:-/work/runs_glue_grid.log}
GRID_COMMIT=42f3816  # every seeds cell so far ran on this commit's src/
runner() { pgrep -f "[g]lue_grid.py run" || true; }
cells() { pgrep -f "[v]erakit.cli train .*$ROOT" || true; }
case "${1:-}" in
  start)
    [ -n "$(runner)" ] && { echo "already running: $(runner)"; exit 0; }
    [ -d "$WT" ] || git -C "$REPO" worktree add --detach "$WT" "${2:-$GRID_COMMIT}" >/dev/null
    nohup nice -n 10 "$PY" "$REPO/experiments/glue_grid.py" run --jobs 2 --root "$ROOT" --code "$WT" ${UNTIL:+--until "$UNTIL"} >> "$LOG" 2>&1 &
    echo "started $! on $(git -C "$WT" rev-parse --short HEAD); log $LOG" ;;
  stop)
    for p in $(runner); do kill -TERM "$p"; done
    while [ -n "$(runner)" ]; do sleep 2; done; echo stopped ;;
  pause)
    echo "STOP $(date +%s.%N)" >> "$ROOT/pauses.log"
    for p in $(runner) $(cells); do kill -STOP "$p"; done; echo paused ;;
  cont)
    for p in $(runner) $(cells); do kill -CONT "$p"; done
    echo "CONT $(date +%s.%N)" >> "$ROOT/pauses.log"; echo resumed ;;
  status)
    "$PY" "$REPO/experiments/glue_grid.py" status --root "$ROOT" ;;
  restore)
    "$PY" "$REPO/experiments/glue_grid.py" restore --root "$ROOT" ;;
  report)
    "$PY" "$REPO/experiments/glue_grid.py" report --root "$ROOT" --results-md "$REPO/docs/results.md" \
      --json "$REPO/docs/results.json" --plot "$REPO/docs/results_grid.png" | grep -E "^(Cells|Processors)" ;;
  *) sed -n '2,/^set /p' "$0" | grep '^#'; exit 2 ;;
esac
