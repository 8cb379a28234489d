#!/usr/bin/env bash
# Vast.ai on-start script for a Standby GPU machine. Vast runs it as root on every container
# start, so it is idempotent: it creates the user `standby` when missing, installs agent-gpu once,
# and (re)starts it, as that user, only when it is not running.
#
# The coordinator passes, as environment variables of the instance:
#   STANDBY_COORDINATOR    host:port of the coordinator
#   STANDBY_JOIN_TOKEN     single-use join token (only needed on the first start)
#   STANDBY_MACHINE        the instance's unique label (the agent's machine name)
#   STANDBY_AGENT_URL      where to download the agent-gpu binary (if not in the image)
#   STANDBY_AGENT_SHA256   its SHA-256, required with STANDBY_AGENT_URL (`sha256sum agent-gpu`
#                          prints it): a download that differs is deleted and never run
# Vast maps container ports to public ones and says which in VAST_TCP_PORT_<port> and
# PUBLIC_IPADDR; the agent advertises that address so the CPU standby can reach it.
#
# STANDBY_AGENT_BIN, STANDBY_STATE_DIR, STANDBY_WORKSPACE, STANDBY_LISTEN_PORT and STANDBY_USER
# (the agent's user, default standby; tests name the user running them) override the defaults.
# Sourced (`. vastai-onstart.sh`), it only defines its functions: the tests call them.
set -euo pipefail

STATE_DIR="${STANDBY_STATE_DIR:-/var/lib/standby}"
WORKSPACE="${STANDBY_WORKSPACE:-/workspace}"
BIN="${STANDBY_AGENT_BIN:-/usr/local/bin/agent-gpu}"
PORT="${STANDBY_LISTEN_PORT:-7702}"
RUN_AS="${STANDBY_USER:-standby}"

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

main() {
    mkdir -p "$STATE_DIR" "$WORKSPACE"
    chmod 700 "$STATE_DIR"

    if [ ! -x "$BIN" ]; then
        if [ -z "${STANDBY_AGENT_URL:-}" ]; then
            echo "standby: $BIN missing and STANDBY_AGENT_URL not set" >&2
            exit 1
        fi
        install_agent "$STANDBY_AGENT_URL" "${STANDBY_AGENT_SHA256:-}" "$BIN" STANDBY_AGENT_SHA256 ||
            exit 1
    fi

    pidfile="$STATE_DIR/agent.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        exit 0
    fi

    local -a as_user=()
    if must_switch "$RUN_AS"; then
        ensure_user "$RUN_AS" "$STATE_DIR"
        hand_over "$RUN_AS"
        read -r -a as_user <<<"$(as_user_prefix "$RUN_AS")"
    fi

    advertise=()
    public_port_var="VAST_TCP_PORT_${PORT}"
    if [ -n "${PUBLIC_IPADDR:-}" ] && [ -n "${!public_port_var:-}" ]; then
        advertise=(--advertise "$(echo "$PUBLIC_IPADDR" | tr -d '[:space:]'):${!public_port_var}")
    fi

    # The token is single-use: once joined, the certificate in the state directory is enough.
    # The agent reads it from its environment (STANDBY_JOIN_TOKEN), never from its command line.
    if [ -f "$STATE_DIR/tls/node.pem" ]; then
        unset STANDBY_JOIN_TOKEN
    fi

    nohup "${as_user[@]}" "$BIN" \
        --workspace "$WORKSPACE" \
        --state-dir "$STATE_DIR" \
        --coordinator "$STANDBY_COORDINATOR" \
        --machine "$STANDBY_MACHINE" \
        --listen "0.0.0.0:${PORT}" \
        "${advertise[@]}" \
        >>"$STATE_DIR/agent.log" 2>&1 &
    echo $! >"$pidfile"
}

# Run unless sourced (`return` works only in a sourced file or a function).
if ! (return 0 2>/dev/null); then
    main "$@"
fi
