"""Standby's flush barrier and status for Python training loops.

    import standby
    torch.save(model.state_dict(), "/workspace/ckpt/step-1000.pt")
    standby.flush(timeout=120)      # returns once that file is durable on the CPU standby

It talks to the local agent-gpu over its control socket (`<state-dir>/agent.sock`), found from
`state_dir=` or `$STANDBY_STATE_DIR` as `agent-gpu flush` finds it. Standard library only;
importing `standby` imports no machine-learning library. The callbacks live in submodules that
import theirs when they are imported: `standby.lightning.StandbyCallback` (PyTorch Lightning) and
`standby.huggingface.StandbyCallback` (Hugging Face `Trainer`).
"""

import dataclasses
import datetime
import math
import time
from typing import Any, Dict, Optional, Union

from . import _socket
from ._errors import (
    AgentUnreachable,
    FlushRefused,
    FlushTimeout,
    ProtocolError,
    StandbyError,
)
from ._socket import PathLike, socket_path

__all__ = [
    "flush",
    "status",
    "Status",
    "socket_path",
    "StandbyError",
    "AgentUnreachable",
    "FlushTimeout",
    "FlushRefused",
    "ProtocolError",
    "DEFAULT_TIMEOUT",
]

__version__ = "0.1.0"

#: The CLI's default (`agent-gpu flush --timeout 60s`).
DEFAULT_TIMEOUT = 60.0

#: How much longer than the flush timeout the client waits for the agent's own answer (which
#: says why the flush timed out) before it gives up on the agent.
_ANSWER_GRACE_S = 10.0

#: How long `status()` waits for an answer.
_STATUS_WAIT_S = 10.0

Timeout = Union[float, int, datetime.timedelta]


def flush(timeout: Timeout = DEFAULT_TIMEOUT, state_dir: Optional[PathLike] = None) -> int:
    """Returns once everything written to the workspace before this call is durable on the CPU
    standby, with the generation that made it so.

    Raises `FlushTimeout` when that takes longer than `timeout` (seconds or a timedelta),
    `FlushRefused` when the agent will not flush (fenced), `AgentUnreachable` when no agent-gpu
    answers. A failed flush changes nothing on the standby: what was durable stays so.
    """
    seconds = _seconds(timeout)
    path = socket_path(state_dir)
    req = {"op": "flush", "timeout_ms": max(1, int(seconds * 1000))}
    try:
        reply = _socket.request(path, req, seconds + _ANSWER_GRACE_S)
    except TimeoutError as e:
        if isinstance(e, StandbyError):
            raise
        raise FlushTimeout(str(e)) from e
    if reply["ok"]:
        generation = reply.get("generation")
        if not isinstance(generation, int):
            raise ProtocolError(f"agent-gpu at {path} answered a flush without a generation")
        return generation
    raise _failure(reply)


def _failure(reply: Dict[str, Any]) -> StandbyError:
    """The exception for a refused request. Agents older than the `kind` field said a timeout
    only in words ("not durable after ...")."""
    error = str(reply.get("error") or "unknown error")
    kind = reply.get("kind")
    if kind is None and error.startswith("not durable after"):
        kind = "timeout"
    if kind == "timeout":
        return FlushTimeout(f"flush failed: {error}")
    if kind == "unavailable":
        return AgentUnreachable(f"flush failed: {error}")
    return FlushRefused(f"flush failed: {error}")


def _seconds(timeout: Timeout) -> float:
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be seconds or a timedelta, not {type(timeout).__name__}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout}")
    return float(timeout)


@dataclasses.dataclass(frozen=True)
class Status:
    """What the running agent-gpu reports (`agent-gpu status`). Figures the agent adds in later
    versions are kept in `extra`; ones it lacks are None."""

    epoch: Optional[int] = None
    last_durable_generation: Optional[int] = None
    #: When the last generation became durable on the standby (Unix ms, 0: never).
    last_durable_unix_ms: Optional[int] = None
    #: When the oldest change not yet durable on the standby was seen (Unix ms; None: nothing
    #: pending).
    oldest_pending_unix_ms: Optional[int] = None
    pending_bytes: Optional[int] = None
    connected: Optional[bool] = None
    last_error: Optional[str] = None
    fenced: Optional[bool] = None
    generations: Optional[int] = None
    bytes_sent_total: Optional[int] = None
    last_sync_ms: Optional[int] = None
    #: The manifest root (blake3, hex) both machines agreed on last.
    root: Optional[str] = None
    workspace_bytes: Optional[int] = None
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Status":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in d.items() if k in known},
            extra={k: v for k, v in d.items() if k not in known},
        )

    def rpo_seconds(self, now: Optional[float] = None) -> float:
        """The age of the oldest change not yet durable on the standby (0.0: none pending):
        what a failure now would lose."""
        if not self.oldest_pending_unix_ms:
            return 0.0
        now_ms = (time.time() if now is None else now) * 1000
        return max(0.0, (now_ms - self.oldest_pending_unix_ms) / 1000)


def status(state_dir: Optional[PathLike] = None) -> Status:
    """The running agent-gpu's figures: epoch, last durable generation, pending bytes, the
    oldest pending change (RPO), connection and last error."""
    path = socket_path(state_dir)
    try:
        reply = _socket.request(path, {"op": "status"}, _STATUS_WAIT_S)
    except TimeoutError as e:
        raise AgentUnreachable(str(e)) from e
    if not reply["ok"]:
        raise StandbyError(f"status failed: {reply.get('error') or 'unknown error'}")
    figures = reply.get("status")
    if not isinstance(figures, dict):
        raise ProtocolError(f"agent-gpu at {path} answered status without figures")
    return Status.from_dict(figures)
