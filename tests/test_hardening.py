"""Hostile-user checks of the commands that write: nothing lost, nothing written outside what the command owns.

Real directories, real files, real subprocesses of the CLI (exit code 2, `error: ...` naming the problem, no
traceback): `--out` rules of build / triton / engine / bench.compare (only an artifact of ours is ever replaced;
never the checkpoint, inside it or around it), two builds racing for one `--out`, SIGTERM and SIGKILL mid-build,
manifest paths that lead out of the artifact, checkpoint symlinks that lead out of the checkpoint, broken
tokenizer files, and out-of-range CLI values.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import needs_trt

from artifacts.bundle import ArtifactError, open_artifact, staging_dir
from export.__main__ import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file (and link) under root -> sha256 of its bytes (or its link target): what 'untouched' means."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_refused(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "error: " in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    for w in words:
        assert w in done.stderr, (w, done.stderr[-2000:])


def build_argv(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "build", "--model", str(ckpt), "--out", str(out), "--no-progress", "--max-seq-len", "64",
            *extra]


@pytest.fixture
def ckpt(copy_checkpoint):
    return copy_checkpoint("qwen2_window")


# --------------------------------------------------------------------------------------------------------------
# 1. --out: only an artifact of ours is replaced


def test_overwrite_refuses_a_user_directory(ckpt, tmp_path):
    user = tmp_path / "my-notes"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    before = tree_digest(tmp_path)
    done = cli(*build_argv(ckpt, user, "--overwrite"))
    assert_refused(done, str(user), "did not write", "refusing to replace")
    assert tree_digest(tmp_path) == before  # the user's file, the checkpoint: all as they were; no staging left


def test_overwrite_refuses_a_user_file(ckpt, tmp_path, capsys):
    user = tmp_path / "report.pdf"
    user.write_bytes(b"%PDF-1.7 precious")
    for extra in ([], ["--overwrite"]):
        rc = main(build_argv(ckpt, user, *extra)[1:])
        err = capsys.readouterr().err
        assert rc == 2 and "report.pdf" in err, err
    assert user.read_bytes() == b"%PDF-1.7 precious"


@pytest.mark.parametrize("where", ["same", "inside", "inside-new", "parent"])
def test_out_must_not_overlap_the_checkpoint(where, ckpt, tmp_path, capsys):
    out = {"same": ckpt, "inside": ckpt / "tokenizer.json", "inside-new": ckpt / "artifact",
           "parent": ckpt.parent}[where]
    before = tree_digest(ckpt)
    rc = main(build_argv(ckpt, out, "--overwrite")[1:])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "which this command reads" in err or "did not write" in err, err
    assert tree_digest(ckpt) == before  # no weights moved to a hidden .old, nothing added
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]


def test_overwrite_replaces_an_artifact_of_ours(ckpt, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(build_argv(ckpt, out)[1:]) == 0
    first = json.loads((out / "manifest.json").read_text())
    rc = main(build_argv(ckpt, out)[1:])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert main(build_argv(ckpt, out, "--overwrite", "--logits", "all")[1:]) == 0
    second = open_artifact(out)
    assert second.decoder.logits == "all" != first["graphs"]["decoder"]["logits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", ckpt.name]  # no .old, .partial or .lock left


@pytest.mark.parametrize("planted", ["hard link", "foreign file", "symlink", "directory"])
def test_a_lock_file_name_holding_something_else_is_refused_untouched(planted, ckpt, tmp_path, capsys):
    """.OUT.lock beside --out that the tool did not make is never truncated, written or removed: through a hard link
    the linked file's contents were replaced by a pid before."""
    victim, lock = tmp_path / "victim.txt", tmp_path / ".art.lock"
    victim.write_text("precious user data")
    {"hard link": lambda: os.link(victim, lock), "foreign file": lambda: lock.write_text("precious"),
     "symlink": lambda: lock.symlink_to(victim), "directory": lock.mkdir}[planted]()
    rc = main(build_argv(ckpt, tmp_path / "art")[1:])
    err = capsys.readouterr().err
    assert rc == 2 and ".art.lock: exists and is not a lock file of ours" in err, err
    assert victim.read_text() == "precious user data" and os.path.lexists(lock)
    assert planted == "directory" or lock.is_symlink() or lock.read_text() in ("precious", "precious user data")
    assert not (tmp_path / "art").exists()


def test_a_second_writer_of_the_same_out_is_refused_while_the_first_runs(ckpt, tmp_path):
    from artifacts.bundle import _locked

    with _locked(tmp_path / "art"):  # what a running build holds
        done = cli(*build_argv(ckpt, tmp_path / "art"))
    assert_refused(done, f"another process (pid {os.getpid()}) is writing it right now")
    assert not os.path.lexists(tmp_path / ".art.lock") and not (tmp_path / "art").exists()


def test_a_lock_file_left_by_a_killed_writer_is_taken_over(ckpt, tmp_path, capsys):
    (tmp_path / ".art.lock").write_text("999999999")  # a pid, as a writer leaves it when it is SIGKILLed
    assert main(build_argv(ckpt, tmp_path / "art")[1:]) == 0, capsys.readouterr().err
    assert not (tmp_path / ".art.lock").exists() and open_artifact(tmp_path / "art")


def test_out_symlink_is_refused(ckpt, tmp_path, capsys):
    real = tmp_path / "real"
    assert main(build_argv(ckpt, real)[1:]) == 0
    link = tmp_path / "link"
    link.symlink_to(real)
    before = tree_digest(real)
    rc = main(build_argv(ckpt, link, "--overwrite")[1:])
    assert rc == 2 and "symlink" in capsys.readouterr().err
    assert tree_digest(real) == before


def test_triton_out_rules(artifacts, tmp_path, capsys):
    art = artifacts("qwen2_window")
    user = tmp_path / "models"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    for out in (user, art, art / "repo"):  # a user's directory, the artifact itself, inside the artifact
        before = tree_digest(art)
        rc = main(["triton", str(art), "--out", str(out), "--overwrite"])
        err = capsys.readouterr().err
        assert rc == 2 and ("did not write" in err or "which this command reads" in err), err
        assert tree_digest(art) == before
    assert (user / "keep.txt").read_text() == "mine" and sorted(p.name for p in user.iterdir()) == ["keep.txt"]
    repo = tmp_path / "repo"
    assert main(["triton", str(art), "--out", str(repo)]) == 0
    assert main(["triton", str(art), "--out", str(repo), "--overwrite", "--name", "other"]) == 0  # ours: replaced
    assert sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")) == ["README.md", "other", "other_graph"]


