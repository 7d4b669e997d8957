"""The daemon's control socket (stargz_store.daemon.control): who may talk, what it accepts, its bounds."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from stargz_store.daemon import control
from stargz_store.daemon.control import ControlError, ControlRequestError, ControlServer, ControlUnavailable, call
from tests.fixtures.unprivileged import NOBODY, SYSTEM_PATH
from tests.fixtures.waiting import wait_for

SECRET = "ctl-S3CRET"


class Recorder:
    """Operations that note what reached them."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def operations(self) -> dict:
        def echo(request):
            self.calls.append(dict(request))
            return {"echo": request.get("value")}

        def fail(request):
            self.calls.append(dict(request))
            raise ValueError(f"handler bug with {request.get('value')}")

        def refuse(request):
            raise ControlRequestError("refused: because")

        def wait(request):
            self.entered.set()
            self.release.wait(10)
            return {}

        return {"echo": echo, "fail": fail, "refuse": refuse, "wait": wait}


@pytest.fixture
def server_factory(tmp_path):
    made: list[ControlServer] = []

    def make(recorder: Recorder | None = None, **kwargs) -> ControlServer:
        ops = (recorder or Recorder()).operations()
        server = ControlServer(tmp_path / "root" / control.SOCKET_NAME, ops, **kwargs).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def raw_exchange(path, payload: bytes, *, shut: bool = True, timeout: float = 10.0) -> bytes:
    """Send bytes as they are, read the answer line (a daemon that did not read everything we sent
    resets the connection after its answer: that answer is still read first)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        try:
            sock.sendall(payload)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it stopped reading: its answer is still there to read
        out = b""
        while b"\n" not in out and (piece := sock.recv(65536)):
            out += piece
        return out


def reply_of(raw: bytes) -> dict:
    return json.loads(raw.split(b"\n", 1)[0])


def test_socket_is_private_and_removed_on_close(server_factory, tmp_path):
    (tmp_path / "root").mkdir(mode=0o700)
    stale = tmp_path / "root" / control.SOCKET_NAME
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(stale))  # a socket file left by a daemon that died
    leftover.close()
    server = server_factory()
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    assert call(server.path, "echo", value=1) == {"ok": True, "echo": 1}
    server.close()
    assert not server.path.exists()
    with pytest.raises(ControlUnavailable, match="no stargz-store daemon"):
        call(server.path, "echo")


def test_addresses_accept_the_go_store_form():
    assert control.socket_path("unix:///run/x.sock") == "/run/x.sock"
    assert control.socket_path("/run/x.sock") == "/run/x.sock"
    with pytest.raises(ValueError, match="unix socket"):
        control.socket_path("tcp://127.0.0.1:1")


@pytest.mark.parametrize("payload, error", [
    (b"{not json\n", "request is not valid JSON"),
    (b"[1, 2]\n", "request must be a JSON object"),
    (b'{"value": 1}\n', 'request has no "op"'),
    (b'{"op": "nope"}\n', "unknown operation 'nope'"),
    (b"\n", "empty request"),
    (b"\xff\xfe\n", "request is not valid JSON"),
])
def test_bad_requests_get_one_clear_line(server_factory, payload, error):
    recorder = Recorder()
    server = server_factory(recorder)
    assert reply_of(raw_exchange(server.path, payload)) == {"ok": False, "error": error}
    assert recorder.calls == []
    assert call(server.path, "echo", value="still serving")["echo"] == "still serving"


def test_a_request_may_end_at_eof_without_a_newline(server_factory):
    server = server_factory()
    assert reply_of(raw_exchange(server.path, b'{"op": "echo", "value": 3}')) == {"ok": True, "echo": 3}


def test_an_oversized_request_is_refused_without_reading_it_all(server_factory):
    recorder = Recorder()
    server = server_factory(recorder, max_request=1024)
    huge = json.dumps({"op": "echo", "value": "x" * (4 << 20)}).encode() + b"\n"
    assert reply_of(raw_exchange(server.path, huge, shut=False)) == {"ok": False, "error": "request larger than 1024 bytes"}
    assert recorder.calls == []
    with pytest.raises(ControlError, match="larger than 1024"):
        call(server.path, "echo", value="y" * 2000)


def test_handler_failures_reach_the_client_but_no_secret_reaches_the_log(server_factory, caplog):
    caplog.set_level(logging.DEBUG, logger="stargz_store")
    server = server_factory()
    with pytest.raises(ControlError, match=r"fail: internal error \(ValueError\)") as info:
        call(server.path, "fail", value=SECRET)
    assert SECRET not in str(info.value)
    with pytest.raises(ControlError, match="refused: because"):
        call(server.path, "refuse", value=SECRET)
    assert call(server.path, "echo", value=SECRET)["echo"] == SECRET
    assert "fail" in caplog.text and SECRET not in caplog.text


def test_a_peer_whose_uid_is_not_allowed_is_refused(server_factory):
    recorder = Recorder()
    server = server_factory(recorder, allowed_uids={os.getuid() + 4242})
    with pytest.raises(ControlError, match="permission denied"):
        call(server.path, "echo", value=1)
    assert recorder.calls == []


_NOBODY_CLIENT = r"""
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"op": "echo", "value": "from nobody"}\n')
except BrokenPipeError:  # the daemon refused (and closed) before reading: its answer is still there
    pass
