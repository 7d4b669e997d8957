"""`stargz-store-helper` / `stargz-store auth-helper`, run as containers/image runs it: a program, JSON on stdin."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stargz_store.daemon import control
from stargz_store.daemon.control import ControlRequestError, ControlServer
from tests.fixtures.store import REPO_ROOT

SECRET = "helper-S3CRET"
DOC = {"127.0.0.1:5000/private/app:v1": {"username": "alice", "password": SECRET}}


def helper_program() -> str:
    """The console script pip installed next to the interpreter running the tests."""
    path = Path(sys.executable).parent / "stargz-store-helper"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make deps` (setup.cfg installs the console script)")
    return str(path)


def run_helper(argv: list[str], stdin: bytes, *, program: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([*(program or [helper_program()]), *argv], input=stdin, capture_output=True, timeout=60,
                          env=env, cwd="/")


@pytest.fixture
def daemon_socket(tmp_path):
    """A control server with a recording `add-credentials`, at `<tmp>/root/store.sock`."""
    received: list[dict] = []

    def add_credentials(request):
        if request["credentials"] == {"refuse/me:now": {}}:
            raise ControlRequestError("invalid image reference in credentials: refused for the test")
        received.append(request["credentials"])
        return {"references": len(request["credentials"])}

    server = ControlServer(tmp_path / "root" / control.SOCKET_NAME, {"add-credentials": add_credentials}).start()
    server.received = received
    yield server
    server.close()


@pytest.mark.parametrize("form", ["positional", "addr", "addr-unix", "root", "subcommand"])
def test_the_helper_hands_stdin_to_the_daemon(daemon_socket, form):
    path = str(daemon_socket.path)
    argv = {"positional": [path], "addr": ["--addr", path], "addr-unix": ["-addr", f"unix://{path}"],
            "root": ["--root", str(daemon_socket.path.parent)], "subcommand": ["--addr", path]}[form]
    program = [sys.executable, "-m", "stargz_store.cli", "auth-helper"] if form == "subcommand" else None
    result = run_helper(argv, json.dumps(DOC).encode(), program=program)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert daemon_socket.received == [DOC]


def test_no_daemon_is_one_line_and_exit_1(tmp_path):
    result = run_helper(["--addr", str(tmp_path / "nothing.sock")], json.dumps(DOC).encode())
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "no stargz-store daemon at" in lines[0] and "credentials not passed" in lines[0]
    assert SECRET.encode() not in result.stderr + result.stdout


def test_messages_name_the_command_as_it_was_called(tmp_path):
    missing = ["--addr", str(tmp_path / "nothing.sock")]
    assert run_helper(missing, b"{}").stderr.startswith(b"stargz-store-helper: no stargz-store daemon")
    sub = run_helper(missing, b"{}", program=[sys.executable, "-m", "stargz_store.cli", "auth-helper"])
    assert sub.returncode == 1 and sub.stderr.startswith(b"stargz-store auth-helper: no stargz-store daemon")


def test_a_daemon_that_never_answers_is_given_up_on(tmp_path):
    """A listening socket nobody accepts on: the helper waits --timeout, then exits 1 (the pull goes on)."""
    path = tmp_path / "stuck.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.bind(str(path))
        stuck.listen(8)
        result = run_helper(["--timeout", "0.5", str(path)], json.dumps(DOC).encode())
    assert result.returncode == 1
    assert b"did not answer within 0.5 s" in result.stderr


@pytest.mark.parametrize("stdin, message", [
    (b"", b"nothing on stdin"),
    (b"{" + SECRET.encode(), b"stdin is not valid JSON"),
    (b'["' + SECRET.encode() + b'"]', b"stdin must be a JSON object"),
    (b'{"a/b:c": "' + b"x" * 60_000 + b'"}', b"more than 49152 bytes on stdin"),
])
def test_bad_input_is_exit_2_and_never_echoed(daemon_socket, stdin, message):
    result = run_helper([str(daemon_socket.path)], stdin)
    assert result.returncode == 2 and message in result.stderr
    assert SECRET.encode() not in result.stderr and daemon_socket.received == []


def test_a_refusal_by_the_daemon_is_exit_1_with_its_reason(daemon_socket):
    result = run_helper([str(daemon_socket.path)], b'{"refuse/me:now": {}}')
    assert result.returncode == 1
    assert result.stderr.decode().strip() == ("stargz-store-helper: the daemon refused the credentials: "
                                              "invalid image reference in credentials: refused for the test")


def test_usage_errors(daemon_socket):
    result = run_helper(["--addr", "x.sock", "--root", "/r"], b"{}")
    assert result.returncode == 2 and b"not allowed with argument" in result.stderr
    result = run_helper(["--addr", "tcp://127.0.0.1:1"], b"{}")
    assert result.returncode == 2 and b"unsupported control address" in result.stderr


def test_the_helper_loads_nothing_but_the_standard_library_and_the_control_client():
    """containers/image runs it on every pull: importing the daemon or the registry client would cost
    a large part of a second each time."""
    code = ("import sys; import stargz_store.daemon.auth_helper; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('stargz_store', 'requests', 'urllib3', "
            "'msgspec', 'zstandard', 'isal')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}).stdout
    assert json.loads(out.replace("'", '"')) == ["stargz_store", "stargz_store.daemon", "stargz_store.daemon.auth_helper",
                                                 "stargz_store.daemon.control"]


def test_the_default_socket_is_the_daemons():
    from stargz_store.daemon.cli import DEFAULT_ROOT

    assert control.DEFAULT_ROOT == DEFAULT_ROOT
    assert control.DEFAULT_SOCKET == "/var/lib/stargz-store/store.sock"  # the Go store's default address too
