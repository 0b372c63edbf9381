#!/usr/bin/env bash
# Stop the Slurm cluster that .ci/slurm/start.sh started from $DAPC_SLURM_DIR
# (default /tmp/dapc-slurm): cancels its jobs, then stops its slurmd, slurmctld and munged
# daemons and their slurmstepd processes. Touches no other process. Leaves the state dir
# (logs included) in place; start.sh clears it on the next fresh start.
set -uo pipefail

DIR="${DAPC_SLURM_DIR:-/tmp/dapc-slurm}"
[[ -d "$DIR" ]] || exit 0
DIR="$(cd "$DIR" && pwd)"
CONF="$DIR/etc/slurm.conf"

log() { echo "[slurm-stop] $*" >&2; }

# Cancel running jobs first so that their steps end cleanly.
if [[ -f "$CONF" ]]; then
  SLURM_CONF="$CONF" timeout 10 scancel --full --quiet --user="$(id -un)" >/dev/null 2>&1 || true
fi

# Our daemons: those named in our pid files, plus any munged/slurmctld/slurmd whose command
# line names this state dir (a daemon whose pid file got lost), plus slurmstepd processes
# whose environment points at our slurm.conf.
declare -A pids=()
for f in "$DIR"/run/*.pid; do
  [[ -s "$f" ]] || continue
  p="$(cat "$f")"
  [[ "$p" =~ ^[0-9]+$ ]] && kill -0 "$p" 2>/dev/null && pids[$p]=1
done
for d in /proc/[0-9]*; do
  p="${d#/proc/}"
  [[ "$p" == "$$" ]] && continue
  comm="$(cat "$d/comm" 2>/dev/null)" || continue
  case "$comm" in
    munged | slurmctld | slurmd)
      tr '\0' ' ' 2>/dev/null <"$d/cmdline" | grep -qF "$DIR/" && pids[$p]=1 ;;
    slurmstepd)
      tr '\0' '\n' 2>/dev/null <"$d/environ" | grep -qxF "SLURM_CONF=$CONF" && pids[$p]=1 ;;
  esac
done

(( ${#pids[@]} )) || exit 0
log "stopping pids ${!pids[*]}"
kill -TERM "${!pids[@]}" 2>/dev/null || true
for _ in $(seq 50); do
  alive=()
  for p in "${!pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
  (( ${#alive[@]} )) || break
  sleep 0.1
done
for p in "${!pids[@]}"; do
  kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
done
rm -f "$DIR"/run/*.pid
exit 0