out = b""
while b"\n" not in out:
    piece = s.recv(65536)
    if not piece:
        break
    out += piece
print(json.dumps([os.getuid(), out.decode()]))
"""


@pytest.mark.root
def test_another_user_is_refused_even_when_it_reaches_the_socket():
    """The file mode keeps others out; the peer check holds on its own when the mode does not."""
    if os.geteuid() != 0:
        pytest.fail("needs root to run a client as nobody")
    recorder = Recorder()
    base = Path(tempfile.mkdtemp(prefix="stargz-control-"))  # pytest's tmp_path is not reachable by nobody
    server = ControlServer(base / control.SOCKET_NAME, recorder.operations()).start()
    try:
        os.chmod(base, 0o755)
        os.chmod(server.path, 0o666)  # what the daemon never does
        python = shutil.which("python3", path=SYSTEM_PATH)
        result = subprocess.run([python, "-I", "-c", _NOBODY_CLIENT, str(server.path)], capture_output=True,
                                text=True, timeout=60, cwd="/", env={"PATH": SYSTEM_PATH}, user=NOBODY.pw_uid,
                                group=NOBODY.pw_gid, extra_groups=[])
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    uid, raw = json.loads(result.stdout)
    assert uid == NOBODY.pw_uid
    assert json.loads(raw) == {"ok": False, "error": "permission denied"}
    assert recorder.calls == []


def test_a_silent_client_is_dropped_and_does_not_hold_up_others(server_factory):
    server = server_factory(io_timeout=0.5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.settimeout(10)
        silent.connect(str(server.path))
        assert call(server.path, "echo", value="meanwhile")["echo"] == "meanwhile"
        assert silent.recv(100) == b"", "the daemon closes a connection that sent nothing in time"


def test_connections_beyond_the_limit_are_told_busy(server_factory):
    recorder = Recorder()
    server = server_factory(recorder, max_connections=1)
    waiting = threading.Thread(target=call, args=(server.path, "wait"), daemon=True)
    waiting.start()
    try:
        assert recorder.entered.wait(10), "the first request holds the only slot"
        with pytest.raises(ControlError, match="busy: too many control requests at once"):
            call(server.path, "echo")
    finally:
        recorder.release.set()
        waiting.join(10)
    # The slot is given back just after the first request's answer is sent: the next one gets it
    # then (asked at once, it may still be told busy).
    answers: list[dict] = []

    def echoed() -> bool:
        try:
            answers.append(call(server.path, "echo", value=2))
        except ControlError as e:
            assert "busy" in str(e)
            return False
        return True

    assert wait_for(echoed, timeout=10, interval=0.05) and answers[-1]["echo"] == 2
