# shellcheck shell=sh
# Shared by the scripts of the directory-backed test cloud (sourced, not run).
#
# A machine is $CLOUD_DIR/<label>/ holding id, pid, workspace/, state/ and agent.log; its agent
# is a real process on this host in a session of its own.

: "${CLOUD_DIR:?set CLOUD_DIR to the state directory of the cloud}"

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
    lock="$CLOUD_FAULTS.lock"
    n=0
    until mkdir "$lock" 2>/dev/null; do
        n=$((n + 1))
        [ "$n" -lt 100 ] || tempfail "cannot lock $lock"
        sleep 0.1
    done
    found=1
    if grep -qxF -- "$1" "$CLOUD_FAULTS"; then
        found=0
        grep -vxF -- "$1" "$CLOUD_FAULTS" >"$CLOUD_FAULTS.tmp" || true
        mv "$CLOUD_FAULTS.tmp" "$CLOUD_FAULTS"
    fi
    rmdir "$lock"
    return "$found"
}

request=$(cat)
