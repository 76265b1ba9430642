"""The control socket of a running `a3x run`: a Unix socket that only its user can open.

Protocol: the client sends one JSON object on one line; the server answers
with one JSON line, or two for a cycle with `"wait": true` (the start, then
the result). Every reply has `"ok"`; a failed request has `"error"` with a
sentence saying what was wrong. Requests:

    {"command": "cycle", "tasks": ["id", ...], "domain": "d", "retrain": ["d"], "wait": false}
    {"command": "status"}
    {"command": "pause"}      pause the schedule (a running cycle finishes)
    {"command": "resume"}
    {"command": "reload"}     re-read the configuration and task books

A malformed, unknown or oversized request gets an error reply; the server
never stops for one.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
MAX_DISCARD_BYTES = 64 * 1024 * 1024  # an oversized line is read and dropped up to this size
CLIENT_TIMEOUT_SECONDS = 10.0
COMMANDS = ("cycle", "status", "pause", "resume", "reload")
REQUEST_KEYS = {command: {"command"} for command in COMMANDS}
REQUEST_KEYS["cycle"] = {"command", "tasks", "domain", "retrain", "wait"}
Handler = Callable[[dict[str, Any], Callable[[dict[str, Any]], None]], None]


class ControlError(Exception):
    """The control socket cannot be created, reached or understood."""


def socket_path(home: Path) -> Path:
    """`$XDG_RUNTIME_DIR/a3x-<hash of home>.sock`, or `<home>/control.sock` without one."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
        return Path(runtime) / f"a3x-{digest}.sock"
    return home / "control.sock"


class ControlServer:
    """Accepts connections in a background thread and passes each request to `handler`.

    The handler gets the request and a `reply` function it may call more than
    once (a cycle with wait sends two replies), from any thread.
    """

    def __init__(self, path: Path, handler: Handler):
        self.path = path
        self.handler = handler
        self._socket = self._bind(path)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._closing = False

    @staticmethod
    def _bind(path: Path) -> socket.socket:
        if path.exists():
            if _answers(path):
                raise ControlError(
                    f"another a3x daemon is listening on {path}; stop it first (a3x run "
                    "refuses to start twice on one home)"
                )
            path.unlink()  # left by a daemon that was killed
        if len(str(path).encode()) > 107:
            raise ControlError(
                f"socket path {path} is longer than the 107 bytes Unix allows; "
                "use a shorter A3X_HOME or set XDG_RUNTIME_DIR"
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            sock.bind(str(path))
        except OSError as error:
            sock.close()
            raise ControlError(
                f"cannot create the control socket {path} ({error.strerror}); make its folder "
                "writable, or set XDG_RUNTIME_DIR to a writable folder"
            ) from error
        finally:
            os.umask(old_umask)
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        sock.listen(8)
        return sock

    def start(self) -> None:
        self._thread.start()
        log.info("control.listening", path=str(self.path))

    def close(self) -> None:
        self._closing = True
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()
        self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        while not self._closing:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return  # closed
            threading.Thread(
                target=self._handle, args=(connection,), daemon=True, name="control-client"
            ).start()

    def _handle(self, connection: socket.socket) -> None:
        lock = threading.Lock()

        def reply(message: dict[str, Any]) -> None:
            data = (json.dumps(message) + "\n").encode()
            with lock:
                try:
                    connection.sendall(data)
                except OSError as error:
                    log.warning("control.reply_failed", error=str(error))

        try:
            connection.settimeout(CLIENT_TIMEOUT_SECONDS)
            request, problem = _read_request(connection)
            if request is None and problem is None:
                return  # a connection closed without a request: `available()` probing
            if problem is not None:
                log.warning("control.bad_request", problem=problem)
                reply({"ok": False, "error": problem})
                return
            assert request is not None
            self.handler(request, reply)
        except Exception as error:  # one client never takes the server down
            log.exception("control.request_failed")
            reply({"ok": False, "error": f"internal error: {type(error).__name__}: {error}"})
        finally:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()


def _read_request(connection: socket.socket) -> tuple[dict[str, Any] | None, str | None]:
    """Read one line; return (request, None) or (None, the reason it was rejected)."""
    buffer = b""
    while b"\n" not in buffer:
        try:
            chunk = connection.recv(65536)
        except TimeoutError:
            return None, f"no complete request line within {CLIENT_TIMEOUT_SECONDS:g} s"
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > MAX_REQUEST_BYTES:
            _discard_line(connection, buffer)
            return None, (
                f"request longer than {MAX_REQUEST_BYTES} bytes; a request is one short JSON line"
            )
    if not buffer:
        return None, None
    line = buffer.split(b"\n", 1)[0]
    try:
        request = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"request is not valid JSON ({error}); send one JSON object per line"
    if not isinstance(request, dict):
        return None, 'request must be a JSON object such as {"command": "status"}'
    command = request.get("command")
    if command not in COMMANDS:
        return None, f"unknown command {command!r}; commands: {', '.join(COMMANDS)}"
    unknown = set(request) - REQUEST_KEYS[command]
    if unknown:
        valid = ", ".join(sorted(REQUEST_KEYS[command]))
        return None, f"unknown key(s) {', '.join(sorted(unknown))} for {command}; valid: {valid}"
    return request, None


def _discard_line(connection: socket.socket, buffer: bytes) -> None:
    """Read and drop the rest of an oversized line, so that the client, still sending,
    can read the error reply. Gives up after MAX_DISCARD_BYTES or the timeout."""
    discarded = len(buffer)
    while b"\n" not in buffer and discarded < MAX_DISCARD_BYTES:
        try:
            buffer = connection.recv(1 << 20)
        except OSError:
            return
        if not buffer:
            return
        discarded += len(buffer)


def _answers(path: Path) -> bool:
    """Return whether a live server accepts connections at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class ControlClient:
    def __init__(self, path: Path, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout

    def available(self) -> bool:
        return self.path.exists() and _answers(self.path)

    def request(self, message: dict[str, Any], timeout: float | None = None) -> Iterator[dict]:
        """Send one request and yield each reply line as it arrives."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout or self.timeout)
        try:
            sock.connect(str(self.path))
            sock.sendall((json.dumps(message) + "\n").encode())
            buffer = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    yield json.loads(line)
        except (OSError, json.JSONDecodeError) as error:
            raise ControlError(f"control socket {self.path}: {error}") from error
        finally:
            sock.close()
