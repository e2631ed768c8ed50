"""A hostile chat template under the real tritonserver: each violating `messages` request gets an error response naming
the bound, and the same model keeps serving chat and text requests (before the bounds, one such request killed the
backend stub for good).

The artifact is the one tests/test_triton.py serves, with a chat_template.jinja added after the build (and the
manifest rewritten so its checksums hold): ChatML, except that a user message "center", "spin" or "double" makes it
ask for a 300 M character string, loop 10**8 times without output, or double a string in a macro per level. The
repository, server, generator and streaming helpers are tests/triton_helpers.py's, fed this module's `artifact`.
The CLI gets the same artifact: `--chat spin` exits 2 with the bound's name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from artifacts.bundle import open_artifact, write_manifest
from export.tiny import CHATML_TEMPLATE
from tests.triton_helpers import (CASE, GREEDY, expected_deltas, generator, repo, server,  # noqa: F401 - fixtures
                                  stream, stub_python)

HOSTILE_TEMPLATE = (
    "{%- macro double(s, n) %}{% if n %}{{ double(s ~ s, n - 1) }}{% else %}{{ s }}{% endif %}{% endmacro %}"
    "{%- for m in messages %}"
    "{%- if m.content == 'center' %}{{ 'x'|center(300000000) }}"
    "{%- elif m.content == 'spin' %}{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
    "{%- elif m.content == 'double' %}{{ double('x', 64) }}"
    "{%- endif %}{%- endfor %}" + CHATML_TEMPLATE
)
VIOLATIONS = {"center": "MAX_VALUE_SIZE", "spin": "MAX_RENDER_SECONDS", "double": "MAX_VALUE_SIZE"}


@pytest.fixture(scope="module")
def artifact(artifacts, tmp_path_factory):
    """test_triton's artifact with HOSTILE_TEMPLATE as its chat_template.jinja (checksums rewritten)."""
    out = tmp_path_factory.mktemp("hostile") / "artifact"
    shutil.copytree(artifacts(CASE), out)
    (out / "chat_template.jinja").write_text(HOSTILE_TEMPLATE, encoding="utf-8")
    manifest = json.loads((out / "manifest.json").read_text())
    write_manifest(out, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    open_artifact(out)  # every checksum holds
    return out


def _chat(content: str) -> dict:
    return {"messages": json.dumps([{"role": "user", "content": content}]), "max_tokens": 8, "ignore_eos": True}


def test_template_violation_is_an_error_and_the_model_keeps_serving(server, generator):  # noqa: F811
    normal = {**_chat("Hello world"), "temperature": 0.9, "seed": 5}
    assert "Hello world" in generator.decode(generator.encode_chat([{"role": "user", "content": "Hello world"}]))
    for trigger, bound in VIOLATIONS.items():
        t0 = time.monotonic()
        deltas, error = stream(server, _chat(trigger))
        assert error is not None and deltas == [], trigger
        assert f"chat template exceeded {bound} = " in str(error), str(error)
        assert time.monotonic() - t0 < 15
        # the same server, right after: chat through the same template, and plain text, both stream as runtime_py does
        deltas, error = stream(server, normal)
        assert error is None and deltas == expected_deltas(generator, normal) and deltas
        deltas, error = stream(server, GREEDY)
        assert error is None and deltas == expected_deltas(generator, GREEDY) and len(deltas) > 1


def test_text_streams_while_a_template_spins(server, generator):  # noqa: F811
    """A render burning its CPU budget on one worker thread does not stop a generation on another."""
    spin: dict = {}
    worker = threading.Thread(target=lambda: spin.update(result=stream(server, _chat("spin"))))
    worker.start()
    deltas, error = stream(server, GREEDY)
    worker.join(timeout=60)
    assert error is None and deltas == expected_deltas(generator, GREEDY)
    spin_deltas, spin_error = spin["result"]
    assert spin_deltas == [] and "MAX_RENDER_SECONDS" in str(spin_error)


def test_cli_chat_with_the_hostile_template_exits_2(artifact):
    for trigger, bound in VIOLATIONS.items():
        done = subprocess.run([sys.executable, "-m", "runtime_py", "generate", str(artifact), "--chat", trigger,
                               "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONUTF8": "1"})
        assert done.returncode == 2, done.stderr
        assert f"error: chat template exceeded {bound} = " in done.stderr and "Traceback" not in done.stderr, \
            done.stderr
