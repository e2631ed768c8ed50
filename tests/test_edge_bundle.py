"""Edge bundles round-trip: pack an artifact, unpack it elsewhere, build the engine there (TensorRT-RTX on CI, no
GPU needed to build), verify it against the manifest; tampering and unbuildable graphs are refused."""

from __future__ import annotations

import json
import tarfile

import pytest

from artifacts.bundle import ArtifactError, open_artifact
from artifacts.edge import pack, unpack
from tests.test_engine import needs_trt


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
    assert m["backend"] == "tensorrt" and (built / m["engine"]["file"]).stat().st_size > 0
    assert [t["name"] for t in m["engine"]["io"]["inputs"]] == [t["name"] for t in m["graphs"]["decoder"]["inputs"]]
    assert m["engine"]["profiles"]["prefill"]["sequence"][2] == m["max_seq_len"]


def test_bundle_refuses_ort_graph(artifacts, tmp_path):
    with pytest.raises(ArtifactError, match="TensorRT cannot build"):
        pack(artifacts("qwen2_window"), tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_tampered_bundle_refused(artifacts, tmp_path):
    art = artifacts("qwen2_window", "static", lowering="trt-native")
    bundle = pack(art, tmp_path / "b.tar")
    # rewrite the tar with a changed graph file
    bad = tmp_path / "bad.tar"
    with tarfile.open(bundle) as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "artifact/tokenizer_config.json":
                data = data.replace(b"eos_token", b"eos_tokem")
            member.size = len(data)
            import io

            dst.addfile(member, io.BytesIO(data))
    with pytest.raises(ArtifactError, match="tokenizer_config.json' is missing or does not match"):
        unpack(bad, tmp_path / "out")
    with pytest.raises(ArtifactError, match="not found"):
        unpack(tmp_path / "nope.tar", tmp_path / "out2")
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    with pytest.raises(ArtifactError, match="not a readable bundle"):
        unpack(tmp_path / "junk.tar", tmp_path / "out3")
    info = json.loads(tarfile.open(bundle).extractfile("bundle.json").read())
    assert info["lowering"] == "trt-native" and set(info["files"]) >= {"model.onnx", "manifest.json"}
