"""What both training-library callbacks do after a checkpoint is saved: flush, and either raise
or log when the flush fails."""

import logging
from typing import Optional

from . import flush
from ._errors import StandbyError
from ._socket import PathLike

log = logging.getLogger("standby")


class FlushAfterSave:
    """Flushes the workspace to the CPU standby. With `strict`, a failed flush raises (and stops
    training); without, it is logged as a warning and training goes on: the checkpoint is on the
    local disk and the agent keeps replicating it."""

    def __init__(self, timeout: float, state_dir: Optional[PathLike], strict: bool):
        self.timeout = timeout
        self.state_dir = state_dir
        self.strict = strict
        #: Generations the flushes made durable, newest last (for logs and tests).
        self.generations = []

    def __call__(self, what: str) -> Optional[int]:
        try:
            generation = flush(timeout=self.timeout, state_dir=self.state_dir)
        except StandbyError as e:
            if self.strict:
                raise
            log.warning("standby: %s is not yet safe on the CPU standby: %s", what, e)
            return None
        self.generations.append(generation)
        log.info("standby: %s is durable on the CPU standby (generation %d)", what, generation)
        return generation
