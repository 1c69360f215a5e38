"""``vllm serve`` processes for the serve benchmarks: each in its own process
group (stopped whole, and with the driver), ready once ``/health`` answers,
idle once ``/metrics`` shows no request."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from server_metrics import http_get, scrape, total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# run in front of every child: SIGTERM to it when this driver dies (the flag
# survives exec), so a killed driver leaves no server holding the GPU
DIE_WITH_PARENT = ("import ctypes, os, signal, sys; "
                   "ctypes.CDLL(None).prctl(1, int(signal.SIGTERM)); "
                   "os.execvp(sys.argv[1], sys.argv[1:])")


def spawn(cmd: list[str], stdout, **kwargs) -> subprocess.Popen:
    """Start ``cmd`` as the leader of its own process group, so it can be
    stopped whole, with its output (and errors) to ``stdout``."""
    return subprocess.Popen([sys.executable, "-c", DIE_WITH_PARENT, *cmd],
                            stdout=stdout, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            **kwargs)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def _wait_group(proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None and not group_members(proc.pid):
            return True
        time.sleep(0.2)
    return False


def stop_process(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM to the whole group, SIGKILL after ``grace``; returns when no
    process of the group is left (the GPU is free for the next server)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if _wait_group(proc, wait):
            return
    print(f"warning: processes of group {proc.pid} still alive: "
          f"{group_members(proc.pid)}", file=sys.stderr)


def log_tail(path, lines: int = 30) -> str:
    try:
        return "".join(Path(path).read_text(errors="replace")
                       .splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def start_server(cmd: list[str], log_path, port: int,
                 timeout: float = 420.0) -> subprocess.Popen:
    """Start ``vllm serve`` and return once ``/health`` answers; fail with
    its log's tail if it exits or is not ready within ``timeout``."""
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        proc = spawn(cmd, log)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with code {proc.returncode} before it "
                    f"was ready; {log_path} ends:\n{log_tail(log_path)}")
            try:
                http_get(f"http://127.0.0.1:{port}/health", timeout=2)
                return proc
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"vllm serve not ready after {timeout:.0f} s; "
                    f"{log_path} ends:\n{log_tail(log_path)}")
            try:
                proc.wait(0.5)  # returns at once if it exits
            except subprocess.TimeoutExpired:
                pass
    except BaseException:
        stop_process(proc)
        raise


def wait_idle(base_url: str, timeout: float = 60.0) -> None:
    """Until the server has no request left (a cut load's aborts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = scrape(base_url)
        if m and not (total(m, "vllm:num_requests_running") or 0) \
                and not (total(m, "vllm:num_requests_waiting") or 0):
            return
        time.sleep(0.5)
