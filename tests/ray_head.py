"""A real `ray start --head` for tests, isolated from every other Ray on the machine.

RAY_TMPDIR points Ray's temp root (sessions, sockets, the `ray_current_cluster` bootstrap file that a bare
`ray.init()` looks for) at a private folder, the ports are picked free, and teardown kills only the
processes whose command line names that folder: never a bare `ray stop`, which would kill other people's
clusters on a shared machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    address: str
    temp_root: str  # RAY_TMPDIR: a process given this env finds this head's bootstrap file

    def env(self, **extra: str) -> dict[str, str]:
        return {**_base_env(self.temp_root), **extra}


def _base_env(root: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray 2.60 turns token auth on for `ray start` when ~/.ray/auth_token exists, and a client then needs
    # RAY_AUTH_MODE=token too: pin one mode for the head and every process the test starts against it.
    return {**env, "RAY_TMPDIR": root, "RAY_AUTH_MODE": "disabled"}


def _processes_under(root: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and any(root in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_head(root: str) -> None:
    """Kill this head's processes (and their workers), found by the private temp folder they all name."""
    procs = _processes_under(root)
    children = [c for p in procs for c in _safe_children(p)]
    for proc in procs + children:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs + children, timeout=10)


def _safe_children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@contextmanager
def ray_head(num_cpus: int = 4):
    # Short path: Ray's unix sockets live below it and a socket path is limited to 107 characters.
    root = tempfile.mkdtemp(prefix="sdhead-", dir="/tmp")
    port = free_port()
    env = _base_env(root)
    try:
        subprocess.run(["ray", "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                        "--include-dashboard=false", "--disable-usage-stats",
                        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                        f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                        f"--metrics-export-port={free_port()}"],
                       env=env, check=True, capture_output=True, text=True, timeout=120)
        bootstrap = os.path.join(root, "ray", "ray_current_cluster")
        deadline = time.monotonic() + 30
        while not os.path.exists(bootstrap) and time.monotonic() < deadline:
            time.sleep(0.1)
        with open(bootstrap) as f:
            address = f.read().strip()
        yield RayHead(address=address, temp_root=root)
    finally:
        stop_head(root)
        shutil.rmtree(root, ignore_errors=True)
