"""Launcher that measures one command's own peak RSS: `python bench/spawn.py RESULT.json CMD ...`.

Why it exists: on Linux a process's ru_maxrss starts from the high-water mark of the address space it exec'd
from, so a command started directly by the benchmark (a big process: torch imported, a 1 GiB bandwidth array)
would report at least the benchmark's own peak. This stdlib-only script starts small, spawns the command, waits
for it with os.wait4 and writes {"rc", "wall_s", "peak_rss_bytes", "cpu_s"} of that command alone to RESULT.json. Its
stdout/stderr are the command's.
"""

import json
import os
import sys
import time


def main() -> int:
    result, cmd = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, os.environ)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    with open(result, "w") as f:
        json.dump({"rc": rc, "wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB
                   "cpu_s": usage.ru_utime + usage.ru_stime}, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