@pytest.mark.parametrize("planted", ["symlink to ours", "fifo", "/dev/zero"])
@pytest.mark.parametrize("command", ["build", "triton"])
def test_a_planted_marker_does_not_make_a_user_directory_ours(command, planted, ckpt, artifacts, tmp_path):
    """--out is replaced only when it holds our marker (an artifact's manifest.json, a repository's
    .llm-export-repository.json) as a regular file: a symlink to a real one made the user's directory count as ours
    (--overwrite deleted it), a FIFO in its place hung the command, /dev/zero read without end."""
    art = artifacts("qwen2_window")
    repo = tmp_path / "repo"
    assert main(["triton", str(art), "--out", str(repo)]) == 0
    marker, ours = {"build": ("manifest.json", art), "triton": (".llm-export-repository.json", repo)}[command]
    user = tmp_path / "user"
    user.mkdir()
    (user / "precious.txt").write_text("years of work")
    if planted == "fifo":
        os.mkfifo(user / marker)
    else:
        (user / marker).symlink_to(ours / marker if planted == "symlink to ours" else "/dev/zero")
    before = tree_digest(user) if planted != "fifo" else None
    argv = build_argv(ckpt, user, "--overwrite") if command == "build" else \
        ["export", "triton", str(art), "--out", str(user), "--overwrite"]
    done = cli(*argv, timeout=120)  # a hang fails here
    assert_refused(done, "refusing to replace")
    assert (user / "precious.txt").read_text() == "years of work"
    assert sorted(p.name for p in user.iterdir()) == sorted(["precious.txt", marker])
    if before is not None:
        assert tree_digest(user) == before


def test_engine_out_refuses_a_user_directory(artifacts, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="export engine needs TensorRT-RTX (installed by .[dev])")
    from artifacts.edge import pack

    bundle = pack(artifacts("qwen2_window", lowering="trt-native"), tmp_path / "b.tar")
    user = tmp_path / "device-data"
    user.mkdir()
    (user / "calibration.bin").write_bytes(b"\x01\x02")
    before = tree_digest(tmp_path)
    done = cli("export", "engine", str(bundle), "--out", str(user), "--overwrite")
    assert_refused(done, "device-data", "refusing to replace")
    assert tree_digest(tmp_path) == before


