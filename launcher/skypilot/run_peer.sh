#!/usr/bin/env bash
# The run script of the SkyPilot tasks (peer.yaml, peer-gpu.yaml): one checkfree peer on this VM, from the
# task's environment. Refuses (exit 2) without the swarm's token, id or run id.
set -euo pipefail
need() { if [ -z "${!1:-}" ]; then echo "pass the swarm's $2: $3" >&2; exit 2; fi; }
need CHECKFREE_JOIN_TOKEN "join token" "--secret CHECKFREE_JOIN_TOKEN"
need CHECKFREE_SWARM_ID "id" "--env CHECKFREE_SWARM_ID=\$(cat RUN_DIR/swarm_id)"
need RUN_ID "run id" "--env RUN_ID=... (the first peer's swarm.run_id)"
if [ -n "${INTERFACE:-}" ]; then
  where=(membership.host=0.0.0.0 membership.interface="$INTERFACE")
else
  # the VM's private address: a cloud VM's public address is on none of its interfaces
  where=(membership.host=0.0.0.0 membership.announce_host="$(hostname -I | awk '{print $1}')")
fi
bucket=()
if [ -n "${BUCKET:-}" ]; then  # the GPU task: tokens in, checkpoints and logs out
  bucket=(data.path="$BUCKET/tokens" checkpoint.dir="$BUCKET/checkpoints")
  LOG_URL="${LOG_URL:-$BUCKET/logs}"
fi
if [ -n "${LOG_URL:-}" ]; then bucket+=(swarm.log_url="$LOG_URL"); fi
name="${PEER_NAME:-$(hostname -s | tr -c 'A-Za-z0-9_\n-' '-' | cut -c1-32)}"
# shellcheck disable=SC2086  # ROLE, INITIAL_PEERS and EXTRA are word lists
exec ~/checkfree-venv/bin/checkfree peer "$CONFIG" swarm.run_id="$RUN_ID" "${where[@]}" \
  membership.port_range="$PORT_RANGE" swarm.preemption.provider="$PREEMPTION" ${EXTRA:-} "${bucket[@]}" \
  --run-dir "$RUN_DIR" --peer-id "$name" --initial-peers $INITIAL_PEERS $ROLE
