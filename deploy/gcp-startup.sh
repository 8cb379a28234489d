#!/usr/bin/env bash
# Compute Engine startup script for a Standby CPU standby (a Spot e2 VM). GCE runs it as root on
# every boot, so it is idempotent: it installs agent-cpu once, and (re)starts it only when it is
# not running. After a Spot preemption with instanceTerminationAction=STOP the disk survives; the
# coordinator replaces a preempted standby with a new VM and deletes the old one.
#
# The coordinator passes, as instance metadata attributes:
#   standby-coordinator   host:port of the coordinator
#   standby-join-token    single-use join token (only needed on the first boot)
#   standby-label         the VM's unique label (the agent's machine name)
#   standby-agent-url     where to download the agent-cpu binary (if not installed)
#   standby-agent-sha256  its SHA-256 (checked when set)
# The agent advertises the VM's external IP (one-to-one NAT) so the GPU can reach it.
#
# STANDBY_METADATA_URL, STANDBY_AGENT_BIN, STANDBY_STATE_DIR, STANDBY_WORKSPACE,
# STANDBY_LISTEN_PORT, STANDBY_LISTEN_HOST and STANDBY_USE_SYSTEMD=0 override the defaults (tests use them).
set -euo pipefail

MD="${STANDBY_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}"
STATE_DIR="${STANDBY_STATE_DIR:-/var/lib/standby}"
WORKSPACE="${STANDBY_WORKSPACE:-/workspace}"
BIN="${STANDBY_AGENT_BIN:-/usr/local/bin/agent-cpu}"
PORT="${STANDBY_LISTEN_PORT:-7701}"
HOST="${STANDBY_LISTEN_HOST:-0.0.0.0}"

md() {
    curl -fsS --retry 5 --retry-connrefused -H 'Metadata-Flavor: Google' "$MD/$1"
}
# An attribute, or empty when the instance does not have it.
attr() {
    md "instance/attributes/$1" 2>/dev/null || true
}

coordinator="$(attr standby-coordinator)"
label="$(attr standby-label)"
if [ -z "$coordinator" ] || [ -z "$label" ]; then
    echo "standby: metadata standby-coordinator and standby-label are required" >&2
    exit 1
fi

mkdir -p "$STATE_DIR" "$WORKSPACE"
chmod 700 "$STATE_DIR"

if [ ! -x "$BIN" ]; then
    url="$(attr standby-agent-url)"
    if [ -z "$url" ]; then
        echo "standby: $BIN missing and no standby-agent-url metadata" >&2
        exit 1
    fi
    tmp="$(mktemp)"
    curl -fsSL --retry 5 -o "$tmp" "$url"
    sha="$(attr standby-agent-sha256)"
    if [ -n "$sha" ] && ! echo "$sha  $tmp" | sha256sum -c --status -; then
        echo "standby: $url does not match standby-agent-sha256; refusing to install it" >&2
        rm -f "$tmp"
        exit 1
    fi
    install -m 0755 "$tmp" "$BIN"
    rm -f "$tmp"
fi

ip="$(md instance/network-interfaces/0/access-configs/0/external-ip 2>/dev/null || true)"

# Settings for the agent, as its environment: the token never appears on a command line.
envfile="$STATE_DIR/agent.env"
umask 077
{
    echo "STANDBY_WORKSPACE=$WORKSPACE"
    echo "STANDBY_STATE_DIR=$STATE_DIR"
    echo "STANDBY_COORDINATOR=$coordinator"
    echo "STANDBY_MACHINE=$label"
    echo "STANDBY_LISTEN=$HOST:$PORT"
    if [ -n "$ip" ]; then
        echo "STANDBY_ADVERTISE=$ip:$PORT"
    fi
    # The token is single-use: once joined, the certificate in the state directory is enough.
    if [ ! -f "$STATE_DIR/tls/node.pem" ]; then
        token="$(attr standby-join-token)"
        if [ -n "$token" ]; then
            echo "STANDBY_JOIN_TOKEN=$token"
        fi
    fi
} >"$envfile.tmp"
mv "$envfile.tmp" "$envfile"

if [ "${STANDBY_USE_SYSTEMD:-1}" != 0 ] && command -v systemctl >/dev/null; then
    cat >/etc/systemd/system/standby-agent-cpu.service <<EOF
[Unit]
Description=Standby CPU standby agent
After=network-online.target
Wants=network-online.target

[Service]
EnvironmentFile=$envfile
ExecStart=$BIN
Restart=always
RestartSec=2
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable standby-agent-cpu.service
    systemctl restart standby-agent-cpu.service
    exit 0
fi

pidfile="$STATE_DIR/agent.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    exit 0
fi
set -a
# shellcheck disable=SC1090
. "$envfile"
set +a
nohup "$BIN" >>"$STATE_DIR/agent.log" 2>&1 </dev/null &
echo $! >"$pidfile"
