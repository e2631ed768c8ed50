"""Stopping `python -m artifacts.triton serve`: exit 0, within a bound, and no process of the run left behind.

Each test starts the real command (the tritonserver bundled with nvidia-pytriton, the python backend stub, a
repository made from a tiny artifact: the fixtures of tests/triton_helpers.py) as a subprocess in its own session,
waits until the HTTP endpoint says the server and the model are ready, records every process of the run (the
wrapper's descendants, by pid and start time, and their process groups) from /proc, stops it the way a user or a
supervisor would, and then checks /proc again:

- Ctrl-C in a terminal (SIGINT to the whole foreground process group), three times: the bug was intermittent;
- SIGTERM to the serve process alone (systemd, docker stop) while a client holds an HTTP keep-alive connection
  (Triton waits for it until its exit timeout and exits 1: the original "Exit timeout expired" failure);
- Ctrl-C while a client holds a gRPC stream open (Triton never exits by itself then: the server is killed after
  its exit timeout plus a grace period);
- SIGKILL of the serve process (no cleanup possible there): the server dies with it (PDEATHSIG) and the stub
  follows.

Not tested: the server's behaviour while generating (tests/test_triton.py streams against it).
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from artifacts.triton_launch import SERVER_EXIT_TIMEOUT_S, free_ports
from artifacts.triton_serve import STOP_GRACE_S
from tests.triton_helpers import NAME, artifact, repo, stub_python  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent


def _procs() -> dict[int, tuple[str, str, int, int, str]]:
    """pid -> (name, state, ppid, pgrp, start time) of every process in /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry)] = (stat[stat.index("(") + 1:stat.rindex(")")], fields[0], int(fields[1]), int(fields[2]),
                           fields[19])
    return out


def _tree(root: int) -> dict[int, tuple]:
    procs, found, grown = _procs(), {root}, True
    while grown:
        grown = False
        for pid, info in procs.items():
            if info[2] in found and pid not in found:
                found.add(pid)
                grown = True
    return {pid: procs[pid] for pid in found if pid in procs}


def _left(run: dict[int, tuple]) -> list[tuple[int, tuple]]:
    """Processes of the recorded run still there (same pid and start time), or anything in one of its groups."""
    groups = {info[3] for info in run.values()}
    return [(pid, info) for pid, info in _procs().items()
            if (pid in run and run[pid][4] == info[4]) or info[3] in groups]


def _ready(port: int) -> bool:
    try:  # urllib closes the connection after each request: it holds nothing open
        for path in ("/v2/health/ready", f"/v2/models/{NAME}/ready"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status != 200:
                    return False
        return True
    except OSError:
        return False


class Served:
    """One `python -m artifacts.triton serve` run, ready, with its processes recorded."""

    def __init__(self, repo_dir: Path, python_env: Path, log: Path):
        self.grpc, self.http, metrics = free_ports(3)
        self.log_path = log
        self.log = open(log, "wb")
        cmd = [sys.executable, "-m", "artifacts.triton", "serve", str(repo_dir), "--grpc-port", str(self.grpc),
               "--http-port", str(self.http), "--metrics-port", str(metrics), "--python-env", str(python_env)]
        # A session of its own, as a shell gives a foreground job: the serve process leads its process group. Its
        # temporary directory goes under the test's (a SIGKILLed serve cannot remove it).
        tmp = log.parent / f"{log.stem}-tmp"
        tmp.mkdir()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "TMPDIR": str(tmp)})
        deadline = time.monotonic() + 60
        while not _ready(self.http):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.cleanup()
                pytest.fail(f"serve not ready (exit {self.proc.returncode}):\n{self.text()[-4000:]}")
            time.sleep(0.2)
        self.run = _tree(self.proc.pid)
        names = sorted(info[0] for info in self.run.values())
        assert "tritonserver" in names and any(n.startswith("triton_python") for n in names), names

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int, group: bool, bound: float) -> tuple[int, float]:
        t0 = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)  # what a terminal does on Ctrl-C
        else:
            os.kill(self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            self.cleanup()
            pytest.fail(f"serve did not exit within {bound} s:\n{self.text()[-4000:]}")
        return rc, time.monotonic() - t0

    def left(self, wait: float = 0.0) -> list:
        deadline = time.monotonic() + wait
        while (left := _left(self.run)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def cleanup(self) -> None:
        for pid, _ in _left(self.run) if hasattr(self, "run") else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture
def serve(repo, stub_python, tmp_path):  # noqa: F811 - pytest fixtures imported above
    runs = []

    def start() -> Served:
        runs.append(Served(repo, stub_python, tmp_path / f"serve-{len(runs)}.log"))
        return runs[-1]

    yield start
    for run in runs:
        run.cleanup()


@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_stops_cleanly(serve, attempt):
    s = serve()
    server = next(pid for pid, info in s.run.items() if info[0] == "tritonserver")
    assert s.run[server][3] != s.run[s.proc.pid][3]  # the server has its own group: Ctrl-C reaches only `serve`
    rc, took = s.stop(signal.SIGINT, group=True, bound=SERVER_EXIT_TIMEOUT_S + STOP_GRACE_S + 10)
    text = s.text()
    assert rc == 0 and "tritonserver stopped" in text and "Traceback" not in text, text[-3000:]
    assert took < SERVER_EXIT_TIMEOUT_S, took  # a clean stop does not wait for any timeout
    assert s.left() == []


def test_sigterm_with_an_http_keepalive_connection(serve):
    s = serve()
    keep = http.client.HTTPConnection("127.0.0.1", s.http, timeout=5)
    keep.request("GET", "/v2/health/ready")
    assert keep.getresponse().read() is not None  # the connection stays open (HTTP/1.1 keep-alive)
    try:
        rc, took = s.stop(signal.SIGTERM, group=False, bound=SERVER_EXIT_TIMEOUT_S + STOP_GRACE_S + 10)
    finally:
        keep.close()
    text = s.text()
    assert rc == 0 and "Traceback" not in text, text[-3000:]
    assert "warning: tritonserver gave up after its" in text, text[-3000:]  # Triton's own exit timeout, said so
    assert s.left() == []


def test_ctrl_c_with_an_open_grpc_stream(serve):
    import tritonclient.grpc as grpcclient

    s = serve()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{s.grpc}")
    client.start_stream(callback=lambda result, error: None)  # held open, as a streaming client does
    try:
        rc, took = s.stop(signal.SIGINT, group=True, bound=SERVER_EXIT_TIMEOUT_S + STOP_GRACE_S + 10)
    finally:
        client.stop_stream()
        client.close()
    text = s.text()
    assert rc == 0 and "Traceback" not in text, text[-3000:]
    assert "warning: tritonserver was killed" in text, text[-3000:]
    assert took < SERVER_EXIT_TIMEOUT_S + STOP_GRACE_S + 10, took  # killed at timeout + grace (15.2 s seen under load)
    assert s.left() == []


def test_sigkill_of_serve_takes_the_server_with_it(serve):
    s = serve()
    rc, _ = s.stop(signal.SIGKILL, group=False, bound=10)
    assert rc == -signal.SIGKILL
    # The server gets SIGKILL at once (PDEATHSIG); the orphaned stub notices and exits by itself. Their zombies are
    # init's to reap now (nothing of ours is left to do it), so only processes still running count.
    deadline = time.monotonic() + 15
    while (running := [(pid, info) for pid, info in s.left() if info[1] != "Z"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running == []
