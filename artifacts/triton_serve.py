"""`python -m artifacts.triton serve REPO`: run the bundled tritonserver until it exits or is asked to stop, and leave
nothing of it behind.

What it does: :func:`serve` validates the repository, starts the command line of :func:`bundled_server` in a session
of its own (a terminal's Ctrl-C reaches only this process), forwards one SIGTERM on SIGINT, SIGTERM or SIGHUP, kills
the server's whole process group on a second signal or when the stop takes longer than the server's exit timeout
plus :data:`STOP_GRACE_S`, and reaps what is left (child subreaper for the orphaned python backend stubs; PDEATHSIG
so the server dies with a SIGKILLed serve process). Linux only (prctl, /proc).

What it does not do: restart a server that exits by itself, build its command line (artifacts/triton_launch.py) or
parse command lines (artifacts/triton.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from artifacts.triton_check import validate_repository
from artifacts.triton_launch import SERVER_EXIT_TIMEOUT_S, bundled_server

STOP_GRACE_S = 5  # beyond the server's exit timeout, before the server's whole process group is killed
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _die_with(parent: int):
    """preexec_fn for the server: SIGKILL when the serve process dies without cleaning up (it was SIGKILLed)."""
    import signal

    def run():
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl: nobody will stop us
            os._exit(1)

    return run


def _group_pids(pgid: int) -> list[int]:
    """Pids of every process (zombies included) in process group `pgid`, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[2]) == pgid:  # fields after "(comm)": state ppid pgrp
            pids.append(int(entry))
    return pids


def _exited(pid: int) -> bool:
    """Has child `pid` exited? Does not reap it, so its pid (= the group id) cannot be reused meanwhile."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGKILL what is left of the server's process group (its python backend stubs, the server if still running),
    reap the server and the stubs this process adopted (child subreaper), and wait until the group is empty."""
    import signal
    import time

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + timeout
    while (left := _group_pids(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.waitpid(pid, os.WNOHANG)  # an adopted stub's zombie is ours to reap
            except ChildProcessError:
                pass  # not our child (its own parent or init reaps it)
        time.sleep(0.05)
    if left:
        print(f"warning: processes {left} of tritonserver's group {proc.pid} are still there", file=sys.stderr)


def serve(repo: str | Path, grpc_port: int = 8001, http_port: int = 8000, metrics_port: int = 8002,
          models: list[str] | None = None, python_env: str | Path | None = None) -> int:
    """Run the bundled tritonserver on `repo` until it exits or this process is asked to stop (`models`,
    `python_env`: see :func:`bundled_server`).

    The server runs in its own session (a terminal's Ctrl-C reaches only this process, never tritonserver or its
    python backend stubs directly). SIGINT, SIGTERM or SIGHUP forwards one SIGTERM to the server and waits up to
    its exit timeout plus STOP_GRACE_S; a second signal, or the time running out, kills the server's whole process
    group. Whatever ended the server, nothing of its process group is left when this returns (stubs orphaned by
    the server are adopted and reaped: child subreaper). A server that exits by itself is never restarted.

    Returns 0 after a requested stop (with a warning when the server could not finish it cleanly: Triton waits up to
    its exit timeout for in-flight requests and for clients' open HTTP keep-alive connections and gRPC streams, and
    never exits while a gRPC stream stays open), 130 when the stop came before the server was started, and otherwise
    the server's own exit status (128 + N when a signal N it did not get from us ended it)."""
    import signal
    import time

    requests: list[int] = []

    def on_signal(signum, _frame):
        requests.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        validate_repository(repo)
        with tempfile.TemporaryDirectory(prefix="llm-export-tritonserver-") as work:
            argv, env = bundled_server(repo, work, grpc_port, http_port, metrics_port, models or None,
                                       python_env=python_env)
            print(f"PATH={env['PATH'].split(os.pathsep)[0]}:... LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']} "
                  + " ".join(argv), file=sys.stderr)
            if requests:
                return 130
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
            proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with(os.getpid()))
            forced, deadline, seen = False, None, 0
            try:
                while not _exited(proc.pid):
                    if requests and deadline is None:
                        print(f"stopping tritonserver (pid {proc.pid}; a second Ctrl-C kills it now)",
                              file=sys.stderr)
                        os.kill(proc.pid, signal.SIGTERM)  # not send_signal: it may reap the server
                        deadline, seen = time.monotonic() + SERVER_EXIT_TIMEOUT_S + STOP_GRACE_S, len(requests)
                    elif deadline is not None and (len(requests) > seen or time.monotonic() > deadline):
                        forced = True
                        break
                    time.sleep(0.05)
            finally:
                _kill_group(proc)
                _prctl(_PR_SET_CHILD_SUBREAPER, 0)
            if not requests:
                return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
            if not forced and proc.returncode in (0, -signal.SIGTERM):  # -SIGTERM: stopped while starting up
                print("tritonserver stopped", file=sys.stderr)
                return 0
            if forced:
                how = "was killed on a second signal" if len(requests) > seen else \
                    f"was killed, not gone {SERVER_EXIT_TIMEOUT_S + STOP_GRACE_S} s after the stop request"
            else:
                how = f"gave up after its {SERVER_EXIT_TIMEOUT_S} s exit timeout (exit {proc.returncode})"
            print(f"warning: tritonserver {how}: it waits for in-flight requests, model unloads, clients' open HTTP "
                  "keep-alive connections and gRPC streams, and whatever was still open was cut. It and its python "
                  "backend stubs are gone.", file=sys.stderr)
            return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

