"""The client against a real static pair (agent-gpu and agent-cpu with mutual TLS), started by
`tests/python_flush.rs`: what `flush()` returns is on the standby's replica, byte for byte;
`status()` reports the pair as it is; a standby that stops answering makes `flush()` time out
and leaves the last flushed data intact; the callbacks flush after a save."""

import os
import signal
import sys
import time

import pytest

import standby

pytestmark = pytest.mark.agent


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def replica_bytes(pair, rel):
    p = pair.replica / rel
    return p.read_bytes() if p.exists() else None


def test_flushed_bytes_are_on_the_replica(pair):
    checkpoint = os.urandom(3 << 20)
    write(pair.workspace / "ckpt/step-100.pt", checkpoint)
    write(pair.workspace / "ckpt/step-100.json", b'{"loss": 0.5}')
    # Found through $STANDBY_STATE_DIR, as the CLI finds it.
    generation = standby.flush(timeout=60)
    assert generation >= 1
    assert replica_bytes(pair, "ckpt/step-100.pt") == checkpoint
    assert replica_bytes(pair, "ckpt/step-100.json") == b'{"loss": 0.5}'


def test_status_reports_the_pair(pair):
    write(pair.workspace / "status-probe.txt", b"probe")
    generation = standby.flush(timeout=60, state_dir=pair.state_dir)
    st = standby.status(state_dir=pair.state_dir)
    assert st.connected is True
    assert st.fenced is False
    assert st.last_durable_generation >= generation
    assert st.pending_bytes == 0
    assert st.rpo_seconds() == 0.0
    assert isinstance(st.epoch, int)
    assert st.generations >= 1 and st.bytes_sent_total > 0
    assert len(st.root) == 64 and int(st.root, 16) >= 0
    assert abs(time.time() * 1000 - st.last_durable_unix_ms) < 60_000
    assert st.workspace_bytes >= len(b"probe")


def test_flush_times_out_while_the_standby_is_stopped(pair):
    """agent-cpu frozen (SIGSTOP): its connection stays open but nothing becomes durable. The
    flush raises FlushTimeout after its timeout; the replica keeps the last flushed bytes."""
    good = os.urandom(1 << 20)
    write(pair.workspace / "model.pt", good)
    standby.flush(timeout=60)
    os.kill(pair.cpu_pid, signal.SIGSTOP)
    try:
        write(pair.workspace / "model.pt", os.urandom(1 << 20))
        write(pair.workspace / "new.pt", b"not yet safe")
        started = time.monotonic()
        with pytest.raises(standby.FlushTimeout, match="not durable after 2000 ms"):
            standby.flush(timeout=2)
        waited = time.monotonic() - started
        assert 1.9 <= waited < 10, waited
        st = standby.status()
        assert st.last_durable_generation is not None
        assert replica_bytes(pair, "model.pt") == good
        assert replica_bytes(pair, "new.pt") is None
    finally:
        os.kill(pair.cpu_pid, signal.SIGCONT)
    # Back: the same writes are flushed.
    standby.flush(timeout=60)
    assert replica_bytes(pair, "model.pt") == (pair.workspace / "model.pt").read_bytes()
    assert replica_bytes(pair, "new.pt") == b"not yet safe"


class _TorchLikeIO:
    """The strategy's own CheckpointIO (stand-in): writes the checkpoint's bytes."""

    def __init__(self):
        self.saved = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        write(path, checkpoint["bytes"])
        self.saved.append(path)

    def remove_checkpoint(self, path):
        os.remove(path)


class _Trainer:
    """Duck-typed stand-in for Lightning's Trainer: the strategy and its CheckpointIO."""

    def __init__(self):
        self.strategy = type("Strategy", (), {})()
        self.strategy.checkpoint_io = _TorchLikeIO()


def test_lightning_callback_flushes_after_each_save(pair, stand_in_libraries):
    from standby.lightning import StandbyCallback

    assert "torch" not in sys.modules
    callback = StandbyCallback(timeout=60, strict=True)
    trainer = _Trainer()
    inner = trainer.strategy.checkpoint_io
    callback.setup(trainer, None, "fit")
    callback.setup(trainer, None, "fit")  # a second stage does not wrap twice
    assert trainer.strategy.checkpoint_io.inner is inner
    for step in (1, 2):
        data = os.urandom(512 << 10)
        path = pair.workspace / f"lightning/epoch={step}.ckpt"
        trainer.strategy.checkpoint_io.save_checkpoint({"bytes": data}, path)
        # No waiting: the save returned only after the flush.
        assert replica_bytes(pair, f"lightning/epoch={step}.ckpt") == data
    assert len(callback.flush.generations) == 2
    assert inner.saved == [pair.workspace / f"lightning/epoch={s}.ckpt" for s in (1, 2)]
    callback.teardown(trainer, None, "fit")
    assert trainer.strategy.checkpoint_io is inner


class _ShardedStrategy:
    """Duck-typed stand-in for a strategy that saves without a CheckpointIO (FSDP)."""

    @property
    def checkpoint_io(self):
        raise NotImplementedError("FSDP does not use the CheckpointIO plugin interface")

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        write(filepath, checkpoint["bytes"])


def test_lightning_callback_without_a_checkpoint_io(pair, stand_in_libraries):
    from standby.lightning import StandbyCallback

    callback = StandbyCallback(timeout=60, strict=True)
    trainer = type("Trainer", (), {"local_rank": 0})()
    trainer.strategy = _ShardedStrategy()
    callback.setup(trainer, None, "fit")
    callback.setup(trainer, None, "validate")
    data = os.urandom(256 << 10)
    trainer.strategy.save_checkpoint({"bytes": data}, pair.workspace / "fsdp/last.ckpt")
    assert replica_bytes(pair, "fsdp/last.ckpt") == data
    assert len(callback.flush.generations) == 1
    # Another rank on this machine wrote its part; local rank 0 flushes, it does not.
    trainer.local_rank = 1
    trainer.strategy.save_checkpoint({"bytes": b"shard"}, pair.workspace / "fsdp/shard-1")
    assert len(callback.flush.generations) == 1
    callback.teardown(trainer, None, "fit")
    assert "save_checkpoint" not in vars(trainer.strategy)


def test_huggingface_callback_flushes_on_save(pair, stand_in_libraries):
    from standby.huggingface import StandbyCallback

    callback = StandbyCallback(timeout=60, strict=True)
    args = type("Args", (), {"save_on_each_node": False})()
    state = type("State", (), {"is_world_process_zero": True, "global_step": 500})()
    data = os.urandom(256 << 10)
    write(pair.workspace / "hf/checkpoint-500/model.safetensors", data)
    control = object()
    assert callback.on_save(args, state, control) is control
    assert replica_bytes(pair, "hf/checkpoint-500/model.safetensors") == data
    # Another process's save: it did not write, it does not flush.
    state.is_world_process_zero = False
    callback.on_save(args, state, control)
    assert len(callback.flush.generations) == 1
