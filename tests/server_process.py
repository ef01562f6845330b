"""A real `launch_server` process on a free loopback port, for the tests that need one."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

START_TIMEOUT_S = 180


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(server: ServerProcess) -> None:
    """Poll /health until 200; pytest.fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited at start-up:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the server was not healthy after {START_TIMEOUT_S} s:\n{server.log.read_text()}")


@contextmanager
def launched(
    model: str, flags: list[str], show_log: Callable[[], bool] = lambda: False
) -> Iterator[ServerProcess]:
    """`python -m sageserve.launch_server --model-path model *flags`, healthy, then stopped.

    show_log: asked on exit whether to print the server's log (e.g. when tests failed).
    """
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="sageserve-server-", suffix=".log")[1])
    command = [
        *(sys.executable, "-m", "sageserve.launch_server", "--model-path", model),
        *("--port", str(port), *flags),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_healthy(server)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)
        if show_log():
            print(f"--- server log ({model} {' '.join(flags)}) ---\n{log.read_text()}")