def test_bench_out_refuses_a_non_empty_directory(tmp_path):
    user = tmp_path / "home"
    (user / "models").mkdir(parents=True)
    (user / "models" / "finetune.safetensors").write_bytes(b"weights")
    before = tree_digest(tmp_path)
    done = cli("bench.compare", "--model", "tiny-qwen2", "--out", str(user), "--skip-hf", timeout=120)
    assert_refused(done, "not an empty directory")
    assert tree_digest(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------
# 2. two writers of one --out


def _wait_for(predicate, timeout: float = 120, step: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False


def _partials(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.partial-")]


def test_two_builds_at_once_exactly_one_wins(ckpt, tmp_path):
    out = tmp_path / "art"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", *build_argv(ckpt, out)], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "another process" in loser or "already exists" in loser or "appeared while" in loser, loser
    open_artifact(out)  # the winner's artifact, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", ckpt.name]


def test_destination_appearing_during_the_write_is_not_replaced(tmp_path):
    from artifacts.bundle import rename_new

    dest = tmp_path / "art"
    with pytest.raises(ArtifactError, match="exists and is a directory this tool did not write"):
        with staging_dir(dest) as tmp:
            (tmp / "x").write_text("ours")
            dest.mkdir()  # another program creates it meanwhile (an empty dir: plain rename(2) would replace it)
    assert dest.is_dir() and not list(dest.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    # the final rename itself never replaces: renameat2(RENAME_NOREPLACE) onto an empty directory fails
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(FileExistsError):
        rename_new(src, dest)
    assert src.is_dir() and dest.is_dir()


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    dest = tmp_path / "art"
    with staging_dir(dest) as tmp:
        (tmp / "x").write_text("first")
        with pytest.raises(ArtifactError, match=f"another process \\(pid {os.getpid()}\\) is writing"):
            with staging_dir(dest):
                pass
    assert (dest / "x").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# --------------------------------------------------------------------------------------------------------------
# 3. signals mid-build


def _start_build(ckpt: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", *build_argv(ckpt, out)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_mid_build_cleans_up(ckpt, tmp_path):
    out = tmp_path / "art"
    proc = _start_build(ckpt, out)
    assert _wait_for(lambda: _partials(tmp_path, "art") or proc.poll() is not None)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert rc == 143 and "terminated (SIGTERM): nothing was written" in err and "Traceback" not in err, (rc, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]  # no artifact, no staging, no lock file


def test_sigterm_handler_is_installed_after_the_torch_import(tmp_path):
    """export's SIGTERM handler raises Terminated; installed before `import torch` ran, a SIGTERM in the first
    second of a command was raised inside torch's C init, which swallowed it (the command then ran to the end,
    exit 0) or printed a traceback. The handler goes in once the imports are done; until then SIGTERM simply ends
    the process, before anything was written."""
    code = ("import sys\n"
            "import export.__main__ as m\n"
            "install = m.terminate_cleanly\n"
            "def check():\n"
            "    print('torch loaded:', 'torch' in sys.modules, flush=True)\n"
            "    install()\n"
            "m.terminate_cleanly = check\n"
            f"sys.exit(m.main(['engine', {str(tmp_path / 'none.tar')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert "torch loaded: True" in r.stdout and r.returncode == 2, (r.stdout, r.stderr)


@needs_trt
@pytest.mark.parametrize("sig, rc", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_the_tensorrt_build_cancels_it(ckpt, tmp_path, sig, rc):
    # TensorRT used to swallow the exception Python raised in its logger callback: rc 0 and a whole artifact
    out = tmp_path / "art"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", *build_argv(ckpt, out, "--backend", "tensorrt")], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the progress monitor's first phase: TensorRT is building
        seen.append(line)
        if line.startswith("  TensorRT: "):
            break
    assert proc.poll() is None, "".join(seen)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == rc, "".join(seen) + proc.stderr.read()
    err = proc.stderr.read()
    assert "Traceback" not in err and "nothing was written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]


def test_sigkill_leftovers_are_removed_by_the_next_build(ckpt, tmp_path):
    out = tmp_path / "art"
    proc = _start_build(ckpt, out)
    assert _wait_for(lambda: _partials(tmp_path, "art") or proc.poll() is not None)
    proc.kill()
    proc.wait(timeout=60)
    stale = _partials(tmp_path, "art")
    assert stale  # SIGKILL cannot be caught: the staging directory stays ...
    unrelated = tmp_path / ".art.partial-notes"  # ... and a look-alike name that is not ours must survive
    unrelated.mkdir()
    assert main(build_argv(ckpt, out)[1:]) == 0  # ... until the next build of that --out
    assert not any(p.exists() for p in stale) and unrelated.is_dir()
    open_artifact(out)


# --------------------------------------------------------------------------------------------------------------
# 5. manifest paths stay inside the artifact


def _tampered(artifacts, tmp_path, edit) -> Path:
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifacts("qwen2_window"), art)
    m = json.loads((art / "manifest.json").read_text())
    edit(m, art)
    (art / "manifest.json").write_text(json.dumps(m))
    return art


def _garbage_graph(m, art):
    (art / "model.onnx").write_bytes(b"garbage" * 10)  # checksummed anew: only the contents are wrong
    m["files"]["model.onnx"] = {"sha256": hashlib.sha256(b"garbage" * 10).hexdigest(), "bytes": 70}


@pytest.mark.parametrize("edit, words", [
    (_garbage_graph, "graph 'model.onnx' is not a readable ONNX model"),
    (lambda m, art: m.update(quantization={"source": {}}), "'quantization.source' must be an object"),
    (lambda m, art: m.update(quantization={"tensors": [1, 2]}), "'quantization.tensors' must be an object"),
    (lambda m, art: m["graphs"]["decoder"].update(fusion={"skipped": 5}), "'graphs.decoder.fusion' must be"),
], ids=["graph", "source", "tensors", "fusion"])
@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_refuses_records_that_are_not_ours(edit, words, as_json, artifacts, tmp_path, capsys):
    """inspect reads an untrusted artifact: a graph that is not ONNX, or manifest records of the wrong shape, are
    exit 2 naming the field (a DecodeError, KeyError, AttributeError or TypeError traceback before)."""
    art = _tampered(artifacts, tmp_path, edit)
    assert main(["inspect", str(art), *(["--json"] if as_json else [])]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


def _resealed(name: str, change):
    """An edit for _tampered: file `name` changed by `change` (bytes -> bytes) and its checksum recomputed."""
    def edit(m, art):
        data = change((art / name).read_bytes())
        (art / name).write_bytes(data)
        m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return edit


def _data_outside(m, art):
    """The graph's external data moved out of the artifact, the graph pointing at it with '../'."""
    import onnx

    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    for t in onnx.external_data_helper._get_all_tensors(model):
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.bin"
    (art / "model.onnx.data").rename(art.parent / "outside.bin")
    del m["files"]["model.onnx.data"]
    onnx.save(model, str(art / "model.onnx"))
    _resealed("model.onnx", lambda b: b)(m, art)


GEN = ("runtime_py", "generate", "ART", "--prompt-ids", "1,2,3", "--max-new-tokens", "2")
TRITON = ("export", "triton", "ART", "--out", "REPO")


@pytest.mark.parametrize("edit, argvs, words", [
    (_resealed("model.onnx", lambda b: b[:5000]), [GEN, ("runtime_py", "score", "ART", "--ids", "1,2,3")],
     "ONNX Runtime cannot load model.onnx"),
    (_resealed("model.onnx", lambda b: b[:5000]), [TRITON], "not a readable ONNX model"),
    (_resealed("model.onnx.data", lambda b: b[:1000]), [GEN], "ONNX Runtime cannot load model.onnx"),
    (_data_outside, [GEN], "ONNX Runtime cannot load model.onnx"),
    (lambda m, art: m["spec"].update(eos_token_ids=5), [GEN], "'eos_token_ids' must be list"),
    (lambda m, art: m["spec"].update(pad_token_id=10**30), [GEN], "'pad_token_id' must hold token ids in [0, "),
    (lambda m, art: m["spec"].update(eos_token_ids=[1, -4]), [GEN], "'eos_token_ids' must hold token ids"),
], ids=["graph-truncated", "graph-truncated-triton", "data-truncated", "data-outside", "eos-int", "pad-huge",
        "eos-negative"])
def test_sealed_but_broken_artifact_is_a_clear_error(edit, argvs, words, artifacts, tmp_path):
    """A manifest resealed around a broken file or field (its checksums match): exit 2 naming it, never a
    traceback (ORT's InvalidProtobuf / Fail, protobuf's DecodeError, TypeError, OverflowError before)."""
    art = _tampered(artifacts, tmp_path, edit)
    for argv in argvs:
        repo = tmp_path / "repo"
        done = cli(*[str(art) if a == "ART" else str(repo) if a == "REPO" else a for a in argv])
        assert_refused(done, words)
        assert not repo.exists()


def test_manifest_file_entry_leading_out_is_refused(artifacts, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")

    def edit(m, art):
        m["files"]["../secret.txt"] = {"sha256": hashlib.sha256(b"outside").hexdigest(), "bytes": 7}

    art = _tampered(artifacts, tmp_path, edit)
    with pytest.raises(ArtifactError, match=r"'\.\./secret\.txt' is not a plain relative name"):
        open_artifact(art)
    repo = tmp_path / "repo"
    done = cli("export", "triton", str(art), "--out", str(repo))
    assert_refused(done, "../secret.txt")
    assert not repo.exists() and os.stat(secret).st_nlink == 1  # no hard link to the outside file anywhere


def test_manifest_nested_too_deeply_is_refused(artifacts, tmp_path):
    """json raises RecursionError (not a ValueError) past its recursion limit: still a clear exit 2."""
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifacts("qwen2_window"), art)
    (art / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactError, match=r"manifest.json: not valid JSON \(nested too deeply"):
        open_artifact(art)
    done = cli("runtime_py", "generate", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "2")
    assert_refused(done, "nested too deeply")


def test_manifest_absolute_graph_path_is_refused(artifacts, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(artifacts("qwen2_mqa_tied_linear"), other)  # a different, unverified graph

    def edit(m, art):
        m["graphs"]["decoder"]["file"] = str(other / "model.onnx")

    art = _tampered(artifacts, tmp_path, edit)
    done = cli("runtime_py", "generate", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "2")
    assert_refused(done, "absolute path")


@pytest.mark.parametrize("name", ["chat_template.jinja", "additional_chat_templates/default.jinja",
                                  "special_tokens_map.json"])
def test_unlisted_file_the_runtime_reads_is_refused(artifacts, tmp_path, name):
    # the checksums seal tokenizer_config.json; a template or token map dropped beside it must not bypass them
    def edit(m, art):
        (art / name).parent.mkdir(exist_ok=True)
        (art / name).write_text("INJECTED {{ messages[0]['content'] }}" if name.endswith(".jinja") else "{}")
        m["files"].pop(name, None)

    art = _tampered(artifacts, tmp_path, edit)
    with pytest.raises(ArtifactError, match=f"{name} is not listed in the manifest"):
        open_artifact(art)
    done = cli("runtime_py", "generate", str(art), "--chat", "Hi", "--max-new-tokens", "2")
    assert_refused(done, f"{name} is not listed in the manifest")
    assert "INJECTED" not in done.stdout


def _without_tokenizer(artifacts, tmp_path) -> Path:
    def edit(m, art):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if m["files"].pop(name, None) is not None:
                (art / name).unlink()

    return _tampered(artifacts, tmp_path, edit)


def test_text_features_without_a_tokenizer_are_refused_not_dropped(artifacts, tmp_path):
    art = _without_tokenizer(artifacts, tmp_path)
    base = ["runtime_py", "generate", str(art), "--prompt-ids", "1,2", "--max-new-tokens", "3", "--ignore-eos"]
    done = cli(*base)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 3  # the token ids, since there is no text
    # streaming used to print an empty line (exit 0), and stop strings were ignored
    assert_refused(cli(*base, "--stream"), "no tokenizer.json, which streamed text is decoded with")
    assert_refused(cli(*base, "--stop", "zz"), "no tokenizer.json, which stop strings are matched against")
    # chat says so before reading a message
    done = subprocess.run([sys.executable, "-m", "runtime_py", "chat", str(art)], cwd=REPO_ROOT, input="",
                          capture_output=True, text=True, timeout=120)
    assert_refused(done, "no tokenizer.json, which chat messages are encoded with")
    assert "you> " not in done.stdout


def test_manifest_path_through_a_symlink_is_refused(artifacts, tmp_path):
    outside = tmp_path / "outside.json"

    def edit(m, art):
        outside.write_bytes((art / "tokenizer_config.json").read_bytes())  # same bytes: the checksum still holds
        (art / "tokenizer_config.json").unlink()
        (art / "tokenizer_config.json").symlink_to(outside)

    art = _tampered(artifacts, tmp_path, edit)
    with pytest.raises(ArtifactError, match="symlink"):
        open_artifact(art)
    done = cli("export", "bundle", str(art), "--out", str(tmp_path / "b.tar"))
    assert_refused(done, "symlink")
    assert not (tmp_path / "b.tar").exists()


# --------------------------------------------------------------------------------------------------------------
# 6. checkpoint files that lead out of the checkpoint


def test_tokenizer_symlink_out_of_the_checkpoint_is_refused(ckpt, tmp_path):
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.json").symlink_to("/etc/passwd")
    out = tmp_path / "art"
    done = cli(*build_argv(ckpt, out))
    assert_refused(done, "tokenizer.json", "/etc/passwd", "outside the checkpoint")
    assert not out.exists()


TOOL_USE = "TOOLS {% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


def test_named_chat_templates_are_kept_sealed_and_bundled(ckpt, tmp_path, capsys):
    """additional_chat_templates/*.jinja (transformers' named templates) reach the artifact, listed and checksummed,
    and its edge bundle; the build used to drop them. One dropped in afterwards is refused like any unlisted file."""
    from artifacts.edge import pack, unpack
    from runtime_py.chat import load_chat_template

    (ckpt / "additional_chat_templates").mkdir()
    (ckpt / "additional_chat_templates" / "tool_use.jinja").write_text(TOOL_USE)
    out = tmp_path / "art"
    assert main(build_argv(ckpt, out, "--lowering", "trt-native")[1:]) == 0, capsys.readouterr().err
    manifest = open_artifact(out)
    assert "additional_chat_templates/tool_use.jinja" in manifest.files
    assert load_chat_template(out, "tool_use")[0] == TOOL_USE
    assert load_chat_template(out)[0] == load_chat_template(ckpt)[0]  # the default one is unchanged
    _, info = unpack(pack(out, tmp_path / "b.tar"), tmp_path / "unpacked")
    assert info["files"]["additional_chat_templates/tool_use.jinja"]["bytes"] == len(TOOL_USE)
    assert (tmp_path / "unpacked" / "artifact" / "additional_chat_templates" / "tool_use.jinja").read_text() == TOOL_USE
    (out / "additional_chat_templates" / "rag.jinja").write_text("INJECTED")
    with pytest.raises(ArtifactError, match="additional_chat_templates/rag.jinja is not listed in the manifest"):
        open_artifact(out)


def test_named_chat_template_linked_out_of_the_checkpoint_is_refused(ckpt, tmp_path):
    (tmp_path / "secret.jinja").write_text("{{ 'secret' }}")
    (ckpt / "additional_chat_templates").mkdir()
    (ckpt / "additional_chat_templates" / "tool_use.jinja").symlink_to(tmp_path / "secret.jinja")
    out = tmp_path / "art"
    assert_refused(cli(*build_argv(ckpt, out)), "tool_use.jinja", "outside the checkpoint")
    assert not out.exists()


def test_weights_symlink_out_of_the_checkpoint_is_refused(ckpt, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere.safetensors"
    (ckpt / "model.safetensors").rename(elsewhere)
    (ckpt / "model.safetensors").symlink_to(elsewhere)
    rc = main(build_argv(ckpt, tmp_path / "art")[1:])
    err = capsys.readouterr().err
    assert rc == 2 and "outside the checkpoint" in err and "model.safetensors" in err, err


def test_hf_cache_snapshot_links_into_blobs_still_build(checkpoints, tmp_path, capsys):
    """The HF cache stores snapshots as symlinks into the repository's blobs/: that layout must keep working."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in checkpoints("qwen2_window").iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    out = tmp_path / "art"
    assert main(build_argv(snap, out)[1:]) == 0, capsys.readouterr().err
    m = open_artifact(out)
    assert "tokenizer.json" in m.files and not (out / "tokenizer.json").is_symlink()


@pytest.mark.parametrize("name, content, words", [
    ("tokenizer.json", "{\"not\": \"a tokenizer\"}", ["tokenizer.json", "not a valid tokenizer.json"]),
    ("tokenizer.json", "\xff\xfe garbage", ["tokenizer.json"]),
    ("tokenizer_config.json", "{broken", ["tokenizer_config.json", "not valid JSON"]),
    ("generation_config.json", "[1, 2", ["generation_config.json", "not valid JSON"]),
    ("tokenizer_config.json", "[" * 100_000 + "]" * 100_000, ["tokenizer_config.json", "nested too deeply"]),
])
def test_broken_tokenizer_files_are_refused_at_build_time(name, content, words, ckpt, tmp_path, capsys):
    (ckpt / name).write_text(content, encoding="utf-8", errors="surrogateescape")
    out = tmp_path / "art"
    rc = main(build_argv(ckpt, out)[1:])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: "), err
    for w in words:
        assert w in err, err
    assert not out.exists()


def _amplifying(tokenizer: dict) -> dict:
    """A Replace normalizer turning each 'a' into 20,000 characters: a 100 KB prompt became 2 GB in the tokenizer."""
    return {**tokenizer, "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "NFC"}, {"type": "Replace", "pattern": {"String": "a"}, "content": "b" * 20000}]}}


def _long_token(tokenizer: dict) -> dict:
    return {**tokenizer, "added_tokens": [*tokenizer["added_tokens"], {
        "id": max(t["id"] for t in tokenizer["added_tokens"]) + 1, "content": "z" * 100_000, "single_word": False,
        "lstrip": False, "rstrip": False, "normalized": False, "special": False}]}


TOKENIZER_EDITS = [(_amplifying, "normalizer.normalizers[1] Replace content has 20,000 characters (at most 16)"),
                   (_long_token, "a token has 100,000 characters (at most 4096)"),
                   (lambda t: {"not": "a tokenizer"}, "not a valid tokenizer.json")]


@pytest.mark.parametrize("edit, words", TOKENIZER_EDITS, ids=["replace", "long-token", "not-a-tokenizer"])
def test_tokenizer_that_would_blow_up_a_text_is_refused(edit, words, ckpt, artifacts, tmp_path, capsys):
    """At build time from the checkpoint, and at run time from an artifact whose manifest was resealed around it
    (exit 2 naming the file; before, the runtime printed a traceback for a malformed one and ran the rest)."""
    tokenizer = json.loads((ckpt / "tokenizer.json").read_text())
    (ckpt / "tokenizer.json").write_text(json.dumps(edit(tokenizer)))
    rc = main(build_argv(ckpt, tmp_path / "built")[1:])
    err = capsys.readouterr().err
    assert rc == 2 and "tokenizer.json" in err and words in err, err
    assert not (tmp_path / "built").exists()

    def reseal(m, art):
        data = json.dumps(edit(json.loads((art / "tokenizer.json").read_text()))).encode()
        (art / "tokenizer.json").write_bytes(data)
        m["files"]["tokenizer.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    art = _tampered(artifacts, tmp_path, reseal)
    done = cli("runtime_py", "generate", str(art), "--prompt", "a" * 100_000, "--max-new-tokens", "2")
    assert_refused(done, "tokenizer.json", words)


def test_a_special_token_too_long_is_refused(ckpt, tmp_path, capsys):
    """A named special token tokenizer_config.json adds to the vocabulary is bounded like the vocabulary's own (a
    200,000-character pad_token was added as a token and built)."""
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["pad_token"] = "p" * 200_000
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    rc = main(build_argv(ckpt, tmp_path / "built")[1:])
    err = capsys.readouterr().err
    assert rc == 2 and "tokenizer_config.json: a special token has 200,000 characters (at most 4096)" in err, err
    assert not (tmp_path / "built").exists()


# --------------------------------------------------------------------------------------------------------------
# 11. out-of-range values


@pytest.mark.parametrize("argv, words", [
    (["build", "--model", "tiny-qwen2", "--max-seq-len", "0"], ["--max-seq-len", "integer >= 2", "'0'"]),
    (["build", "--model", "tiny-qwen2", "--max-batch", "1000000000"], ["--max-batch", "[1, 1024]"]),
    (["build", "--model", "tiny-qwen2", "--max-batch", "-3"], ["--max-batch", "[1, 1024]"]),
    (["triton", "ART", "--out", "R", "--instances", "0"], ["--instances", "[1, 64]"]),
    (["triton", "ART", "--out", "R", "--max-batch", "5000"], ["--max-batch", "[1, 1024]"]),
    (["verify", "--model", "tiny-qwen2", "--steps", "-1"], ["--steps", "[0, 4096]"]),
])
def test_out_of_range_values_name_the_range(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


def test_config_symlink_out_of_the_checkpoint_is_refused(ckpt, tmp_path, capsys):
    elsewhere = tmp_path / "config-elsewhere.json"
    (ckpt / "config.json").rename(elsewhere)
    (ckpt / "config.json").symlink_to(elsewhere)
    rc = main(build_argv(ckpt, tmp_path / "art")[1:])
    err = capsys.readouterr().err
    assert rc == 2 and "config.json" in err and "outside the checkpoint" in err, err
    assert not (tmp_path / "art").exists()


def test_stub_env_made_once_by_concurrent_processes(tmp_path):
    """Two processes asking for the same missing Triton stub env at once (two pytest workers on a fresh machine):
    the second waits for the first instead of failing on its lock, and both get the one finished env (numpy 1.x)."""
    from artifacts.triton_stub_env import numpy_major

    if numpy_major() < 2:
        pytest.skip("numpy 1.x here: stub_env uses this environment itself and makes nothing")
    dest = tmp_path / "stub-env"
    code = "import sys; from artifacts.triton_stub_env import stub_env; print(stub_env(sys.argv[1]))"
    root = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", code, str(dest)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.communicate(timeout=600), p.returncode) for p in procs]
    for (out, err), rc in results:
        assert rc == 0, err
        assert out.strip().splitlines()[-1] == str(dest)
    assert (dest / ".complete").is_file()
    done = subprocess.run([str(dest / "bin" / "python"), "-c", "import numpy; print(numpy.__version__)"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("1."), (done.stdout, done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stub-env"]  # its .stub-env.wait lock is gone


@pytest.mark.parametrize("what", ["artifact", "user directory", "file"])
def test_stub_env_never_replaces_what_it_did_not_make(what, artifacts, tmp_path):
    """`python -m artifacts.triton stub-env DEST` replaced an artifact (a directory holding our manifest.json)
    with a venv; a refusal left a .DEST.wait lock file and the parents it made."""
    import shutil

    from artifacts.triton_stub_env import numpy_major

    if numpy_major() < 2:
        pytest.skip("numpy 1.x here: stub_env uses this environment itself and writes nothing")
    dest = tmp_path / "a" / "b" / "dest"
    dest.parent.mkdir(parents=True)
    if what == "artifact":
        shutil.copytree(artifacts("qwen2_window"), dest)
    elif what == "user directory":
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
    else:
        dest.write_text("mine")
    before = tree_digest(dest) if dest.is_dir() else dest.read_text()
    done = cli("artifacts.triton", "stub-env", str(dest))
    assert_refused(done, str(dest), "is not a stub environment this tool made")
    assert (tree_digest(dest) if dest.is_dir() else dest.read_text()) == before
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest"]
    (tmp_path / "file.txt").write_text("mine")
    done = cli("artifacts.triton", "stub-env", str(tmp_path / "file.txt" / "env"))  # a parent that is a file
    assert_refused(done, "file.txt")


def test_failed_build_leaves_no_parent_dirs_and_bad_out_names_are_refused(ckpt, tmp_path):
    """A build that fails mid-stream (a NaN weight) removes the staging dir and also the parents it created for
    --out (a parent that existed stays); an empty --out, a name too long for its staging sibling and a parent that
    is a file are exit 2 before anything is written."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(ckpt / "model.safetensors")
    name = next(k for k in weights if k.endswith("down_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "kept").mkdir()
    done = cli(*build_argv(ckpt, tmp_path / "kept" / "new" / "deeper" / "art"))
    assert_refused(done, "non-finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.name, "kept"])
    assert list((tmp_path / "kept").iterdir()) == []
    (tmp_path / "afile").write_text("mine")
    for out, words in (("", "--out is empty"), (str(tmp_path / ("n" * 240)), "at most 200"),
                       (str(tmp_path / "afile" / "sub" / "art"), "afile is a file, not a directory")):
        assert_refused(cli(*build_argv(ckpt, out)), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.name, "kept", "afile"])
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("case", ["manifest_is_a_dir", "logits_all_on_a_last_graph", "max_batch_0",
                                  "output_shape_edited", "max_seq_len_huge", "vocab_size", "num_kv_heads",
                                  "head_dim", "kv_rank", "kv_dtype", "kv_mode", "vocab_size_and_symbolic_logits"])
def test_manifest_that_does_not_describe_the_graph_is_refused(artifacts, tmp_path, case):
    """The manifest's checksums cover the files it lists, not itself: a hand-edited manifest must still be refused
    with a clear message, not an ONNX Runtime traceback at the first call."""
    def edit(m, art):
        if case == "logits_all_on_a_last_graph":
            m["graphs"]["decoder"]["logits"] = "all"
        elif case == "max_batch_0":
            m["max_batch"] = 0
        elif case == "max_seq_len_huge":  # was an OverflowError traceback in the memory check's GiB figures
            m["max_seq_len"] = 10 ** 400
        elif case == "output_shape_edited":
            logits = next(t for t in m["graphs"]["decoder"]["outputs"] if t["name"] == "logits")
            logits["shape"][2] += 1
            m["spec"]["vocab_size"] += 1  # the manifest agrees with itself: only the graph disagrees
        elif case in ("vocab_size", "num_kv_heads", "head_dim"):  # the spec the session sizes its buffers from
            m["spec"][case] += 1
        elif case == "kv_rank":
            m["graphs"]["decoder"]["inputs"][2]["shape"].append(1)
        elif case == "kv_dtype":  # every KV tensor, so that the manifest agrees with itself, not with the graph
            for t in m["graphs"]["decoder"]["inputs"] + m["graphs"]["decoder"]["outputs"]:
                if t["name"].startswith(("past_key_values.", "present.")):
                    t["dtype"] = "float16"
        elif case == "kv_mode":
            m["kv_mode"] = "concat"
        elif case == "vocab_size_and_symbolic_logits":  # nothing listed to compare: the graph itself is checked
            next(t for t in m["graphs"]["decoder"]["outputs"] if t["name"] == "logits")["shape"][2] = "vocab"
            m["spec"]["vocab_size"] += 1

    art = _tampered(artifacts, tmp_path, edit)
    if case == "manifest_is_a_dir":
        (art / "manifest.json").unlink()
        (art / "manifest.json").mkdir()
    words = {"manifest_is_a_dir": "not a regular file", "logits_all_on_a_last_graph": "'logits' is 'all'",
             "max_batch_0": "'max_batch' must be in [1, 2^40], got 0", "output_shape_edited": "does not describe this graph",
             "max_seq_len_huge": "'max_seq_len' must be in [1, 2^40]",
             "vocab_size": "but spec.vocab_size is", "num_kv_heads": "does not match spec.num_kv_heads",
             "head_dim": "does not match spec.head_dim",
             "kv_rank": "a KV tensor is [batch, kv_heads, length, head_dim]",
             "kv_dtype": "as float16, but", "kv_mode": "kv_mode is 'concat', but the graph has no attention_mask",
             "vocab_size_and_symbolic_logits": "the manifest's spec.vocab_size is"}[case]
    assert_refused(cli("runtime_py", "score", str(art), "--ids", "1,2,3", "--json"), words)
    assert_refused(cli("runtime_py", "generate", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"), words)


@pytest.mark.parametrize("pad", [10 ** 30, 100_000])
def test_a_pad_id_outside_the_vocabulary_is_refused(artifacts, tmp_path, pad):
    """generation_config.json's pad_token_id (used when tokenizer_config.json names no pad token) is fed to the
    embedding for padded rows: 10**30 was an OverflowError traceback in the padding, and in the server it killed
    the engine thread; an id past the vocabulary failed the second request of a batch in ONNX Runtime's Gather."""
    def edit(m, art):
        config = json.loads((art / "tokenizer_config.json").read_text())
        config.pop("pad_token", None)
        gen = json.loads((art / "generation_config.json").read_text()) if (art / "generation_config.json").exists() \
            else {}
        gen["pad_token_id"] = pad
        for name, value in (("tokenizer_config.json", config), ("generation_config.json", gen)):
            data = json.dumps(value).encode()
            (art / name).write_bytes(data)
            m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        m["spec"]["pad_token_id"] = None

    art = _tampered(artifacts, tmp_path, edit)
    assert_refused(cli("runtime_py", "generate", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"),
                   f"the pad token id {pad}", "outside the vocabulary")


def test_allocation_failure_after_the_memory_check_is_an_error_line(artifacts):
    # the estimate is measured, not a proof: an address-space limit between it and the real peak used to end in
    # ONNX Runtime's bad_alloc traceback
    art = artifacts("qwen2_window")
    code = ("import sys, numpy as np, runtime_py.__main__ as m\n"
            "import runtime_py.generate as g\n"
            "g.Generator.generate = lambda *a, **k: np.zeros(1 << 60, np.uint8)\n"  # an allocation that fails
            f"sys.exit(m.main(['generate', {str(art)!r}, '--prompt-ids', '1,2', '--max-new-tokens', '2']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert_refused(done, "error: out of memory (MemoryError: Unable to allocate", "raise the limit")


def test_score_ids_are_plain_decimal(artifacts):
    art = artifacts("qwen2_window")
    for ids in ("1_0,2", "\uff15,\uff16", "0x10", "1.0"):
        assert_refused(cli("runtime_py", "score", str(art), "--ids", ids), "expected comma-separated integers")
    done = cli("runtime_py", "score", str(art), "--ids", " 1, 2,3,", "--json")
    assert done.returncode == 0 and len(json.loads(done.stdout.splitlines()[-1])["logprobs"]) == 2, done.stderr


def test_runtime_bench_takes_what_generate_takes(artifacts):
    # its 2-token warm-up refused a 127 + 1 run on a 128-token context, naming max_new_tokens=2
    art = artifacts("qwen2_window")
    done = cli("runtime_py", "bench", str(art), "--prompt-len", "127", "--new-tokens", "1", "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["decode_tok_s"] is None and r["ttft_s"] > 0 and r["new_tokens"] == 1
    assert_refused(cli("runtime_py", "bench", str(art), "--prompt-len", "127", "--new-tokens", "4"),
                   "with max_new_tokens=4 that is 131")
    # said before the random prompts are made: 10**10 tokens of them were a MemoryError called a memory estimate's
    for n in ("10000000000", str(10**20)):
        t0 = time.monotonic()
        assert_refused(cli("runtime_py", "bench", str(art), "--prompt-len", n, "--new-tokens", "4"),
                       f"prompt 0 has {n} tokens", "context length 128")
        assert time.monotonic() - t0 < 60
    # a batch past the artifact's is said as such (it was reported as a KV cache that does not fit in memory)
    assert_refused(cli("runtime_py", "bench", str(art), "--batch", "100000", "--prompt-len", "4", "--new-tokens", "2"),
                   "a batch of 100000 > the artifact's max batch")
    for argv in (["bench", str(art), "--prompt-len", "8", "--new-tokens", "2"], ["score", str(art), "--ids", "1,2,3"]):
        done = cli("runtime_py", *argv, "--skip-memory-check")  # as generate, chat, serve and classify take it
        assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------------------------------
# the commands as processes: closed or full standard output, closed stdin, Ctrl-C while starting


def _shell(command: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), **env}
    full = {k: v for k, v in full.items() if v is not None}
    return subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], cwd=REPO_ROOT, env=full,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("unbuffered", ["1", None])
def test_closed_or_full_standard_output(artifacts, unbuffered):
    """`| head` / `| true`: a quiet 141 (BrokenPipeError tracebacks and exit 1 or 120 before, and export printed
    'error: [Errno 32] Broken pipe' with exit 2 after its work was done); `> /dev/full`: one error line, exit 2."""
    art, py = artifacts("qwen2_window"), sys.executable
    for command in (f"{py} -m runtime_py generate {art} --prompt Hello --max-new-tokens 100 --ignore-eos --stream "
                    "| head -c 3",
                    f"{py} -m runtime_py score {art} --ids 1,2,3,4 --json | true",
                    f"{py} -m export inspect {art} | true"):
        done = _shell(command, PYTHONUNBUFFERED=unbuffered)
        assert done.returncode == 141 and done.stderr == "", (command, done.returncode, done.stderr[-2000:])
    for command in (f"{py} -m runtime_py generate {art} --prompt-ids 1,2 --max-new-tokens 3 > /dev/full",
                    f"{py} -m runtime_py generate {art} --prompt Hello --max-new-tokens 3 --stream > /dev/full"):
        done = _shell(command, PYTHONUNBUFFERED=unbuffered)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == \
            "error: cannot write the output (No space left on device)", (command, done.stderr[-2000:])


def test_chat_with_stdin_closed_ends_like_end_of_input(artifacts):
    done = _shell(f"{sys.executable} -m runtime_py chat {artifacts('qwen2_window')} <&-")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]


def _wait_for_site_packages(proc, timeout: float = 60.0) -> None:
    """Until the process has mapped a shared library from site-packages (or ended)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if "site-packages" in Path(f"/proc/{proc.pid}/maps").read_text():
                return
        except OSError:
            return
        time.sleep(0.002)


@pytest.mark.parametrize("argv", [["runtime_py", "generate", "ART", "--prompt", "Hi"],
                                  ["export", "build", "--model", "tiny-qwen2", "--out", "OUT"]])
def test_ctrl_c_while_the_command_starts_is_a_quiet_130(argv, artifacts, tmp_path):
    """SIGINT to the process group during the imports (torch, onnxruntime: a KeyboardInterrupt traceback, or an
    ImportError 'initialization failed', before) and after: exit 130, no traceback, nothing written.

    The signal is sent once the process has mapped its first library from site-packages (numpy, torch: imported
    after the handler, which is each command's first statement), then after 0.3 s and 1 s more; a fixed delay from
    the start could land in the interpreter's own startup, before any line of ours runs (CI: a traceback from
    typing.py at 0.05 s, when the handler came after the first imports).

    A signal that lands after the command has finished, while the interpreter tears itself down, kills the process
    by SIGINT (returncode -2, which a shell reports as 130 too): Py_FinalizeEx flushes stdout and stderr, then
    restores SIGINT's default action before it frees the modules (onnxruntime, numpy: 0.1-0.2 s). Measured here:
    20 of 60 signals sent 0.40-0.64 s after the first map of a 0.55 s `generate` ended so, each after the whole
    output was written (CI: -2 at 0.3 s). Nothing is left to interrupt then, so the build must be complete."""
    argv = [str(artifacts("qwen2_window")) if a == "ART" else str(tmp_path / "out") if a == "OUT" else a
            for a in argv]
    for delay in (0.0, 0.3, 1.0):
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        _wait_for_site_packages(proc)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (130, 0, -signal.SIGINT) and "Traceback" not in err, (delay, proc.returncode,
                                                                                         err[-2000:])
        if proc.returncode == 130:
            assert not (tmp_path / "out").exists()
        elif "export" in argv and (tmp_path / "out").exists():  # finished: the artifact is whole
            open_artifact(tmp_path / "out")  # every listed file there with its recorded sha256
            shutil.rmtree(tmp_path / "out")


_HANDLER_AT_IMPORT = """
import runpy, signal, sys
seen = {}
class Record:  # notes which SIGINT handler is in force when each extension package is first looked up
    def find_spec(self, name, path=None, target=None):
        if name in ("onnxruntime", "onnx") and name not in seen:
            seen[name] = getattr(signal.getsignal(signal.SIGINT), "__name__", "?")
            print(name, seen[name], file=sys.stderr)
sys.meta_path.insert(0, Record())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("argv", [["runtime_py", "generate", "ART", "--prompt", "Hi"],
                                  ["export", "build", "--model", "tiny-qwen2", "--out", "OUT"]])
def test_pybind11_extensions_are_imported_under_the_startup_handler(argv, artifacts, tmp_path):
    """onnxruntime (and onnx, for a build) are imported while a Ctrl-C still ends the process with os._exit(130): a
    KeyboardInterrupt raised inside their C init is reported by the extension itself, a traceback and 'ImportError:
    initialization failed' (CI, at 0.3 s into `generate`, when the runtime imported onnxruntime after
    restore_interrupts) or 'import numpy failed', not by our handlers."""
    argv = [str(artifacts("qwen2_window")) if a == "ART" else str(tmp_path / "out") if a == "OUT" else a
            for a in argv]
    done = subprocess.run([sys.executable, "-c", _HANDLER_AT_IMPORT, *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    wanted = ["onnxruntime"] + (["onnx"] if argv[0] == "export" else [])
    seen = dict(line.split() for line in done.stderr.splitlines() if line.split()[:1] in (["onnx"], ["onnxruntime"]))
    assert {name: seen.get(name) for name in wanted} == {name: "_exit_130" for name in wanted}, done.stderr[-2000:]


@pytest.mark.parametrize("cause, code", [("KeyboardInterrupt()", 130), ("OSError('libfoo.so')", 1)])
def test_an_import_failed_by_a_ctrl_c_ends_as_130(cause, code):
    """pybind11 re-raises a KeyboardInterrupt from an extension's init (tensorrt_rtx, imported late by an engine
    build) as ImportError 'initialization failed' caused by it: artifacts.cli.run takes that for a Ctrl-C, quietly;
    any other ImportError is a bug and keeps its traceback."""
    program = ("from artifacts.cli import run\n"
               "def main():\n"
               f"    raise ImportError('initialization failed') from {cause}\n"
               "run(main)\n")
    done = subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == code, done.stderr
    assert ("Traceback" in done.stderr) == (code != 130), done.stderr


def test_utf8_arguments_and_chat_input_outside_python_utf8_mode(artifacts):
    """LC_ALL=POSIX with PYTHONUTF8=0: Python decodes argv and stdin as ASCII, so valid UTF-8 was refused as 'not
    valid UTF-8 (byte 0xc3)'; it is read as UTF-8 now, and bytes that are not UTF-8 are still refused by name."""
    art, py = artifacts("qwen2_window"), sys.executable
    env = {"LC_ALL": "POSIX", "LANG": None, "PYTHONUTF8": "0", "PYTHONIOENCODING": None}
    ok = _shell(f"{py} -m runtime_py generate {art} --prompt 'h\u00e9llo' --max-new-tokens 2 --stop '\u00e9t\u00e9'",
                **env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    chat = _shell(f"printf 'h\u00e9llo\\n' | {py} -m runtime_py chat {art} --max-new-tokens 2", **env)
    assert chat.returncode == 0 and "error" not in chat.stderr, chat.stderr[-2000:]
    bad = _shell(f"{py} -m runtime_py generate {art} --prompt $'\\xff' --max-new-tokens 2", **env)
    assert_refused(bad, "--prompt is not valid UTF-8 (byte 0xff")
