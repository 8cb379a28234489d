"""The exceptions `standby` raises: one base class, one subclass per thing a caller may handle."""


class StandbyError(Exception):
    """Anything that went wrong talking to the local agent-gpu."""


class AgentUnreachable(StandbyError):
    """No agent-gpu answers on the control socket (not running, wrong state directory, or no
    permission on it), or it is shutting down."""


class FlushTimeout(StandbyError, TimeoutError):
    """The writes were not durable on the CPU standby within the timeout. The agent keeps
    trying; the data already durable there is untouched."""


class FlushRefused(StandbyError):
    """The agent will not flush (for example it was fenced: this machine is no longer the
    primary of its pair, so nothing it writes is replicated any more)."""


class ProtocolError(StandbyError):
    """The agent answered something this client cannot read (a different version?)."""
