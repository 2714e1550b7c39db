"""Helpers of the web tests: a run directory of tiny models, signed-in clients, a real server process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def make_run(root: Path, tiny_path: str) -> Path:
    """A run directory like the pipeline's, every version the tiny random model: base, sft, ppo1."""
    run = root / "run"
    for d in ("sft", "round1/ppo"):
        (run / d).mkdir(parents=True, exist_ok=True)
        if not (run / d / "model").exists():
            (run / d / "model").symlink_to(tiny_path)
    (run / "pipeline.json").write_text(json.dumps({"model": tiny_path}))
    return run


def csrf_of(client) -> str:
    """The double-submit CSRF token: any page sets the cookie."""
    if "rlhf_csrf" not in client.cookies:
        client.get("/login")
    return client.cookies["rlhf_csrf"]


def sign_in(client, name: str, password: str = "password123") -> None:
    r = client.post(
        "/login", data={"name": name, "password": password, "csrf_token": csrf_of(client)}, follow_redirects=False
    )
    assert r.status_code == 303, r.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``rlhfkit serve`` in a child process on a free loopback port."""

    def __init__(self, run: Path, *args: str, port: int | None = None):
        self.run, self.args = run, list(args)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> Server:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(self.run / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rlhfkit.cli",
                "serve",
                "--run",
                str(self.run),
                "--port",
                str(self.port),
                "--precision",
                "fp32",
                *self.args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.run / f'server-{self.port}.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start in time")

    def kill(self) -> None:
        """SIGKILL: the harshest restart (no shutdown handlers run)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
