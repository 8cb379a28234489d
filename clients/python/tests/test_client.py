"""The client without an agent pair: discovery, arguments, what importing costs, and how each
kind of answer becomes a result or an exception. The answers come from a scripted control
socket (`scripted_agent`), standing in for agent-gpu; `test_agent.py` runs against a real one."""

import datetime
import json
import socket
import subprocess
import sys
import threading

import pytest

import standby


@pytest.fixture
def scripted_agent(tmp_path):
    """A control socket in `tmp_path` that answers each connection with the next scripted line
    (bytes; None: close without answering; an Event: say nothing until it is set) and records the requests."""
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    script, requests = [], []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                requests.append(json.loads(conn.makefile("rb").readline()))
                answer = script.pop(0)
                if isinstance(answer, threading.Event):
                    answer.wait(30)  # silent until released
                elif answer is not None:
                    conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    yield tmp_path, script, requests
    server.close()


def test_importing_standby_imports_no_training_library():
    code = (
        "import sys, standby, standby._hook\n"
        "heavy = [m for m in ('torch', 'lightning', 'pytorch_lightning', 'transformers')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_socket_path_from_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STANDBY_STATE_DIR", "/from/env")
    assert standby.socket_path(tmp_path) == tmp_path / "agent.sock"
    assert str(standby.socket_path()) == "/from/env/agent.sock"
    monkeypatch.delenv("STANDBY_STATE_DIR")
    with pytest.raises(standby.AgentUnreachable, match="STANDBY_STATE_DIR"):
        standby.flush()


def test_no_agent_is_unreachable(tmp_path):
    with pytest.raises(standby.AgentUnreachable, match="no agent-gpu is running"):
        standby.flush(timeout=1, state_dir=tmp_path)
    with pytest.raises(standby.AgentUnreachable):
        standby.status(state_dir=tmp_path)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_bad_timeouts_are_refused(bad, tmp_path):
    with pytest.raises(ValueError):
        standby.flush(timeout=bad, state_dir=tmp_path)


def test_timeout_types(tmp_path):
    with pytest.raises(TypeError):
        standby.flush(timeout="60s", state_dir=tmp_path)
    with pytest.raises(TypeError):
        standby.flush(timeout=True, state_dir=tmp_path)


def test_a_flush_sends_its_timeout_and_returns_the_generation(scripted_agent):
    d, script, requests = scripted_agent
    script.append(b'{"ok":true,"generation":42}\n')
    assert standby.flush(timeout=datetime.timedelta(seconds=2.5), state_dir=d) == 42
    assert requests == [{"op": "flush", "timeout_ms": 2500}]


@pytest.mark.parametrize(
    "answer, exception, words",
    [
        ({"ok": False, "kind": "timeout", "error": "not durable after 10 ms"},
         standby.FlushTimeout, "not durable"),
        ({"ok": False, "error": "not durable after 10 ms (last error: x)"},
         standby.FlushTimeout, "last error"),
        ({"ok": False, "kind": "refused", "error": "fenced: epoch 3 is newer"},
         standby.FlushRefused, "fenced"),
        ({"ok": False, "kind": "unavailable", "error": "agent stopped"},
         standby.AgentUnreachable, "agent stopped"),
        ({"ok": False}, standby.FlushRefused, "unknown error"),
    ],
)
def test_failed_flushes_raise_by_kind(scripted_agent, answer, exception, words):
    d, script, _ = scripted_agent
    script.append(json.dumps(answer).encode() + b"\n")
    with pytest.raises(exception, match=words):
        standby.flush(timeout=1, state_dir=d)


def test_a_timeout_is_also_a_builtin_timeout_error():
    assert issubclass(standby.FlushTimeout, TimeoutError)
    assert issubclass(standby.FlushTimeout, standby.StandbyError)


@pytest.mark.parametrize(
    "answer, exception",
    [
        (None, standby.AgentUnreachable),
        (b"not json\n", standby.ProtocolError),
        (b"[1, 2]\n", standby.ProtocolError),
        (b'{"ok": true}\n', standby.ProtocolError),
    ],
)
def test_unreadable_answers(scripted_agent, answer, exception):
    d, script, _ = scripted_agent
    script.append(answer)
    with pytest.raises(exception):
        standby.flush(timeout=1, state_dir=d)


def test_status_keeps_unknown_figures_and_computes_the_rpo(scripted_agent):
    d, script, requests = scripted_agent
    figures = {"epoch": 2, "pending_bytes": 5, "oldest_pending_unix_ms": 1_000, "new_one": "x"}
    script.append(json.dumps({"ok": True, "status": figures}).encode() + b"\n")
    st = standby.status(state_dir=d)
    assert requests == [{"op": "status"}]
    assert (st.epoch, st.pending_bytes, st.connected) == (2, 5, None)
    assert st.extra == {"new_one": "x"}
    assert st.rpo_seconds(now=3.5) == 2.5
    assert standby.Status().rpo_seconds() == 0.0


def test_status_refused(scripted_agent):
    d, script, _ = scripted_agent
    script.append(b'{"ok":false,"error":"nope"}\n')
    with pytest.raises(standby.StandbyError, match="status failed: nope"):
        standby.status(state_dir=d)


def test_a_silent_agent_times_the_flush_out(scripted_agent, monkeypatch):
    """An agent that takes the request but never answers: the client gives up after the
    timeout plus its grace, as a FlushTimeout."""
    d, script, _ = scripted_agent
    monkeypatch.setattr(standby, "_ANSWER_GRACE_S", 0.2)
    release = threading.Event()
    script.append(release)
    try:
        with pytest.raises(standby.FlushTimeout, match="did not answer"):
            standby.flush(timeout=0.1, state_dir=d)
    finally:
        release.set()


def test_a_failed_flush_in_a_callback_warns_or_raises(stand_in_libraries, tmp_path, caplog):
    from standby.huggingface import StandbyCallback

    args = type("Args", (), {})()
    state = type("State", (), {"is_world_process_zero": True})()
    lenient = StandbyCallback(timeout=1, state_dir=tmp_path)  # no agent there
    lenient.on_save(args, state, None)
    assert "not yet safe on the CPU standby" in caplog.text
    with pytest.raises(standby.AgentUnreachable):
        StandbyCallback(timeout=1, state_dir=tmp_path, strict=True).on_save(args, state, None)


def test_callbacks_say_which_library_they_need(monkeypatch):
    for module, library, name in [
        ("standby.lightning", "lightning", "lightning.pytorch.callbacks"),
        ("standby.huggingface", "transformers", "transformers"),
    ]:
        monkeypatch.delitem(sys.modules, module, raising=False)
        # None in sys.modules makes an import of that name fail, as if it were not installed.
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, "pytorch_lightning.callbacks", None)
        with pytest.raises(ImportError, match=f"pip install {library}"):
            __import__(module)
