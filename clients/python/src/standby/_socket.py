"""The agent's control socket: `<state-dir>/agent.sock`, one JSON object per line each way.

This mirrors `src/agent/socket.rs` (ARCHITECTURE.md, "The Python client"): a request is
`{"op": "flush", "timeout_ms": N}` or `{"op": "status"}`; the reply is
`{"ok": bool, "error": str?, "kind": str?, "generation": int?, "status": {...}?}`.
"""

import json
import os
import socket
from pathlib import Path
from typing import Optional, Union

from ._errors import AgentUnreachable, ProtocolError

SOCKET = "agent.sock"
STATE_DIR_ENV = "STANDBY_STATE_DIR"

PathLike = Union[str, "os.PathLike[str]"]


def socket_path(state_dir: Optional[PathLike] = None) -> Path:
    """The control socket of the agent whose state directory is `state_dir`, else
    `$STANDBY_STATE_DIR`: the same order as `agent-gpu flush --state-dir` (flag, then
    environment). Like the CLI there is no default directory: without either it raises."""
    if state_dir is None:
        state_dir = os.environ.get(STATE_DIR_ENV) or None
    if state_dir is None:
        raise AgentUnreachable(
            "no state directory: pass state_dir= or set STANDBY_STATE_DIR to agent-gpu's "
            "--state-dir"
        )
    return Path(state_dir) / SOCKET


def request(path: Path, req: dict, wait_s: float) -> dict:
    """Sends `req` to the agent at `path` and returns its reply, waiting at most `wait_s`
    seconds for it."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as e:  # pragma: no cover - AF_UNIX exists on every supported system
        raise AgentUnreachable(f"cannot make a Unix socket: {e}") from e
    with conn:
        conn.settimeout(wait_s)
        try:
            conn.connect(str(path))
        except OSError as e:
            raise AgentUnreachable(
                f"no agent-gpu is running with state directory {path.parent} ({path}: {e})"
            ) from e
        try:
            conn.sendall(json.dumps(req).encode() + b"\n")
            line = _read_line(conn)
        except socket.timeout as e:
            raise TimeoutError(f"agent-gpu at {path} did not answer within {wait_s:.1f} s") from e
        except OSError as e:
            raise AgentUnreachable(f"agent-gpu at {path} dropped the connection: {e}") from e
    return _parse(line, path)


def _read_line(conn: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _parse(line: bytes, path: Path) -> dict:
    if not line.strip():
        raise AgentUnreachable(f"agent-gpu at {path} closed the connection without answering")
    try:
        reply = json.loads(line)
    except ValueError as e:
        raise ProtocolError(f"bad reply from agent-gpu at {path}: {e}") from e
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ProtocolError(f"bad reply from agent-gpu at {path}: {line[:200]!r}")
    return reply
