"""A Hugging Face `Trainer` callback that flushes each checkpoint to the CPU standby.

    from standby.huggingface import StandbyCallback
    trainer = Trainer(..., args=TrainingArguments(output_dir="/workspace/out"),
                      callbacks=[StandbyCallback()])

`on_save` runs after the `Trainer` wrote a checkpoint (model, optimizer, scheduler, trainer
state). The process that wrote it flushes: world process zero, or each node's local process zero
with `save_on_each_node`.

Importing this module imports `transformers`; `import standby` does not.
"""

from typing import Optional

from ._hook import FlushAfterSave
from ._socket import PathLike

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError("standby.huggingface needs transformers: pip install transformers") from e

__all__ = ["StandbyCallback"]


class StandbyCallback(TrainerCallback):
    """Flushes the workspace to the CPU standby after each checkpoint save.

    `timeout`: seconds one flush may take. `state_dir`: agent-gpu's state directory (default
    `$STANDBY_STATE_DIR`). `strict`: raise when a flush fails (stopping training) instead of
    logging a warning.
    """

    def __init__(
        self,
        timeout: float = 120.0,
        state_dir: Optional[PathLike] = None,
        strict: bool = False,
    ):
        self.flush = FlushAfterSave(timeout, state_dir, strict)

    def on_save(self, args, state, control, **kwargs):
        if _wrote_checkpoint(args, state):
            self.flush(f"checkpoint of step {getattr(state, 'global_step', '?')}")
        return control


def _wrote_checkpoint(args, state) -> bool:
    if getattr(args, "save_on_each_node", False):
        return bool(getattr(state, "is_local_process_zero", True))
    return bool(getattr(state, "is_world_process_zero", True))
