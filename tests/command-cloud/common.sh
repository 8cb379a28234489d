# shellcheck shell=sh
# Shared by the scripts of the directory-backed test cloud (sourced, not run).
#
# A machine is $CLOUD_DIR/<label>/ holding id, role, coordinator, pid, workspace/, state/ and
# agent.log (in $CLOUD_LOG_DIR/<label>.log instead when that is set, so it outlives the machine);
# its agent is a real process on this host in a session of its own. With CLOUD_LAN set
# ("<namespace prefix> <switch namespace> <subnet> <tag>", see tests/common/netns.rs) each
# machine is also a host of its own: a network namespace on the test's bridge at
# 10.<subnet>.0.<100+n>, named in the machine's netns, ip and port (its switch port) files.

: "${CLOUD_DIR:?set CLOUD_DIR to the state directory of the cloud}"

# Locks this script holds (released when it exits, however it exits).
held=
trap release EXIT

release() {
    for l in $held; do
        rmdir "$CLOUD_DIR/.lock-$l" 2>/dev/null || true
    done
    held=
}

fail() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

tempfail() {
    echo "$(basename "$0"): $*" >&2
    exit 75
}

# The request on stdin, field $1 (a string), printed on one line. Fails when it is missing,
# empty when $2 is "optional".
field() {
    python3 -c '
import json, sys
name, optional = sys.argv[1], sys.argv[2] == "optional"
v = json.loads(sys.argv[3]).get(name)
if v is None and optional:
    v = ""
if not isinstance(v, str) or "\n" in v or (not v and not optional):
    sys.exit("request field %r is missing or not a one-line string" % name)
print(v)
' "$1" "${2:-required}" "$request"
}

# Refuses names that are not a plain directory name.
check_name() {
    case $1 in
    '' | .* | */* | *[!A-Za-z0-9._-]*) fail "invalid machine name: $1" ;;
    esac
}

# Whether process $1 is a zombie.
zombie() {
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ "$state" = Z ]
}

# Whether the agent of machine $1 is running: its pid is alive, not a zombie, and carries the
# label in its arguments (not a recycled pid).
alive() {
    pid=$(cat "$CLOUD_DIR/$1/pid" 2>/dev/null) || return 1
    case $pid in '' | *[!0-9]*) return 1 ;; esac
    [ -d "/proc/$pid" ] && ! zombie "$pid" || return 1
    tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | grep -qxF -- "$1"
}

# Machine $1 as JSON.
machine_json() {
    if alive "$1"; then s=running; else s=stopped; fi
    python3 -c '
import json, sys
print(json.dumps({"id": sys.argv[1], "label": sys.argv[1], "state": sys.argv[2], "place": "localhost"}))
' "$1" "$s"
}

# Consumes the line $1 of $CLOUD_FAULTS; true when it was there.
fault() {
    [ -n "${CLOUD_FAULTS:-}" ] && [ -f "$CLOUD_FAULTS" ] || return 1
    lock .faults
    found=1
    if grep -qxF -- "$1" "$CLOUD_FAULTS"; then
        found=0
        grep -vxF -- "$1" "$CLOUD_FAULTS" >"$CLOUD_FAULTS.tmp" || true
        mv "$CLOUD_FAULTS.tmp" "$CLOUD_FAULTS"
    fi
    unlock .faults
    return "$found"
}

# Takes the lock of machine $1 (create, destroy and reboot of one machine never overlap).
lock() {
    n=0
    until mkdir "$CLOUD_DIR/.lock-$1" 2>/dev/null; do
        n=$((n + 1))
        [ "$n" -lt 300 ] || tempfail "cannot lock machine $1"
        sleep 0.1
    done
    held="$held $1"
}

unlock() {
    rmdir "$CLOUD_DIR/.lock-$1"
    held=$(for l in $held; do [ "$l" = "$1" ] || printf ' %s' "$l"; done)
}

# Makes machine $1 a host on CLOUD_LAN (once: a reboot keeps its host).
lan_host() {
    [ -f "$CLOUD_DIR/$1/netns" ] && return 0
    # shellcheck disable=SC2086
    set -- "$1" $CLOUD_LAN
    [ "$#" -eq 5 ] || fail "CLOUD_LAN must be: <namespace prefix> <switch namespace> <subnet> <tag>"
    lock .hosts
    k=$(cat "$CLOUD_DIR/.next-host" 2>/dev/null || echo 0)
    echo $((k + 1)) >"$CLOUD_DIR/.next-host"
    unlock .hosts
    [ "$k" -lt 150 ] || fail "the LAN is full"
    ns="${2}m$k" h="v${5}m$k" p="v${5}n$k" addr="10.$4.0.$((100 + k))"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "$h" type veth peer name "$p"
    ip link set "$h" netns "$ns"
    ip link set "$p" netns "$3"
    ip -n "$3" link set "$p" master br0
    ip -n "$3" link set "$p" up
    ip -n "$ns" addr add "$addr/24" dev "$h"
    ip -n "$ns" link set "$h" up
    printf '%s\n' "$addr" >"$CLOUD_DIR/$1/ip"
    printf '%s\n' "$p" >"$CLOUD_DIR/$1/port"
    printf '%s\n' "$ns" >"$CLOUD_DIR/$1/netns"
}

# Starts the agent of machine $1 (its directory holds role and coordinator) in a session of
# its own; a join token, when there is one, reaches it in STANDBY_JOIN_TOKEN (never on its
# command line, which every local user can read).
launch() {
    dir="$CLOUD_DIR/$1"
    role=$(cat "$dir/role")
    bin="$CLOUD_AGENT_BIN_DIR/agent-$role"
    [ -x "$bin" ] || fail "$bin not found or not executable"
    log="$dir/agent.log"
    [ -z "${CLOUD_LOG_DIR:-}" ] || log="$CLOUD_LOG_DIR/$1.log"
    listen=127.0.0.1:0
    if [ -n "${CLOUD_LAN:-}" ]; then
        lan_host "$1"
        listen=0.0.0.0:0
        # Its network namespace only (ip netns exec would add a mount namespace too).
        set -- "$1" nsenter --net="/run/netns/$(cat "$dir/netns")" --
    else
        set -- "$1"
    fi
    label=$1
    shift
    rm -f "$dir/pid"
    unset STANDBY_OP
    # Split on purpose: extra agent arguments, separated by spaces.
    # shellcheck disable=SC2086
    setsid "$@" "$bin" --coordinator "$(cat "$dir/coordinator")" --machine "$label" \
        --workspace "$dir/workspace" --state-dir "$dir/state" --listen "$listen" \
        ${CLOUD_AGENT_ARGS:-} </dev/null >>"$log" 2>&1 &
    printf '%s\n' "$!" >"$dir/pid.tmp"
    mv "$dir/pid.tmp" "$dir/pid"
}

request=$(cat)
