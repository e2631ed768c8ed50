"""The dependency direction between the packages, and the runtime side running with torch unavailable.

Static (``ast`` over every .py file, imports at module level and inside functions alike, plus
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name): each package imports only the
first-party packages :data:`ALLOWED` lists for it, which is the direction of shared/DESIGN.md section 1:

- ``artifacts`` imports no other first-party package (no runtime_py, export, graphs or plugins): the Triton
  python-backend model, which runs runtime_py, lives in runtime_py/triton_model.py and is copied as a file;
- ``plugins`` imports no other first-party package;
- ``graphs`` imports only ``plugins`` (never runtime_py, export or artifacts);
- ``runtime_py`` imports only ``artifacts`` and ``plugins`` (never export or graphs).

Dynamic (subprocesses in which ``import torch`` raises ModuleNotFoundError, as on an appliance without torch,
installed through a sitecustomize on PYTHONPATH): ``python -m export inspect``, ``python -m export triton`` and
``python -m runtime_py generate|score|chat`` on a tiny ONNX Runtime artifact exit 0 with sane output. Also here: the
one cache root (artifacts.paths.cache_root) and who uses it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("artifacts", "plugins", "graphs", "runtime_py", "export")
ALLOWED = {
    "artifacts": set(),
    "plugins": set(),
    "graphs": {"plugins"},
    "runtime_py": {"artifacts", "plugins"},
}
CASE = "qwen2_window"  # tests/test_triton.py's artifact (static KV, ort lowering): built once per session


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a file, wherever it is (functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                names = [node.args[0].value]
        found += [(node.lineno, n.split(".")[0]) for n in names]
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependency_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    bad = [f"{f.relative_to(ROOT)}:{line} imports {top}" for f in files for line, top in _imported(f)
           if top in FIRST_PARTY and top != package and top not in ALLOWED[package]]
    assert bad == [], f"{package} may import only {sorted(ALLOWED[package]) or 'no other first-party package'}"


def test_the_checker_sees_lazy_and_dynamic_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from runtime_py.generate import Generator\n    import export.build\n"
                 "    importlib.import_module('graphs.fuse')\n    return __import__('plugins')\n")
    assert [top for _, top in _imported(f)] == ["os", "runtime_py", "export", "graphs", "plugins"]


def test_artifacts_modules_load_no_runtime_or_exporter():
    """Importing every artifacts module (the Triton CLI and writer included) loads neither runtime_py nor export."""
    modules = sorted(f"artifacts.{p.stem}" for p in (ROOT / "artifacts").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'runtime_py', 'export', 'graphs', 'torch'}))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_repository_copies_the_runtime_side_only():
    from artifacts.triton_contract import MODEL_SOURCE
    from artifacts.triton_write import runtime_packages

    assert MODEL_SOURCE == ROOT / "runtime_py" / "triton_model.py"
    pkgs = runtime_packages()
    assert {"runtime_py", "artifacts"} <= set(pkgs) and not {"export", "graphs"} & set(pkgs), pkgs


# -- torch unavailable --------------------------------------------------------------------------------------------
NO_TORCH = '''
import sys


class _NoTorch:
    """As if torch were not installed: `import torch` (and torch.*) raises ModuleNotFoundError."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (torch made unavailable by the test)", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
'''


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    """run(*args, stdin=None) -> CompletedProcess of `python *args` in the repository root, torch unavailable."""
    site = tmp_path_factory.mktemp("no-torch")
    (site / "sitecustomize.py").write_text(NO_TORCH)
    path = [str(site), str(ROOT), *[p for p in [os.environ.get("PYTHONPATH")] if p]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUTF8": "1"}

    def run(*args, stdin=None):
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, input=stdin, capture_output=True,
                              text=True, timeout=120)

    return run


@pytest.fixture(scope="module")
def artifact(artifacts):
    return artifacts(CASE)


def test_torch_is_unavailable_there(no_torch):
    done = no_torch("-c", "import torch")
    assert done.returncode != 0 and "torch made unavailable by the test" in done.stderr, done.stderr
    done = no_torch("-c", "import safetensors.torch")
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr


def test_export_inspect_runs_without_torch(no_torch, artifact):
    done = no_torch("-m", "export", "inspect", str(artifact))
    assert done.returncode == 0, done.stderr
    assert "graph decoder:" in done.stdout and "fusion: attention" in done.stdout, done.stdout
    done = no_torch("-m", "export", "inspect", str(artifact), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["layers"] > 0 and sum(report["graphs"]["decoder"]["ops"].values()) > 0
    done = no_torch("-m", "export", "inspect", str(artifact.parent / "missing"))
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr


def test_export_triton_runs_without_torch(no_torch, artifact, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    done = no_torch("-m", "export", "triton", str(artifact), "--out", str(tmp_path / "repo"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str((tmp_path / "repo").resolve())
    assert (tmp_path / "repo" / "llm" / "1" / "model.py").read_bytes() == \
        (ROOT / "runtime_py" / "triton_model.py").read_bytes()


def test_runtime_runs_without_torch(no_torch, artifact):
    done = no_torch("-m", "runtime_py", "generate", str(artifact), "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
                    "--ignore-eos", "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["tokens"]) == 2
    done = no_torch("-m", "runtime_py", "generate", str(artifact), "--prompt-ids", "1,2,3", "--max-new-tokens", "2")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    done = no_torch("-m", "runtime_py", "score", str(artifact), "--ids", "1,2,3,4", "--json")
    assert done.returncode == 0, done.stderr
    scored = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(scored["logprobs"]) == 3 and scored["ppl"] > 1
    done = no_torch("-m", "runtime_py", "chat", str(artifact), "--max-new-tokens", "2", stdin="Hello\n")
    assert done.returncode == 0 and "assistant> " in done.stdout, done.stderr


# -- one cache root -----------------------------------------------------------------------------------------------
def test_one_cache_root(monkeypatch, tmp_path):
    from artifacts.paths import cache_root
    from artifacts.triton_stub_env import default_stub_env
    from export.tiny import cache_root as tiny_cache_root

    for var in ("LLM_EXPORT_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "llm-export"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # not absolute: ignored (XDG spec)
    assert cache_root() == tmp_path / "home" / ".cache" / "llm-export"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "llm-export"
    monkeypatch.setenv("LLM_EXPORT_CACHE", str(tmp_path / "own"))
    assert cache_root() == tmp_path / "own"  # wins, used as is
    assert tiny_cache_root() == cache_root()
    assert default_stub_env().parent == cache_root() and default_stub_env().name.startswith("triton-stub-env-py")
    monkeypatch.setenv("LLM_EXPORT_CACHE", "")  # empty: unset
    assert cache_root() == tmp_path / "xdg" / "llm-export"
