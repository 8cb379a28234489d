"""Fixtures: the real agent pair `tests/python_flush.rs` starts, and stand-ins for the training
libraries (which are not installed here: torch alone is hundreds of MB)."""

import os
import sys
import types
from pathlib import Path

import pytest


class Pair:
    """A running static pair: agent-gpu's workspace and state directory, agent-cpu's replica and
    process id."""

    def __init__(self):
        self.workspace = Path(os.environ["STANDBY_TEST_WORKSPACE"])
        self.state_dir = Path(os.environ["STANDBY_TEST_STATE_DIR"])
        self.replica = Path(os.environ["STANDBY_TEST_REPLICA"])
        self.cpu_pid = int(os.environ["STANDBY_TEST_CPU_PID"])


@pytest.fixture
def pair():
    if "STANDBY_TEST_WORKSPACE" not in os.environ:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: run these tests through tests/python_flush.rs (cargo test)")
        pytest.skip("no agent pair: tests/python_flush.rs (cargo test) starts one")
    return Pair()


class _StandIn:
    """Marks a class as a stand-in for a library's base class."""


@pytest.fixture
def stand_in_libraries(monkeypatch):
    """Stand-in modules for the names `standby.lightning` and `standby.huggingface` import, so
    the callbacks' own code runs without torch. They provide only the base classes; what the
    callbacks do is checked against the real agent."""

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    callback = type("Callback", (_StandIn,), {})
    checkpoint_io = type("CheckpointIO", (_StandIn,), {})
    module("lightning")
    module("lightning.pytorch")
    module("lightning.pytorch.callbacks", Callback=callback)
    module("lightning.pytorch.plugins", CheckpointIO=checkpoint_io)
    module("transformers", TrainerCallback=type("TrainerCallback", (_StandIn,), {}))
    for name in ("standby.lightning", "standby.huggingface"):
        monkeypatch.delitem(sys.modules, name, raising=False)
