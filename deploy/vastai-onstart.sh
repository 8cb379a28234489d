#!/usr/bin/env bash
# Vast.ai on-start script for a Standby GPU machine. Vast runs it on every container start, so it
# is idempotent: it installs agent-gpu once and (re)starts it only when it is not running.
#
# The coordinator passes, as environment variables of the instance:
#   STANDBY_COORDINATOR  host:port of the coordinator
#   STANDBY_JOIN_TOKEN   single-use join token (only needed on the first start)
#   STANDBY_MACHINE      the instance's unique label (the agent's machine name)
#   STANDBY_AGENT_URL    where to download the agent-gpu binary (if not in the image)
# Vast maps container ports to public ones and says which in VAST_TCP_PORT_<port> and
# PUBLIC_IPADDR; the agent advertises that address so the CPU standby can reach it.
set -euo pipefail

STATE_DIR="${STANDBY_STATE_DIR:-/var/lib/standby}"
WORKSPACE="${STANDBY_WORKSPACE:-/workspace}"
BIN="${STANDBY_AGENT_BIN:-/usr/local/bin/agent-gpu}"
PORT="${STANDBY_LISTEN_PORT:-7702}"

mkdir -p "$STATE_DIR" "$WORKSPACE"
chmod 700 "$STATE_DIR"

if [ ! -x "$BIN" ]; then
    if [ -z "${STANDBY_AGENT_URL:-}" ]; then
        echo "standby: $BIN missing and STANDBY_AGENT_URL not set" >&2
        exit 1
    fi
    tmp="$(mktemp)"
    curl -fsSL --retry 5 -o "$tmp" "$STANDBY_AGENT_URL"
    install -m 0755 "$tmp" "$BIN"
    rm -f "$tmp"
fi

pidfile="$STATE_DIR/agent.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    exit 0
fi

advertise=()
public_port_var="VAST_TCP_PORT_${PORT}"
if [ -n "${PUBLIC_IPADDR:-}" ] && [ -n "${!public_port_var:-}" ]; then
    advertise=(--advertise "$(echo "$PUBLIC_IPADDR" | tr -d '[:space:]'):${!public_port_var}")
fi

# The token is single-use: once joined, the certificate in the state directory is enough. The
# agent reads it from its environment (STANDBY_JOIN_TOKEN), never from its command line.
if [ -f "$STATE_DIR/tls/node.pem" ]; then
    unset STANDBY_JOIN_TOKEN
fi

nohup "$BIN" \
    --workspace "$WORKSPACE" \
    --state-dir "$STATE_DIR" \
    --coordinator "$STANDBY_COORDINATOR" \
    --machine "$STANDBY_MACHINE" \
    --listen "0.0.0.0:${PORT}" \
    "${advertise[@]}" \
    >>"$STATE_DIR/agent.log" 2>&1 &
echo $! >"$pidfile"
