"""A PyTorch Lightning callback that flushes each checkpoint to the CPU standby once it is saved.

    from standby.lightning import StandbyCallback
    trainer = Trainer(callbacks=[ModelCheckpoint(dirpath="/workspace/ckpt"), StandbyCallback()])

Lightning's own `on_save_checkpoint` hook runs *before* the file is written, so the callback
instead wraps the strategy's `CheckpointIO` when the trainer is set up: every
`save_checkpoint` (by `ModelCheckpoint` or `trainer.save_checkpoint`) is followed by a flush on
the process that wrote it. Strategies that save without a `CheckpointIO` (FSDP, model
parallel) get their `save_checkpoint` wrapped instead, flushing on each machine's local rank 0
after its own part is written. An asynchronous `CheckpointIO` returns before the file is
complete; with one, the flush covers only what was written by then.

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
        try:
            io = strategy.checkpoint_io
        except NotImplementedError:
            self._wrap_strategy(trainer)
            return
        if not isinstance(io, _FlushingCheckpointIO):
            self._wrapped = io
            strategy.checkpoint_io = _FlushingCheckpointIO(io, self.flush)

    def _wrap_strategy(self, trainer) -> None:
        """For strategies without a `CheckpointIO`: flush after the strategy's own save."""
        strategy = trainer.strategy
        if "save_checkpoint" in vars(strategy):
            return  # wrapped already (a second stage)
        save = strategy.save_checkpoint
        flush = self.flush

        def save_checkpoint(checkpoint, filepath, *args, **kwargs):
            result = save(checkpoint, filepath, *args, **kwargs)
            if getattr(trainer, "local_rank", 0) == 0:
                flush(f"checkpoint {filepath}")
            return result

        strategy.save_checkpoint = save_checkpoint

    def teardown(self, trainer, pl_module, stage: str) -> None:
        strategy = trainer.strategy
        if "save_checkpoint" in vars(strategy):
            del strategy.save_checkpoint
        elif self._wrapped is not None and isinstance(strategy.checkpoint_io, _FlushingCheckpointIO):
            strategy.checkpoint_io = self._wrapped
        self._wrapped = None
