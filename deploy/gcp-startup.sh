#!/usr/bin/env bash
# Compute Engine startup script for a Standby CPU standby (a Spot e2 VM). GCE runs it as root on
# every boot, so it is idempotent: it creates the user `standby` when missing, installs agent-cpu
# once, and (re)starts it, as that user, only when it is not running. After a Spot preemption
# with instanceTerminationAction=STOP the disk survives; the coordinator replaces a preempted
# standby with a new VM and deletes the old one.
#
# The coordinator passes, as instance metadata attributes:
#   standby-coordinator   host:port of the coordinator
#   standby-join-token    single-use join token (only needed on the first boot)
#   standby-label         the VM's unique label (the agent's machine name)
#   standby-agent-url     where to download the agent-cpu binary (if not installed)
#   standby-agent-sha256  its SHA-256, required with standby-agent-url (`sha256sum agent-cpu`
#                         prints it; the coordinator's [gcp] agent_sha256): a download that
#                         differs is deleted and never run
# The agent advertises the VM's external IP (one-to-one NAT) so the GPU can reach it.
#
# STANDBY_METADATA_URL, STANDBY_AGENT_BIN, STANDBY_STATE_DIR, STANDBY_WORKSPACE,
# STANDBY_LISTEN_PORT, STANDBY_LISTEN_HOST, STANDBY_USER (the agent's user, default standby; tests
# name the user running them) and STANDBY_USE_SYSTEMD=0 override the defaults (tests use them).
# Sourced (`. gcp-startup.sh`), it only defines its functions: the tests call them.
set -euo pipefail

MD="${STANDBY_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}"
STATE_DIR="${STANDBY_STATE_DIR:-/var/lib/standby}"
WORKSPACE="${STANDBY_WORKSPACE:-/workspace}"
BIN="${STANDBY_AGENT_BIN:-/usr/local/bin/agent-cpu}"
PORT="${STANDBY_LISTEN_PORT:-7701}"
HOST="${STANDBY_LISTEN_HOST:-0.0.0.0}"
RUN_AS="${STANDBY_USER:-standby}"

md() {
    curl -fsS --retry 5 --retry-connrefused -H 'Metadata-Flavor: Google' "$MD/$1"
}
# An attribute, or empty when the instance does not have it.
attr() {
    md "instance/attributes/$1" 2>/dev/null || true
}

# Downloads URL to BIN only when its SHA-256 is the pinned WANT; anything else is deleted.
# SETTING names where WANT comes from, for the message when it is missing.
install_agent() {
    local url="$1" want="$2" bin="$3" setting="$4" tmp got
    if [ -z "$want" ]; then
        echo "standby: refusing to download $url without its SHA-256: set $setting" \
            "(print it with: sha256sum $(basename "$bin"))" >&2
        return 1
    fi
    mkdir -p "$(dirname "$bin")"
    # Next to BIN, so the final rename is atomic and BIN is never a partial file.
    tmp="$(mktemp "$bin.download.XXXXXX")"
    if ! curl -fsSL --retry 5 -o "$tmp" "$url"; then
        rm -f "$tmp"
        echo "standby: could not download $url" >&2
        return 1
    fi
    got="$(sha256sum "$tmp" | cut -d' ' -f1)"
    if [ "$got" != "${want,,}" ]; then
        rm -f "$tmp"
        echo "standby: $url has SHA-256 $got, not the pinned $want: deleted, not run" >&2
        return 1
    fi
    chmod 0755 "$tmp"
    mv -f "$tmp" "$bin"
}

# Creates USER (a system user with its own group, no login) when it does not exist yet.
ensure_user() {
    local user="$1" home="$2"
    if id -u "$user" >/dev/null 2>&1; then
        return 0
    fi
    useradd --system --user-group --no-create-home --home-dir "$home" \
        --shell /usr/sbin/nologin "$user"
}

