"""Edge bundles: pack an artifact, unpack it elsewhere, build the engine there (TensorRT-RTX on CI, no GPU needed to
build), verify it against the manifest. Hostile bundles (the CVE-2025-4517 symlink chain, links, devices, unsafe or
unlisted names, duplicates, wrong sizes, oversized totals, bad indexes, symlinks planted in the destination) and
hostile manifests (graph files outside the artifact, symlinked members) are refused with nothing written outside
the destination and no half-written destination left behind. Every bundle here is a real tar built with tarfile."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import artifacts.edge as edge
from artifacts.bundle import ArtifactError, open_artifact, write_manifest
from artifacts.edge import BUNDLE_JSON, BUNDLE_VERSION, MAX_INDEX_BYTES, pack, unpack
from tests.helpers import needs_trt

REPO = Path(__file__).resolve().parent.parent


# ---- building real tar files -------------------------------------------------------------------------------------

def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def _write_tar(path: Path, entries) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _entries(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    """A bundle's members as fresh (TarInfo, bytes) pairs, in order."""
    with tarfile.open(bundle) as tar:
        return [_file(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _with_index(entries, edit) -> list:
    """entries with bundle.json replaced by edit(parsed index) (edit returns the new bytes or mutates the dict)."""
    out = []
    for info, data in entries:
        if info.name == BUNDLE_JSON:
            index = json.loads(data)
            new = edit(index)
            data = new if isinstance(new, bytes) else json.dumps(index).encode()
            info, data = _file(BUNDLE_JSON, data)
        out.append((info, data))
    return out


def _poc_entries(dest: Path, up: int) -> list:
    """The published CVE-2025-4517 PoC: 16 levels of (long directory + one-letter symlink to it), so the path
    through the letters expands in os.path.realpath past PATH_MAX (which then stops resolving links); a symlink at
    that depth pointing back up to the top; 'escape' going through it and `up` levels above the top to 'outside';
    finally a regular file written through 'escape'. tarfile's data filter (before the mid-2025 fixes) checks
    these with realpath and lets them all through. The PoC uses 247-character directories for a short
    destination; here their length is fitted to `dest` (absolute, as extraction will see it) so the real
    directories stay under PATH_MAX while their expansion plus the 254-character link does not."""
    comp = "d" * ((4096 - 100 - len(str(dest))) // 16 - 1)
    steps, entries, path = "abcdefghijklmnop", [], ""
    for step in steps:
        entries.append(_special(os.path.join(path, comp), tarfile.DIRTYPE))
        entries.append(_special(os.path.join(path, step), tarfile.SYMTYPE, comp))
        path = os.path.join(path, comp)
    linkpath = os.path.join("/".join(steps), "l" * 254)
    entries.append(_special(linkpath, tarfile.SYMTYPE, "../" * len(steps)))
    entries.append(_special("escape", tarfile.SYMTYPE, linkpath + "/.." * up + "/outside"))
    entries.append(_file("escape/pwned", b"written outside the destination"))
    return entries


@pytest.fixture
def bundle(artifacts, tmp_path):
    return pack(artifacts("qwen2_window", "static", lowering="trt-native"), tmp_path / "b.tar")


@pytest.fixture
def outside(tmp_path):
    """A directory beside every destination used here: nothing may ever appear in it."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


# ---- the happy path ------------------------------------------------------------------------------------------------

@needs_trt
def test_bundle_round_trip(artifacts, tmp_path):
    from export.__main__ import main

    art = artifacts("qwen3_moe_mixed", "static", lowering="trt-native")
    bundle = tmp_path / "ship" / "model.tar"
    assert main(["bundle", str(art), "--out", str(bundle)]) == 0
    names = tarfile.open(bundle).getnames()
    assert "artifact/model.onnx" in names and "plugins/attention.py" in names and "bundle.json" in names
    assert not any(n.endswith(".engine") for n in names)  # the engine is built on the device
    device = tmp_path / "device"
    device.mkdir()
    (device / "model.tar").write_bytes(bundle.read_bytes())  # "elsewhere"
    assert main(["engine", str(device / "model.tar")]) == 0
    built = device / "model-engine"
    m = open_artifact(built)  # every checksum, the new engine's included
    assert m.backend == "tensorrt" and (built / m.engine.file).stat().st_size > 0
    assert [t.name for t in m.engine.inputs] == [t.name for t in m.decoder.inputs]
    assert m.engine.profiles["prefill"]["sequence"][2] == m.max_seq_len


def test_unpack_round_trip(artifacts, tmp_path):
    art = artifacts("qwen2_window", "static", lowering="trt-native")
    bundle = pack(art, tmp_path / "b.tar")
    with tarfile.open(bundle) as tar:
        members = tar.getmembers()
        info = json.loads(tar.extractfile(BUNDLE_JSON).read())
    assert members[0].name == BUNDLE_JSON  # the index comes first, so unpack reads it before anything else
    assert all(m.isreg() for m in members)
    assert info["format_version"] == BUNDLE_VERSION and info["lowering"] == "trt-native"
    assert set(info["files"]) >= {"model.onnx", "manifest.json"} and "attention.py" in info["plugins"]
    assert info["files"]["model.onnx"]["bytes"] == (art / "model.onnx").stat().st_size
    assert len(info["files"]["model.onnx"]["sha256"]) == 64
    unpacked, got = unpack(bundle, tmp_path / "out")
    assert unpacked == tmp_path / "out" / "artifact" and got == info
    for name in info["files"]:
        assert (unpacked / name).read_bytes() == (art / name).read_bytes()
    assert (tmp_path / "out" / "plugins" / "attention.py").read_bytes() == (REPO / "plugins/attention.py").read_bytes()
    assert json.loads((tmp_path / "out" / BUNDLE_JSON).read_text()) == info
    assert open_artifact(unpacked).decoder.lowering == "trt-native"


def test_bundle_refuses_ort_graph(artifacts, tmp_path):
    with pytest.raises(ArtifactError, match="TensorRT cannot build"):
        pack(artifacts("qwen2_window"), tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


@pytest.mark.parametrize("kv_mode, edit, message", [
    ("concat", lambda m: None, "KV mode is 'concat'"),  # a real concat graph (its manifest must match it)
    ("static", lambda m: (m["graphs"]["decoder"].update(lowering="reference"),
                          m.update(quantization={"scheme": "int8", "group_size": 32, "tensors": {}})),
     "--quantize int8 weights as int8-stored integers"),
], ids=["concat_kv", "quantized_reference"])
def test_bundle_refuses_what_tensorrt_cannot_build(kv_mode, edit, message, artifacts, tmp_path):
    """What `export build --backend tensorrt` refuses up front, `export bundle` refuses too, instead of the device
    failing in TensorRT after unpacking (kOPT mismatches, 'Quantized constant ... only allowed before DQ')."""
    root = _tampered(artifacts("qwen2_window", kv_mode, lowering="trt-native"), tmp_path,
                     lambda root, m: edit(m))
    with pytest.raises(ArtifactError, match=message):
        pack(root, tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def _resealed(bundle: Path, path: Path, edit) -> Path:
    """A copy of `bundle` whose members edit(files: name -> bytes) changed, with bundle.json's sizes and sha256s
    recomputed: it unpacks cleanly, so only the device's checks against the bundled manifest can catch the edit."""
    import hashlib

    entries = _entries(bundle)
    index = json.loads(entries[0][1])
    files = {i.name: d for i, d in entries[1:]}
    edit(files)
    index["files"] = {n.removeprefix("artifact/"): {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                      for n, d in files.items() if n.startswith("artifact/")}
    return _write_tar(path, [_file(BUNDLE_JSON, json.dumps(index).encode())]
                      + [_file(n, d) for n, d in files.items()])


def _retoken(files):
    files["artifact/tokenizer_config.json"] = files["artifact/tokenizer_config.json"].replace(b"eos_token",
                                                                                                b"eos_tokem")


@needs_trt
@pytest.mark.parametrize("edit, message", [
    (_retoken, "'tokenizer_config.json' does not match its sha256 in the bundled manifest"),
    (lambda f: f.update({"artifact/chat_template.jinja": b"{{ messages }} injected"}),
     "'chat_template.jinja' is in the bundle but not in the bundled manifest"),
    (lambda f: f.pop("artifact/tokenizer.json"), "'tokenizer.json' listed in the bundled manifest is missing"),
    (lambda f: f.update({"artifact/unpacked": b"x"}), "'unpacked' would collide"),
], ids=["changed", "unlisted", "missing", "staging_name"])
def test_engine_refuses_files_the_bundled_manifest_does_not_seal(edit, message, bundle, tmp_path, capsys):
    """A bundle whose index was recomputed around an edit unpacks, but the device checks its files against the
    bundled manifest before building: the engine artifact's new manifest re-hashes whatever is there, so a changed
    or unlisted file would be sealed in as the build's own, and a listed one silently dropped."""
    from export.__main__ import main

    bad = _resealed(bundle, tmp_path / "bad.tar", edit)
    assert main(["engine", str(bad), "--out", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "art").exists()


def test_tampered_bundle_refused(bundle, tmp_path):
    bad = _write_tar(tmp_path / "bad.tar", [
        _file(i.name, d.replace(b"eos_token", b"eos_tokem")) if i.name == "artifact/tokenizer_config.json" else (i, d)
        for i, d in _entries(bundle)])
    with pytest.raises(ArtifactError, match="tokenizer_config.json' does not match its sha256"):
        unpack(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # removed again, not left half-written
    with pytest.raises(ArtifactError, match="not found"):
        unpack(tmp_path / "nope.tar", tmp_path / "out2")
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    with pytest.raises(ArtifactError, match="not a readable bundle"):
        unpack(tmp_path / "junk.tar", tmp_path / "out3")
    assert not (tmp_path / "out3").exists()


# ---- the CVE-2025-4517 symlink chain -------------------------------------------------------------------------------

def test_symlink_chain_poc_escapes_tarfile_data_filter_here(tmp_path):
    """Shows the PoC below is the real thing: on this Python, tarfile's own data filter lets it write outside
    (skipped where tarfile is patched). It writes only under tmp_path."""
    dest = tmp_path / "a" / "dest"
    poc = _write_tar(tmp_path / "poc.tar", _poc_entries(dest, up=2))
    (tmp_path / "outside").mkdir()
    (tmp_path / "a").mkdir()
    try:
        with tarfile.open(poc) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as e:
        pytest.skip(f"this Python's tarfile refuses the PoC ({type(e).__name__}); edge.unpack must still")
    assert (tmp_path / "outside" / "pwned").exists()


def test_symlink_chain_bypass_refused(bundle, tmp_path, outside):
    index = next(e for e in _entries(bundle) if e[0].name == BUNDLE_JSON)  # a valid index
    dest = tmp_path / "a" / "dest"  # dest/<link>/../.. is tmp_path: 'escape' points at tmp_path/outside
    poc = _write_tar(tmp_path / "poc.tar", [index, *_poc_entries(dest, up=2)])
    (tmp_path / "a").mkdir()
    with pytest.raises(ArtifactError, match=r"member '.*' (is a directory that bundle.json does not list|is a "
                                            r"symbolic link)"):
        unpack(poc, dest)
    assert list(outside.iterdir()) == []
    assert not dest.exists()


@needs_trt
def test_symlink_chain_bypass_refused_by_cli(bundle, tmp_path, outside):
    index = next(e for e in _entries(bundle) if e[0].name == BUNDLE_JSON)  # a valid index
    out = tmp_path / "engine-out"
    # export engine unpacks into .<out>.partial-<pid>-<8 chars>/unpacked beside out: two levels up from there is
    # tmp_path, beside 'outside'
    staging = tmp_path / f".engine-out.partial-{os.getpid()}-abcdefgh" / "unpacked"
    poc = _write_tar(tmp_path / "poc.tar", [index, *_poc_entries(staging, up=2)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "export", "engine", str(poc), "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert "error:" in r.stderr and "poc.tar" in r.stderr
    assert list(outside.iterdir()) == []
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar", "outside", "poc.tar"]  # no staging left over


# ---- members that are not plain listed regular files ---------------------------------------------------------------

def _replace(entries, name, new):
    return [new if info.name == name else (info, data) for info, data in entries]


def _cases(outside: Path):
    tok = "artifact/tokenizer.json"  # a listed name: only the member's type can be what refuses these
    return {
        "symlink": (lambda e: _replace(e, tok, _special(tok, tarfile.SYMTYPE, str(outside / "x"))),
                    "tokenizer.json' is a symbolic link"),
        "hardlink": (lambda e: _replace(e, tok, _special(tok, tarfile.LNKTYPE, "/etc/passwd")),
                     "tokenizer.json' is a hard link"),
        "chardev": (lambda e: _replace(e, tok, _special(tok, tarfile.CHRTYPE)), "tokenizer.json' is a device"),
        "blockdev": (lambda e: _replace(e, tok, _special(tok, tarfile.BLKTYPE)), "tokenizer.json' is a device"),
        "fifo": (lambda e: _replace(e, tok, _special(tok, tarfile.FIFOTYPE)), "tokenizer.json' is a FIFO"),
        "absolute": (lambda e: [*e, _file(str(outside / "abs.txt"), b"x")], "is an absolute path"),
        "dotdot": (lambda e: [*e, _file("artifact/../../outside/dotdot.txt", b"x")],
                   "is not a plain relative name"),
        "unlisted": (lambda e: [*e, _file("artifact/extra.txt", b"x")], "'artifact/extra.txt' is not listed"),
        "unlisted_dir": (lambda e: [*e, _special("artifact/sub", tarfile.DIRTYPE)],
                         "'artifact/sub' is a directory that bundle.json does not list"),
        "duplicate": (lambda e: [*e, next(_file(i.name, d) for i, d in e if i.name == "artifact/manifest.json")],
                      "'artifact/manifest.json' appears twice"),
        "size": (lambda e: [_file(i.name, d + b" ") if i.name == tok else (i, d) for i, d in e],
                 r"tokenizer.json' is \d+ bytes but bundle.json says \d+"),
        "missing": (lambda e: [(i, d) for i, d in e if i.name != tok],
                    "'artifact/tokenizer.json' listed in bundle.json is missing"),
        "index_not_first": (lambda e: e[1:] + e[:1], "first member is not bundle.json"),
        "index_huge": (lambda e: _with_index(e, lambda ix: json.dumps(ix).encode() + b" " * MAX_INDEX_BYTES),
                       "'bundle.json' is \\d+ bytes, over the limit"),
        "index_not_json": (lambda e: _with_index(e, lambda ix: b"{not json"), "'bundle.json' is not valid JSON"),
        "index_too_deep": (lambda e: _with_index(e, lambda ix: b"[" * 50_000 + b"]" * 50_000),
                           "'bundle.json' is not valid JSON \\(nested too deeply"),
        "index_old_version": (lambda e: _with_index(e, lambda ix: ix.update(format_version=1)),
                              "bundle format version 1 is not supported"),
        "index_unsafe_name": (lambda e: _with_index(e, lambda ix: ix["files"].update({"../x": {"bytes": 1,
                                                                                              "sha256": "0" * 64}})),
                              r"'\.\./x' is not a plain relative name"),
        "index_reserved_name": (lambda e: _with_index(e, lambda ix: ix["files"].update({"plugins/x.py": {
            "bytes": 1, "sha256": "0" * 64}})), "'plugins/x.py' would collide"),
        "index_bad_entry": (lambda e: _with_index(e, lambda ix: ix["files"]["tokenizer.json"].update(bytes="7")),
                            "'tokenizer.json' must be"),
        "index_symlink": (lambda e: _replace(e, BUNDLE_JSON, _special(BUNDLE_JSON, tarfile.SYMTYPE, "/etc/passwd")),
                          "'bundle.json' is a symbolic link"),
    }


CASES = list(_cases(Path("/unused")))


@pytest.mark.parametrize("case", CASES)
def test_hostile_member_refused(case, bundle, tmp_path, outside):
    build, message = _cases(outside)[case]
    bad = _write_tar(tmp_path / "bad.tar", build(_entries(bundle)))
    dest = tmp_path / "out"
    with pytest.raises(ArtifactError, match=message):
        unpack(bad, dest)
    assert list(outside.iterdir()) == []
    assert not dest.exists()


def test_total_size_limit(bundle, tmp_path):
    unpack(bundle, tmp_path / "ok", max_bytes=os.path.getsize(bundle))  # the tar is larger than its contents
    with pytest.raises(ArtifactError, match=r"lists \d+ bytes in all, over the limit of 1000 bytes"):
        unpack(bundle, tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "out").exists()
    assert edge.MAX_BUNDLE_BYTES == 64 << 30


# ---- symlinks planted in the destination ---------------------------------------------------------------------------

def test_existing_destination_refused(bundle, tmp_path, outside):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "artifact").symlink_to(outside)
    with pytest.raises(ArtifactError, match="already exists"):
        unpack(bundle, dest)
    assert list(outside.iterdir()) == []
    assert (dest / "artifact").is_symlink()  # not ours: left alone


def test_symlink_planted_during_unpack_refused(bundle, tmp_path, outside, monkeypatch):
    """Someone with write access to dest swaps dest/artifact for a link to elsewhere while unpack runs: every
    component is opened with O_NOFOLLOW, so the kernel refuses instead of writing through the link."""
    dest = tmp_path / "out"
    real_create = edge.create_inside

    def racing_create(root_fd, rel, what):
        if rel.startswith("artifact/") and not (dest / "artifact").is_symlink():
            os.rmdir(dest / "artifact")
            (dest / "artifact").symlink_to(outside)
        return real_create(root_fd, rel, what)

    monkeypatch.setattr(edge, "create_inside", racing_create)
    with pytest.raises(ArtifactError, match="cannot enter 'artifact'"):
        unpack(bundle, dest)
    assert list(outside.iterdir()) == []
    assert not dest.exists()


# ---- manifests naming files outside the artifact -------------------------------------------------------------------

def _tampered(art: Path, tmp_path: Path, edit) -> Path:
    """A private copy of `art` whose manifest was edited and re-checksummed, so no checksum catches the edit."""
    root = tmp_path / "art"
    shutil.copytree(art, root)
    m = json.loads((root / "manifest.json").read_text())
    edit(root, m)
    write_manifest(root, {k: v for k, v in m.items() if k not in ("format", "format_version", "files")})
    return root


def _graph_file(name):
    def edit(root, m):
        m["graphs"]["decoder"]["file"] = name
    return edit


def _symlinked_tokenizer(root, m):
    (root.parent / "secret.json").write_text('{"secret": 1}')
    (root / "tokenizer.json").unlink()
    (root / "tokenizer.json").symlink_to(root.parent / "secret.json")


def _graph_in_symlinked_dir(root, m):
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(root / "model.onnx", elsewhere / "model.onnx")
    (root / "sub").symlink_to(elsewhere)
    m["graphs"]["decoder"]["file"] = "sub/model.onnx"


@pytest.mark.parametrize("guard", ["open_artifact", "pack_itself"])
@pytest.mark.parametrize("edit, message", [
    (_graph_file("../x"), r"'\.\./x' is not a plain relative name"),
    (_graph_file("/etc/passwd"), "'/etc/passwd' is an absolute path"),
    (_symlinked_tokenizer, "'tokenizer.json' goes through a symlink"),
    (_graph_in_symlinked_dir, "'sub/model.onnx' (goes through a symlink|is not among the checksummed files)"),
    (_graph_file("bundle.json"), "'bundle.json' (would collide|is not among the checksummed files)"),
], ids=["dotdot", "absolute", "symlinked_member", "symlinked_dir", "reserved"])
def test_pack_refuses_names_outside_the_artifact(edit, message, guard, artifacts, tmp_path, monkeypatch):
    """open_artifact (artifacts/bundle.py) checks the manifest's names; pack checks every name it packs again, so
    with open_artifact reduced to reading the JSON, pack alone must still refuse."""
    (tmp_path / "x").write_text("outside the artifact")  # what '../x' would pack
    root = _tampered(artifacts("qwen2_window", "static", lowering="trt-native"), tmp_path, edit)
    if guard == "pack_itself":
        from artifacts.manifest import Manifest  # the JSON typed, without bundle.py's path checks

        monkeypatch.setattr(edge, "open_artifact",
                            lambda r: Manifest.from_dict(json.loads((Path(r) / "manifest.json").read_text())))
    with pytest.raises(ArtifactError, match=message):
        pack(root, tmp_path / "b.tar")
    assert not (tmp_path / "b.tar").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.tar")]  # no temp file left


# ---- what `export bundle` writes over, and the settings `export engine` builds with ------------------------------

def test_bundle_out_rules(artifacts, tmp_path, capsys):
    """--out is never a file the command did not write (an existing file, a symlink's target, a file inside the
    artifact being packed): exit 2, and the file is unchanged; --overwrite replaces only a bundle of ours; a failed
    pack leaves no parent directories behind."""
    from export.__main__ import main

    art = artifacts("qwen2_window", "static", lowering="trt-native")
    mine, victim = tmp_path / "mine.txt", tmp_path / "victim.txt"
    mine.write_text("precious")
    victim.write_text("precious")
    (tmp_path / "link.tar").symlink_to(victim)
    graph_before = (art / "model.onnx").read_bytes()
    for out, words in ((mine, "already exists"), (tmp_path / "link.tar", "is a symlink"),
                       (art / "model.onnx", "is inside the artifact being packed"), (art / "sub" / "b.tar", "inside")):
        assert main(["bundle", str(art), "--out", str(out)]) == 2
        assert words in capsys.readouterr().err
    assert main(["bundle", str(art), "--out", str(mine), "--overwrite"]) == 2
    assert "is not a bundle this tool wrote" in capsys.readouterr().err
    assert mine.read_text() == victim.read_text() == "precious" and (art / "model.onnx").read_bytes() == graph_before
    assert not (art / "sub").exists()
    out = tmp_path / "new" / "b.tar"
    assert main(["bundle", str(art), "--out", str(out)]) == 0 and tarfile.open(out).getnames()[0] == BUNDLE_JSON
    assert main(["bundle", str(art), "--out", str(out)]) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["bundle", str(art), "--out", str(out), "--overwrite"]) == 0
    assert oct(out.stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("overwrite", [False, True])
def test_bundle_out_appearing_while_packing_is_not_replaced(overwrite, artifacts, tmp_path, monkeypatch):
    """--out is checked when the pack starts and again when it ends (a real model packs for minutes): a file that
    appeared meanwhile is the user's, kept with or without --overwrite, and no temp file is left beside it."""
    art = artifacts("qwen2_window", "static", lowering="trt-native")
    out = tmp_path / "b.tar"
    read = edge._HashingReader.read

    def appear(self, n=-1):  # while the tar is written: someone else's file lands at --out
        if not out.exists():
            out.write_text("precious user data")
        return read(self, n)

    monkeypatch.setattr(edge._HashingReader, "read", appear)
    with pytest.raises(ArtifactError, match="appeared while the bundle was being packed"):
        pack(art, out, overwrite=overwrite)
    assert out.read_text() == "precious user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar"]


@needs_trt
@pytest.mark.parametrize("edit", [{"kv_mode": "concat"}, {"max_seq_len": 10 ** 12}, {"precision": "int3"},
                                  {"max_batch": 1}])
def test_engine_builds_from_the_manifest_settings(edit, bundle, tmp_path, capsys):
    """bundle.json's build settings must be the bundled manifest's: an edited index is refused (exit 2) instead of
    building an engine whose profiles contradict the manifest (or crashing TensorRT on a 10^12 dim)."""
    from export.__main__ import main

    bad = _write_tar(tmp_path / "edited.tar", _with_index(_entries(bundle), lambda index: index.update(edit)))
    assert main(["engine", str(bad), "--out", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    key = next(iter(edit))
    assert "does not match the bundled manifest" in err and key in err and "Traceback" not in err, err
    assert not (tmp_path / "art").exists()


@needs_trt
def test_engine_shapes_past_tensorrt_limits_are_an_engine_error(artifacts, tmp_path):
    from export.engine import EngineError, build_engine

    art = artifacts("qwen2_window", "static", lowering="trt-native")
    with pytest.raises(EngineError, match="refused the shapes"):
        build_engine(art / "model.onnx", tmp_path / "x.engine", "static", 1, 10 ** 12)


@needs_trt
def test_signal_during_the_onnx_parse_is_raised_after_it(artifacts, tmp_path, monkeypatch):
    """A SIGTERM that arrives while TensorRT's ONNX parser calls our logger (a large graph parses for a while) is
    deferred to the end of the parse and then raised; before, Python raised it inside the logger callback, where
    TensorRT caught it ('Exception caught in log()') and the engine was built with exit 0."""
    import signal

    import export.engine as engine_mod

    class Stop(Exception):
        pass

    real, fired = engine_mod.stderr_logger, []

    def logger(trt):
        base = real(trt)
        log = type(base).log

        def sending(self, severity, msg):
            if not fired and "ModelImporter" in str(msg):  # the parser's own messages: it is parsing now
                fired.append(msg)
                os.kill(os.getpid(), signal.SIGTERM)
            return log(self, severity, msg)

        type(base).log = sending
        return base

    def stop(signum, frame):
        raise Stop

    monkeypatch.setattr(engine_mod, "stderr_logger", logger)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        art = artifacts("qwen2_window", "static", lowering="trt-native")
        with pytest.raises(Stop):
            engine_mod.build_engine(art / "model.onnx", tmp_path / "x.engine", "static", 1, 128)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert fired and not (tmp_path / "x.engine").exists()
