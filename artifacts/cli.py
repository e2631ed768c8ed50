"""What every command line of this project does as a process, around its ``main()``: the shell's conventions.

What it does: :func:`run` calls ``main()`` and exits with its status, and turns the process-level failures no
``main`` can sensibly catch into what a shell user expects: standard output closed under it (``| head``, ``| true``)
ends quietly with 141 (128 + SIGPIPE, what a tool killed by the signal reports) instead of a BrokenPipeError
traceback and Python's "Exception ignored" at exit; standard output that cannot be written (a full disk,
``> /dev/full``) is one ``error:`` line and exit 2; Ctrl-C is 130. :func:`quiet_startup` (called first thing when
the module runs as ``__main__``, never on import) makes a Ctrl-C during the imports and argument parsing, before
``main`` has started anything, end the process at once with 130 and no traceback; ``main`` calls
:func:`restore_interrupts` where its own handling begins, after importing the pybind11 extensions its command
needs (onnxruntime, onnx): a KeyboardInterrupt raised inside their init is reported by the extension itself, a
printed traceback and "ImportError: import numpy failed", or an ImportError "initialization failed" caused by it
(CI, 0.3 s into `runtime_py generate`). :func:`run` takes the latter for a Ctrl-C (130) wherever it comes from.

What it does not do: the commands' own errors (each ``main`` prints those), or signals other than SIGINT and SIGPIPE
(export/build.py's terminate_cleanly handles SIGTERM during a build), or a Ctrl-C during the interpreter's own
startup (site, runpy: the first tens of milliseconds, before the command's first line runs), which Python reports.
"""

from __future__ import annotations

import errno
import os
import signal
import sys


def _exit_130(signum, frame) -> None:
    os._exit(130)  # startup: nothing to clean up yet


def quiet_startup() -> None:
    """Until restore_interrupts(): Ctrl-C ends the process with 130, no traceback (the imports take seconds)."""
    signal.signal(signal.SIGINT, _exit_130)


def restore_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt again (main's handlers say what was left and exit 130)."""
    if signal.getsignal(signal.SIGINT) is _exit_130:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _drop_stdout() -> None:
    """Point standard output at /dev/null, so the flush at exit does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run(main) -> None:  # no typing import here: this module is the first thing a command runs
    """sys.exit(main()) (``main() -> int``, the exit status), with standard output's failures and Ctrl-C handled
    as the module docstring says."""
    try:
        code = main()
        sys.stdout.flush()
    except KeyboardInterrupt:
        code = 130
    except ImportError as e:
        if not isinstance(e.__cause__, KeyboardInterrupt):
            raise
        code = 130  # a Ctrl-C inside an extension's init, as pybind11 re-raises it
    except BrokenPipeError:
        _drop_stdout()
        code = 141
    except OSError as e:  # writing standard output failed (a full disk): said once; other OSErrors are main's bugs
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO) or e.filename is not None:
            raise
        _drop_stdout()
        print(f"error: cannot write the output ({e.strerror})", file=sys.stderr)
        code = 2
    sys.exit(code)
