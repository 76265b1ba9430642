"""The control socket of a running daemon, used as a client would."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.control import ControlClient, socket_path


@pytest.fixture
def daemon(env):
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if '"service.started"' in line:
            break
    else:
        process.kill()
        raise AssertionError("daemon did not start")
    yield process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


def client(env) -> ControlClient:
    return ControlClient(socket_path(Path(env["A3X_HOME"])))


def raw(env, data: bytes) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(socket_path(Path(env["A3X_HOME"]))))
    sock.sendall(data)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    sock.close()
    return json.loads(reply)


def test_socket_only_for_owner(env, daemon):
    path = socket_path(Path(env["A3X_HOME"]))
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600
    assert stat.S_ISSOCK(path.stat().st_mode)


def test_cycle_request_starts_and_waits(env, daemon):
    replies = list(client(env).request({"command": "cycle", "domain": "arithmetic", "wait": True}))
    assert replies[0] == {"ok": True, "cycle": 1, "state": "started"}
    assert replies[1]["state"] == "finished"
    assert replies[1]["outcome"] == "ok"
    assert replies[1]["summary"].startswith("2/2 answered")


def test_cli_cycle_goes_through_daemon(env, daemon):
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "cycle", "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "cycle 1 started by the daemon"
    assert result.stdout.splitlines()[1].startswith("cycle 1: ok, 5/5 answered")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"not json\n", "request is not valid JSON"),
        (b'{"command": "explode"}\n', "unknown command 'explode'"),
        (b"[1, 2]\n", "request must be a JSON object"),
        (b'{"command": "cycle", "tasks": ["nope"]}\n', "unknown task id(s) nope"),
        (b'{"command": "cycle", "tasks": "geo-italy"}\n', "'tasks' must be a list"),
        (b"\xff\xfe\n", "request is not valid JSON"),
        (b"x" * (10 * 1024 * 1024) + b"\n", "request longer than 65536 bytes"),
    ],
)
def test_bad_request_answered(env, daemon, data, expected):
    reply = raw(env, data)
    assert reply["ok"] is False
    assert expected in reply["error"]
    status = next(client(env).request({"command": "status"}))
    assert status["ok"] is True  # the daemon still answers


def test_second_cycle_while_running_refused(env, daemon, tmp_path):
    slow = tmp_path / "slow.toml"
    slow.write_text(
        "schema_version = 1\n[domains.geo]\n"
        + "".join(
            f'[[tasks]]\nid = "t{i}"\ndomain = "geo"\nprompt = "the capital is"\n'
            f"[tasks.sampling]\nmax_tokens = 400\ntemperature = 0.0\n"
            for i in range(40)
        )
    )
    # Reload the daemon onto a book that takes a few seconds per cycle.
    (Path(env["A3X_CONFIG"])).write_text(f'[tasks]\nbooks = ["{slow}"]\n')
    next(client(env).request({"command": "reload"}))
    time.sleep(1.0)
    first = next(client(env).request({"command": "cycle"}))
    second = next(client(env).request({"command": "cycle"}))
    assert first["ok"] is True
    assert second == {
        "ok": False,
        "error": f"a cycle is already running (cycle {first['cycle']})",
        "busy": True,
    }
    status = next(client(env).request({"command": "status"}))
    assert status["running_cycle"] == first["cycle"]


def test_pause_and_resume(env, daemon):
    assert next(client(env).request({"command": "pause"})) == {"ok": True, "paused": True}
    status = next(client(env).request({"command": "status"}))
    assert status["paused"] is True
    assert next(client(env).request({"command": "resume"})) == {"ok": True, "paused": False}


def test_second_daemon_refused(env, daemon):
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "another a3x daemon is listening on" in result.stderr


def test_control_commands_without_daemon(env):
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "pause"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no a3x daemon runs for home" in result.stderr
