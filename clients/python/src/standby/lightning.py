"""A PyTorch Lightning callback that flushes each checkpoint to the CPU standby once it is saved.

    from standby.lightning import StandbyCallback
    trainer = Trainer(callbacks=[ModelCheckpoint(dirpath="/workspace/ckpt"), StandbyCallback()])

Lightning's own `on_save_checkpoint` hook runs *before* the file is written, so the callback
instead wraps the strategy's `CheckpointIO` when the trainer is set up: every
`save_checkpoint` (by `ModelCheckpoint` or `trainer.save_checkpoint`) is followed by a flush on
the process that wrote it. An asynchronous `CheckpointIO` returns before the file is complete;
with one, the flush covers only what was written by then.

Importing this module imports Lightning (`lightning`, else `pytorch_lightning`); `import standby`
does not.
"""

from typing import Any, Optional

from ._hook import FlushAfterSave
from ._socket import PathLike

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins import CheckpointIO
except ImportError:
    try:
        from pytorch_lightning.callbacks import Callback
        from pytorch_lightning.plugins import CheckpointIO
    except ImportError as e:
        raise ImportError(
            "standby.lightning needs PyTorch Lightning: pip install lightning"
        ) from e

__all__ = ["StandbyCallback"]


class _FlushingCheckpointIO(CheckpointIO):
    """The strategy's `CheckpointIO`, with a flush after each save and removal."""

    def __init__(self, inner: Any, flush: FlushAfterSave):
        self.inner = inner
        self.flush = flush

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.flush(f"checkpoint {path}")

    def load_checkpoint(self, path, *args, **kwargs):
        return self.inner.load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path):
        self.inner.remove_checkpoint(path)

    def teardown(self):
        self.inner.teardown()

    def __getattr__(self, name):
        # Only called for what this class lacks: anything else the wrapped IO offers.
        if name in ("inner", "flush"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class StandbyCallback(Callback):
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
        super().__init__()
        self.flush = FlushAfterSave(timeout, state_dir, strict)
        self._wrapped = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, _FlushingCheckpointIO):
            self._wrapped = strategy.checkpoint_io
            strategy.checkpoint_io = _FlushingCheckpointIO(self._wrapped, self.flush)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        strategy = trainer.strategy
        if self._wrapped is not None and isinstance(strategy.checkpoint_io, _FlushingCheckpointIO):
            strategy.checkpoint_io = self._wrapped
        self._wrapped = None