# Whether the agent must switch to USER: the script runs as root and USER is someone else. A
# script that is not root cannot switch: the agent then runs as whoever runs the script.
must_switch() {
    local user="$1"
    if [ "$(id -un)" = "$user" ]; then
        return 1
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "standby: not root: the agent runs as $(id -un), not $user" >&2
        return 1
    fi
}

# The command prefix that runs a program as USER (who exists by then): setpriv, else runuser.
# The environment is kept: the join token travels in it, never on a command line.
as_user_prefix() {
    local user="$1"
    if command -v setpriv >/dev/null; then
        echo setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups --inh-caps=-all \
            --no-new-privs --
    else
        echo runuser -u "$user" --
    fi
}

# Gives USER the state directory (mode 0700) and the workspace. The workspace is handed over
# whole the first time (when its top is not USER's yet), so later starts stay cheap.
hand_over() {
    local user="$1"
    chown -R "$user:" "$STATE_DIR"
    if [ "$(stat -c %U "$WORKSPACE")" != "$user" ]; then
        chown -R "$user:" "$WORKSPACE"
    fi
}

# The agent's settings, one KEY=VALUE a line: they reach the agent as its environment, so the
# join token never appears on a command line.
agent_settings() {
    local coordinator="$1" label="$2" ip="$3" token
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
}

# The systemd unit for the agent, hardened as deploy/systemd/standby-agent-cpu.service is (the
# tests check both with systemd-analyze). Type=notify: the agent sends READY=1 once it serves.
agent_unit() {
    local envfile="$1" user="$2"
    cat <<UNIT
[Unit]
Description=Standby CPU standby agent
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
TimeoutStartSec=15min
User=$user
Group=$user
EnvironmentFile=$envfile
ExecStart=$BIN
Restart=on-failure
RestartSec=2
LimitNOFILE=1048576
UMask=0077
ProtectSystem=strict
ReadWritePaths=$STATE_DIR $WORKSPACE
ProtectHome=yes
PrivateTmp=yes
PrivateMounts=yes
PrivateDevices=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
SystemCallArchitectures=native
LockPersonality=yes
RestrictNamespaces=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
PrivateUsers=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes

[Install]
WantedBy=multi-user.target
UNIT
}

main() {
    local coordinator label url ip envfile pidfile
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
        install_agent "$url" "$(attr standby-agent-sha256)" "$BIN" \
            "the standby-agent-sha256 metadata ([gcp] agent_sha256)" || exit 1
    fi

    ip="$(md instance/network-interfaces/0/access-configs/0/external-ip 2>/dev/null || true)"

    local -a as_user=()
    local user
    user="$(id -un)"
    if must_switch "$RUN_AS"; then
        ensure_user "$RUN_AS" "$STATE_DIR"
        hand_over "$RUN_AS"
        read -r -a as_user <<<"$(as_user_prefix "$RUN_AS")"
        user="$RUN_AS"
    fi

    if [ "${STANDBY_USE_SYSTEMD:-1}" != 0 ] && command -v systemctl >/dev/null; then
        # Root's, outside the directories the agent may write: systemd reads it as root.
        envfile=/etc/standby/agent-cpu.env
        install -d -m 0700 /etc/standby
        (umask 077 && agent_settings "$coordinator" "$label" "$ip" >"$envfile.tmp")
        mv "$envfile.tmp" "$envfile"
        agent_unit "$envfile" "$user" >/etc/systemd/system/standby-agent-cpu.service
        systemctl daemon-reload
        systemctl enable standby-agent-cpu.service
        systemctl restart standby-agent-cpu.service
        exit 0
    fi

    pidfile="$STATE_DIR/agent.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        exit 0
    fi
    # Exported by the shell (a builtin): nothing the agent could have written is sourced.
    local kv
    while IFS= read -r kv; do
        export "${kv?}"
    done < <(agent_settings "$coordinator" "$label" "$ip")
    nohup "${as_user[@]}" "$BIN" >>"$STATE_DIR/agent.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
}

# Run unless sourced (`return` works only in a sourced file or a function).
if ! (return 0 2>/dev/null); then
    main "$@"
fi
