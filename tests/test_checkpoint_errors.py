"""Every bad input gives a specific, clear error, never a traceback from deep inside torch or a silent mis-load.

Covers the Python API (resolve_model, Checkpoint, load_spec, load_model) and the CLI (`export.__main__.main`, which
must print `error: ...` and return 2; argparse rejections exit with status 2): missing directories, presets and HF
repo ids (with a fake offline HF cache built under tmp_path), truncated/corrupt/pickle-only/inconsistent
safetensors, tensors of a dtype we do not take (F64, ints: the message lists F32, F16, BF16), configs we refuse
(unknown model type, RoPE types, dual-chunk attention, unknown fields, missing or contradicting fields, bad JSON, a
config.json that is not an object, max_position_embeddings -1 naming the field rather than --max-seq-len; the table
of wrong types per field is in test_config_fields.py), NaN/Inf weights and fp32 weights that overflow an fp16 build
(refused while they stream, naming tensor and file; the build leaves nothing behind), a real `python -m export
build` subprocess (exit 2, `error:`, no traceback) and extra tensors (a warning naming them, loading still works).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.__main__ import main
from export.checkpoint import Checkpoint, CheckpointError, resolve_model
from export.model import load_model
from export.options import MAX_VERIFY_STEPS
from export.spec import UnsupportedConfigError, load_spec
from export.verify import run_ours
from tests.conftest import edit_config
from tests.helpers import PROMPT

REPO_ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # 40-hex commit hash for the fake HF cache


# --------------------------------------------------------------------------------------------------------------
# helpers



def edit_tensors(path: Path, fn, file: str = "model.safetensors") -> Path:
    tensors = load_file(str(path / file))
    fn(tensors)
    save_file(tensors, str(path / file), metadata={"format": "pt"})
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()  # drop what fixtures printed (e.g. save_pretrained progress bars)
    rc = main(["verify", *argv])
    return rc, capsys.readouterr().err


def cli_error(capsys, model: Path | str, *extra: str) -> str:
    """Run `verify` on a bad model; assert the CLI contract (exit 2, one `error: ...` line) and return stderr."""
    rc, err = run_cli(capsys, "--model", str(model), "--steps", "0", *extra)
    assert rc == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    return err


def fake_hf_cache(root: Path, repo_id: str, files_from: Path | None = None) -> Path:
    """The offline HF hub cache layout: models--org--name/{refs/main, snapshots/<hash>/...}. Returns the snapshot."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / SNAPSHOT
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(SNAPSHOT)  # no trailing newline: the hub reads it verbatim
    if files_from is not None:
        for f in files_from.iterdir():
            (snap / f.name).write_bytes(f.read_bytes())
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache, active for this test. huggingface_hub reads HF_HUB_CACHE once at import (into
    `huggingface_hub.constants`), so the env var alone is too late in-process: patch both."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------------------------------------------
# finding the model

def test_missing_directory(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=r"no_such_model: checkpoint directory does not exist"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="checkpoint directory does not exist"):
        load_spec(missing)
    with pytest.raises(CheckpointError, match="checkpoint directory does not exist"):
        Checkpoint(missing)
    with pytest.raises(CheckpointError, match=r"model '.*no_such_model' not found.*a local directory.*\(not found\)"):
        resolve_model(str(missing))
    err = cli_error(capsys, missing)
    assert "no_such_model" in err and "not found" in err


def test_directory_without_config(copy_checkpoint):
    path = copy_checkpoint("qwen2_window")
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found in the checkpoint directory"):
        load_model(path)


def test_unknown_name_lists_presets_and_tiny(hf_cache, capsys):
    with pytest.raises(CheckpointError, match=r"model 'not-a-model' not found.*presets \(.*qwen2-0\.5b.*tiny-qwen2"):
        resolve_model("not-a-model")
    err = cli_error(capsys, "not-a-model")
    assert "not-a-model" in err and "hf download" in err


def test_preset_not_in_hf_cache(hf_cache, capsys):
    with pytest.raises(CheckpointError) as e:
        resolve_model("qwen2-0.5b")
    msg = str(e.value)
    assert "preset 'qwen2-0.5b' -> 'Qwen/Qwen2-0.5B'" in msg
    assert "HF cache (offline) for 'Qwen/Qwen2-0.5B' (not cached)" in msg
    assert "hf download Qwen/Qwen2-0.5B --include '*.json' --include '*.safetensors'" in msg
    err = cli_error(capsys, "Qwen2-0.5B".lower())
    assert "Qwen/Qwen2-0.5B" in err and "hf download Qwen/Qwen2-0.5B" in err
    # a repo id (not a preset) that is not cached: named the same way
    with pytest.raises(CheckpointError, match=r"'someorg/missing-model' \(not cached\).*hf download someorg/missing"):
        resolve_model("someorg/missing-model")


def test_hf_repo_id_in_local_cache_resolves(hf_cache, checkpoints, capsys):
    from huggingface_hub import snapshot_download

    snap = fake_hf_cache(hf_cache, "someorg/tiny-qwen2", files_from=checkpoints("qwen2_window"))
    # the layout really is what huggingface_hub finds offline
    assert Path(snapshot_download("someorg/tiny-qwen2", local_files_only=True)) == snap
    assert resolve_model("someorg/tiny-qwen2") == snap
    model, spec = load_model(resolve_model("someorg/tiny-qwen2"))
    assert spec.model_type == "qwen2" and spec.num_layers == 3
    # a preset resolves through the cache under its repo id, case-insensitively
    preset_snap = fake_hf_cache(hf_cache, "Qwen/Qwen2-0.5B", files_from=checkpoints("qwen2_window"))
    assert resolve_model("qwen2-0.5b") == preset_snap == resolve_model("Qwen2-0.5B")
    assert resolve_model("Qwen/Qwen2-0.5B") == preset_snap
    rc, _ = run_cli(capsys, "--model", "someorg/tiny-qwen2", "--steps", "1")
    assert rc == 0


def test_hf_cache_env_var_in_a_fresh_process(tmp_path, checkpoints):
    """End to end with the real env var (read at import): HF_HOME set before Python starts."""
    fake_hf_cache(tmp_path / "home" / "hub", "someorg/envmodel", files_from=checkpoints("qwen2_window"))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    code = ("from export.checkpoint import resolve_model; print(resolve_model('someorg/envmodel')); "
            "import sys\ntry:\n    resolve_model('someorg/other')\nexcept Exception as e:\n    print(type(e).__name__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines == [str(tmp_path / "home" / "hub" / "models--someorg--envmodel" / "snapshots" / SNAPSHOT),
                     "CheckpointError"]


# --------------------------------------------------------------------------------------------------------------
# broken safetensors

def test_truncated_safetensors(copy_checkpoint, capsys):
    path = copy_checkpoint("qwen2_window")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file \(truncated or "
                                              r"corrupt\?\).*incomplete metadata"):
        load_model(path)
    assert "not a readable safetensors file (truncated or corrupt?)" in cli_error(capsys, path)


@pytest.mark.parametrize("kind", ["garbage", "bad_json_header", "empty"])
def test_corrupt_header(kind, copy_checkpoint, capsys):
    path = copy_checkpoint("qwen2_window")
    f = path / "model.safetensors"
    data = f.read_bytes()
    if kind == "garbage":
        f.write_bytes(b"\xde\xad\xbe\xef" * 16 + data[64:])
    elif kind == "bad_json_header":
        n = struct.unpack("<Q", data[:8])[0]
        f.write_bytes(data[:8] + b"{not json" + b" " * (n - 9) + data[8 + n:])
    else:
        f.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        Checkpoint(path)
    assert "not a readable safetensors file" in cli_error(capsys, path)


def test_missing_tensor(copy_checkpoint, capsys):
    path = edit_tensors(copy_checkpoint("qwen2_window"),
                        lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"checkpoint does not match config.json:\n  missing tensor "
                                              r"'model\.layers\.1\.self_attn\.k_proj\.weight' \(needed for "
                                              r"layers\.1\.attn\.k\.weight\)"):
        load_model(path)
    assert "missing tensor 'model.layers.1.self_attn.k_proj.weight'" in cli_error(capsys, path)


def test_wrong_shape(copy_checkpoint):
    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:50].clone()

    path = edit_tensors(copy_checkpoint("qwen2_window"), shrink)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' has shape \[50, 64\], "
                                              r"expected \[96, 64\] from config.json"):
        load_model(path)


def test_many_problems_are_summarised(copy_checkpoint):
    path = edit_tensors(copy_checkpoint("qwen2_window"),
                        lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.")])
    with pytest.raises(CheckpointError, match=r"(?s)missing tensor .*\.\.\. and \d+ more"):
        load_model(path)


def test_non_float_dtype(copy_checkpoint):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int64)

    path = edit_tensors(copy_checkpoint("qwen2_window"), to_int)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' has dtype I64 \(torch\.int64\); "
                                              r"accepted: F32, F16, BF16"):
        load_model(path)


def test_f64_tensor_says_what_is_accepted(copy_checkpoint, capsys):
    path = edit_tensors(copy_checkpoint("qwen3_moe_mixed"), lambda t: t.update(
        {"model.layers.1.mlp.experts.3.up_proj.weight": t["model.layers.1.mlp.experts.3.up_proj.weight"].double()}))
    msg = "tensor 'model.layers.1.mlp.experts.3.up_proj.weight' has dtype F64 (torch.float64); accepted: F32, F16, BF16"
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert msg in str(e.value)
    assert msg in cli_error(capsys, path)


def test_unsupported_dtype(copy_checkpoint):
    def to_int16(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int16)

    path = edit_tensors(copy_checkpoint("qwen2_window"), to_int16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has unsupported "
                                              r"dtype I16; accepted: F32, F16, BF16 for weights"):
        Checkpoint(path)


class _Boom:
    """Unpickling this would create a file: proves the loader never unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_directory_is_refused(copy_checkpoint, tmp_path, capsys):
    path = copy_checkpoint("qwen2_window")
    marker = tmp_path / "unpickled"
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(CheckpointError, match=r"only pickle checkpoint files found \(pytorch_model\.bin\)\. We load "
                                              r"safetensors only"):
        load_model(path)
    err = cli_error(capsys, path)
    assert "safetensors only" in err and "save_pretrained" in err
    assert not marker.exists()


def test_directory_without_weights(copy_checkpoint):
    path = copy_checkpoint("qwen2_window")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors, shard index or \\*.safetensors file found"):
        load_model(path)


@pytest.mark.parametrize("shard", ["", ".."])
def test_shard_named_after_the_directory_itself_is_refused(copy_checkpoint, capsys, shard):
    # "" was the checkpoint directory ("No such device (os error 19)"); ".." its parent, reported as a symlink
    path = copy_checkpoint("qwen2_sharded")
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.extra"] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"shard names must be plain file names in the directory"):
        load_model(path)
    assert "shard names must be plain file names" in cli_error(capsys, path)


def test_dangling_shard_index_is_refused_not_skipped(copy_checkpoint, capsys):
    # an HF snapshot whose index blob never arrived: the shards were globbed instead, a model transformers won't load
    path = copy_checkpoint("qwen2_sharded")
    index = path / "model.safetensors.index.json"
    index.unlink()
    index.symlink_to(path / "blob-never-downloaded")
    with pytest.raises(CheckpointError, match=r"index\.json: a link to a file that does not exist"):
        load_model(path)
    assert "a link to a file that does not exist" in cli_error(capsys, path)


def test_shard_index_lists_missing_shard(copy_checkpoint, capsys):
    path = copy_checkpoint("qwen2_sharded")
    shards = sorted(path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: shard file\(s\) listed but missing: "
                                              rf"\['{shards[-1].name}'\]"):
        load_model(path)
    assert f"listed but missing: ['{shards[-1].name}']" in cli_error(capsys, path)


@pytest.mark.parametrize("index, match", [
    ("{not json", r"not a valid safetensors index"),
    ("[" * 100_000 + "]" * 100_000, r"not a valid safetensors index \(nested too deeply"),
    ('{"metadata": {}}', r"not a valid safetensors index \('weight_map'\)"),
    ('{"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}', r"shard names must be plain file names"),
])
def test_bad_shard_index(index, match, copy_checkpoint):
    path = copy_checkpoint("qwen2_sharded")
    (path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=match):
        Checkpoint(path)


def test_tensor_stored_in_two_shards(copy_checkpoint):
    path = copy_checkpoint("qwen2_sharded")
    first, second = sorted(path.glob("model-*.safetensors"))[:2]
    dup = next(iter(load_file(str(first))))
    edit_tensors(path, lambda t: t.update({dup: torch.zeros(1)}), file=second.name)
    with pytest.raises(CheckpointError, match=rf"tensor '{dup}' is stored twice"):
        Checkpoint(path)


def test_shard_index_naming_absent_tensor(copy_checkpoint):
    """The index promises a tensor its shard lacks: reported as missing, by name."""
    path = copy_checkpoint("qwen2_sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj.bias"
    shard = index["weight_map"][name]
    edit_tensors(path, lambda t: t.pop(name), file=shard)
    with pytest.raises(CheckpointError, match=rf"missing tensor '{name}'"):
        load_model(path)


def test_extra_tensors_warn_but_load(copy_checkpoint, checkpoints, capsys):
    extra = ["model.layers.0.self_attn.extra_proj.weight", "vision_tower.patch_embed.weight"]
    path = edit_tensors(copy_checkpoint("qwen2_window"),
                        lambda t: t.update({n: torch.ones(3, 4) for n in extra}))
    model, _ = load_model(path)
    err = capsys.readouterr().err
    assert f"warning: 2 checkpoint tensor(s) not used by the model: {extra[0]}, {extra[1]}" in err
    ref, _ = load_model(checkpoints("qwen2_window"))
    assert torch.equal(run_ours(model, PROMPT, 0).logits[0], run_ours(ref, PROMPT, 0).logits[0])


def test_rotary_inv_freq_buffers_are_not_reported(copy_checkpoint, capsys):
    path = edit_tensors(copy_checkpoint("qwen2_window"),
                        lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(path)
    assert "warning" not in capsys.readouterr().err


def test_tied_config_with_a_different_stored_head(copy_checkpoint, capsys):
    """transformers would silently untie here (it keeps the stored head); we use the embedding, so we refuse."""
    path = edit_config(copy_checkpoint("qwen2_window"), lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings=true but the checkpoint's 'lm_head\.weight' "
                                              r"differs from 'model\.embed_tokens\.weight'"):
        load_model(path)
    # the same head stored twice (as some tied checkpoints do) is fine and not reported as unexpected
    edit_tensors(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    load_model(path)
    assert "warning" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# configs we refuse

def _refused(path: Path, match: str, capsys=None) -> None:
    with pytest.raises(UnsupportedConfigError, match=match):
        load_spec(path)
    with pytest.raises(UnsupportedConfigError, match=match):
        load_model(path)
    if capsys is not None:
        assert cli_error(capsys, path)


def test_unknown_model_type(copy_checkpoint, capsys):
    path = edit_config(copy_checkpoint("qwen2_window"), lambda c: c.update(model_type="llama"))
    _refused(path, r"model_type 'llama' is not supported; supported: \['gemma2', 'qwen2', 'qwen3_moe'\]")
    assert "model_type 'llama' is not supported" in cli_error(capsys, path)


def _v4_rope(c: dict, scaling: dict | None, theta: float = 10000.0) -> None:
    c.pop("rope_parameters", None)
    c["rope_theta"] = theta
    c["rope_scaling"] = scaling


@pytest.mark.parametrize("edit, rope_type", [
    (lambda c: _v4_rope(c, {"type": "dynamic", "factor": 2.0}), "dynamic"),
    (lambda c: _v4_rope(c, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64}), "llama3"),
    # a v4 rope_scaling next to a v5 rope_parameters: transformers uses rope_scaling, so must we
    (lambda c: c.update(rope_scaling={"type": "dynamic", "factor": 2.0}), "dynamic"),
    (lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                         "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}),
     "longrope"),
])
def test_unsupported_rope_type(edit, rope_type, copy_checkpoint, capsys):
    path = edit_config(copy_checkpoint("qwen2_window"), edit)
    _refused(path, rf"rope type '{rope_type}' \(rope_parameters\.rope_type / rope_scaling\.type\) is not supported; "
                   r"supported: default, linear, yarn")
    assert f"rope type '{rope_type}'" in cli_error(capsys, path)


def test_partial_rotary_factor(copy_checkpoint):
    path = edit_config(copy_checkpoint("qwen2_window"),
                       lambda c: c["rope_parameters"].update(partial_rotary_factor=0.5))
    _refused(path, "partial_rotary_factor != 1 is not supported")


def test_linear_rope_without_factor(copy_checkpoint):
    path = edit_config(copy_checkpoint("qwen2_window"), lambda c: _v4_rope(c, {"type": "linear"}))
    _refused(path, "linear rope scaling needs 'factor'")


def test_dual_chunk_attention(copy_checkpoint, capsys):
    path = edit_config(copy_checkpoint("qwen2_window"), lambda c: c.update(
        dual_chunk_attention_config={"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings":
                                     262144}))
    _refused(path, "dual_chunk_attention_config is not supported")
    assert "dual_chunk_attention_config" in cli_error(capsys, path)


def test_mrope(copy_checkpoint):
    _refused(edit_config(copy_checkpoint("qwen2_window"), lambda c: c.update(use_mrope=True)),
             r"use_mrope \(multimodal RoPE\) is not supported")


@pytest.mark.parametrize("case, qc, missing", [
    ("qwen2_window", {"quant_method": "gptq", "bits": 4}, "model.layers.0.mlp.down_proj.qweight"),
    ("gemma2", {"quant_method": "awq", "bits": 4}, "model.layers.0.mlp.down_proj.qweight"),
])
def test_quantization_config_on_float_weights(case, qc, missing, copy_checkpoint, capsys, tmp_path):
    """quantization_config is read (export/prequant_checkpoint.py): float weights under it are refused, naming the
    quantized tensor the config wants; verify refuses a pre-quantized checkpoint."""
    from export.__main__ import main as export_main

    path = edit_config(copy_checkpoint(case), lambda c: c.update({"quantization_config": qc}))
    assert export_main(["build", "--model", str(path), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "missing tensor(s) [" in err and missing in err and "Traceback" not in err, err
    assert not (tmp_path / "a").exists()
    assert "is pre-quantized" in cli_error(capsys, path)


@pytest.mark.parametrize("case, field, value", [
    ("qwen3_moe_mixed", "layer_types", ["full_attention"] * 4),  # qwen3_moe has no per-layer types
    ("qwen2_window", "some_future_switch", True),
])
def test_unknown_field_that_may_matter(case, field, value, copy_checkpoint, capsys):
    path = edit_config(copy_checkpoint(case), lambda c: c.update({field: value}))
    _refused(path, rf"unsupported field\(s\) \['{field}'\]; refusing to export rather than ignore something")
    assert f"unsupported field(s) ['{field}']" in cli_error(capsys, path)


@pytest.mark.parametrize("case, field", [
    ("qwen2_window", "hidden_size"), ("qwen2_window", "num_hidden_layers"), ("gemma2", "query_pre_attn_scalar"),
    ("gemma2", "vocab_size"), ("qwen3_moe_mixed", "num_experts_per_tok"), ("qwen3_moe_mixed", "moe_intermediate_size"),
    ("qwen3_moe_mixed", "max_position_embeddings"),
])
def test_missing_required_field(case, field, copy_checkpoint, capsys):
    path = edit_config(copy_checkpoint(case), lambda c: c.pop(field))
    _refused(path, rf"required field '{field}' is missing")
    assert f"required field '{field}' is missing" in cli_error(capsys, path)


@pytest.mark.parametrize("text", ['{"model_type": "qwen2", ', '{"a": ' * 100_000 + "1" + "}" * 100_000])
def test_invalid_json_config(text, copy_checkpoint, capsys):
    """Broken JSON, and JSON nested past Python's recursion limit (a RecursionError, not a ValueError, from json)."""
    path = copy_checkpoint("qwen2_window")
    (path / "config.json").write_text(text)
    _refused(path, r"config.json: not valid JSON \(")
    assert "not valid JSON" in cli_error(capsys, path)


@pytest.mark.parametrize("case, edit, match", [
    ("gemma2", lambda c: c.update(hidden_act="silu"),
     r"'hidden_act' = 'silu' contradicts 'hidden_activation' = 'gelu_pytorch_tanh'"),
    ("gemma2", lambda c: c.update(sliding_window_size=7),
     r"'sliding_window_size' = 7 contradicts 'sliding_window' = 5"),
    ("qwen3_moe_mixed", lambda c: c.update(num_experts=4), r"num_experts \(4\) and num_local_experts \(8\) disagree"),
    ("qwen2_window", lambda c: c.update(use_sliding_window=False),  # layer_types still says sliding
     r"layer 1 is sliding_attention but sliding_window is unset"),
    ("qwen2_window", lambda c: c.update(layer_types=["full_attention"] * 2), r"layer_types has 2 entries for 3 layers"),
    ("gemma2", lambda c: c.update(layer_types=["full_attention", "chunked_attention", "full_attention"]),
     r"layer_types\[1\] = 'chunked_attention' is not supported"),
    ("qwen2_window", lambda c: c.update(hidden_act="gelu"), r"activation 'gelu' is not supported"),
    ("qwen2_window", lambda c: c.update(num_key_value_heads=3), r"num_attention_heads 4 not a multiple of kv heads 3"),
    ("gemma2", lambda c: c.update(attention_bias=True), r"attention_bias=true is not supported for gemma2"),
    ("qwen3_moe_mixed", lambda c: c.update(attention_bias=True), r"attention_bias=true is not supported for qwen3_moe"),
])
def test_contradicting_or_unsupported_values(case, edit, match, copy_checkpoint):
    _refused(edit_config(copy_checkpoint(case), edit), match)


def test_agreeing_alias_fields_are_accepted(copy_checkpoint):
    """Real Gemma2 configs carry hidden_act / sliding_window_size next to the fields transformers reads."""
    path = edit_config(copy_checkpoint("gemma2"), lambda c: c.update(hidden_act="gelu_pytorch_tanh",
                                                                     sliding_window_size=5))
    assert load_spec(path).hidden_act == "gelu_tanh"


# --------------------------------------------------------------------------------------------------------------
# CLI argument values

@pytest.mark.parametrize("args, message", [
    (["--steps", "-1"], f"argument --steps: expected an integer in [0, {MAX_VERIFY_STEPS}], got '-1'"),
    (["--steps", "two"], f"argument --steps: expected an integer in [0, {MAX_VERIFY_STEPS}], got 'two'"),
    (["--prompt-ids", "a,b"], "expected comma-separated integers, got 'a,b'"),
    (["--kv-mode", "foo"], "invalid choice: 'foo'"),
])
def test_cli_bad_argument_values(args, message, checkpoints, capsys):
    with pytest.raises(SystemExit) as e:
        main(["verify", "--model", str(checkpoints("qwen2_window")), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_missing_model_argument(capsys):
    with pytest.raises(SystemExit) as e:
        main(["verify"])
    assert e.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_cli_prompt_ids_outside_vocab(checkpoints, capsys):
    err = cli_error(capsys, checkpoints("qwen2_window"), "--prompt-ids", "5,256,-1")
    assert "--prompt-ids: ids [256, -1] are outside the vocabulary [0, 256)" in err


@pytest.mark.parametrize("argv, match", [
    (["--max-seq-len", "1"], "argument --max-seq-len: expected an integer >= 2, got '1'"),
    (["--max-seq-len", "100000000"], "--max-seq-len 100000000: must be in"),
    (["--max-batch", "0"], "--max-batch"),
    (["--logits", "first"], "--logits"),
    (["--precision", "int3"], "--precision"),
    (["--precision", "bf16"], "ONNX Runtime has no bf16 kernels"),
    (["--logits", "all"], None),
])
def test_bad_build_values(argv, match, checkpoints, tmp_path, capsys):
    """Bad build options: exit 2 with a message naming the option, and no artifact directory left behind."""
    from export.__main__ import main

    out = tmp_path / "artifact"
    try:
        rc = main(["build", "--model", str(checkpoints("qwen2_window")), "--out", str(out), "--no-progress", *argv])
    except SystemExit as e:  # argparse rejects choices/types itself
        rc = e.code
    if match is None:  # a valid value, as a control: builds, and the option reached the manifest
        assert rc == 0 and json.loads((out / "manifest.json").read_text())["graphs"]["decoder"]["logits"] == "all"
        return
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------------------
# malformed config.json (the per-field table of wrong types and ranges is BAD in test_config_fields.py)

@pytest.mark.parametrize("text, match", [
    ('[{"model_type": "qwen2"}]',
     r"config.json: must be a JSON object \(\{\.\.\.\}\), got \[\{'model_type': 'qwen2'\}\] \(list\)"),
    ('"qwen2"', r"config.json: must be a JSON object \(\{\.\.\.\}\), got 'qwen2' \(str\)"),
    ("null", r"config.json: must be a JSON object \(\{\.\.\.\}\), got null"),
])
def test_config_that_is_not_an_object(text, match, copy_checkpoint, capsys):
    path = copy_checkpoint("qwen2_window")
    (path / "config.json").write_text(text)
    _refused(path, match)
    assert "must be a JSON object" in cli_error(capsys, path)


def test_model_type_of_the_wrong_type(copy_checkpoint):
    path = edit_config(copy_checkpoint("qwen2_window"), lambda c: c.update(model_type=["qwen2"]))
    _refused(path, r"model_type \['qwen2'\] is not supported; supported: \['gemma2', 'qwen2', 'qwen3_moe'\]")


def test_negative_max_position_embeddings_names_the_field_not_the_flag(copy_checkpoint, tmp_path, capsys):
    """No --max-seq-len was passed: the error is about config.json, not about a flag."""
    path = edit_config(copy_checkpoint("qwen2_window"), lambda c: c.update(max_position_embeddings=-1))
    out = tmp_path / "artifact"
    capsys.readouterr()
    assert main(["build", "--model", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: config.json: field 'max_position_embeddings' must be an integer >= 2, got -1 (int)" in err
    assert "--max-seq-len" not in err and not out.exists()


def _build_subprocess(model: Path, out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "export", "build", "--model", str(model), "--out", str(out),
                           "--no-progress", *extra], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=out.parent)


@pytest.mark.parametrize("field, value, shown", [
    ("tie_word_embeddings", "false", "must be true or false, got 'false' (str)"),
    ("num_hidden_layers", "2", "must be an integer in [1, 1024], got '2' (str)"),
])
def test_build_subprocess_refuses_a_wrong_type(field, value, shown, copy_checkpoint, tmp_path):
    """The real `python -m export build`: exit 2, one `error:` line naming field and value, no traceback, nothing
    written."""
    path = edit_config(copy_checkpoint("qwen2_window"), lambda c: c.update({field: value}))
    out = tmp_path / "artifact"
    r = _build_subprocess(path, out)
    assert r.returncode == 2, r.stderr
    assert f"error: config.json: field '{field}' {shown}" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["qwen2_window"]


# --------------------------------------------------------------------------------------------------------------
# non-finite weights: refused while they stream, naming the tensor and its file

def _poison(path: Path, name: str, value: float, count: int = 1) -> Path:
    """Write `value` into the first `count` entries of one tensor, keeping every other tensor as it was."""
    index = path / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"

    def edit(t):
        t[name].view(-1)[:count] = value

    return edit_tensors(path, edit, file=file)


@pytest.mark.parametrize("case, name, value, count, counts, build", [
    # build=True: also through `python -m export build`, once per way a weight reaches the graph file: a large one
    # is read by onnx_ir's writer, a small one (a norm) already by the graph optimizer (which wraps what it raises)
    ("qwen2_window", "model.layers.1.mlp.down_proj.weight", float("nan"), 3, "(3 NaN, 0 Inf)", True),
    ("qwen2_window", "model.norm.weight", float("inf"), 1, "(0 NaN, 1 Inf)", True),
    ("qwen3_moe_mixed", "model.layers.1.mlp.experts.5.down_proj.weight", float("-inf"), 2, "(0 NaN, 2 Inf)", False),
    ("gemma2", "model.embed_tokens.weight", float("nan"), 1, "(1 NaN, 0 Inf)", False),  # tied: embedding and head
    ("qwen2_sharded", "model.layers.0.self_attn.q_proj.bias", float("nan"), 1, "(1 NaN, 0 Inf)", False),
])
def test_non_finite_weight_is_refused(case, name, value, count, counts, build, copy_checkpoint, tmp_path, capsys):
    path = _poison(copy_checkpoint(case), name, value, count)
    index = path / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    numel = load_file(str(path / file))[name].numel()
    msg = f"tensor '{name}' ({file}) has {count} non-finite value(s) of {numel} {counts}"
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert msg in str(e.value)
    if not build:
        return
    out = tmp_path / "artifact"
    capsys.readouterr()
    assert main(["build", "--model", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: {msg}" in err and "Traceback" not in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [case]  # no staging dir left


def test_fp16_overflow_is_refused_naming_tensor_precision_and_magnitude(copy_checkpoint, tmp_path, capsys):
    """1e6 is a finite fp32 weight but inf in fp16: an fp16 build refuses it; fp32 (and the fp32 loader) are fine."""
    name = "model.layers.0.mlp.up_proj.weight"
    path = _poison(copy_checkpoint("qwen2_window"), name, -1e6, count=2)
    msg = (f"tensor '{name}' (model.safetensors): 2 value(s) overflow fp16 (largest magnitude 1e+06; fp16 holds at "
           "most 65504)")
    with pytest.raises(CheckpointError) as e:
        load_model(path, dtype=torch.float16)
    assert msg in str(e.value)
    load_model(path)  # fp32: representable, so accepted
    out = tmp_path / "artifact"
    capsys.readouterr()
    assert main(["build", "--model", str(path), "--out", str(out), "--no-progress", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert f"error: {msg}" in err and "Traceback" not in err, err
    assert not out.exists()


def test_yarn_rope_without_factor(copy_checkpoint, capsys):
    """transformers refuses a yarn dict with no 'factor' key (a null one it derives): so do we, instead of deriving
    max_position_embeddings / original (0.0625 here) on our side only."""
    path = edit_config(copy_checkpoint("qwen2_yarn"), lambda c: c["rope_parameters"].pop("factor"))
    _refused(path, "yarn rope scaling needs 'factor'", capsys)


@pytest.mark.parametrize("field, value, words", [
    ("max_position_embeddings", 10 ** 9, "above the longest context this tool builds"),
    ("num_hidden_layers", 3 * 10 ** 7, "'num_hidden_layers' must be an integer in [1, 1024]"),
])
def test_sizes_that_would_exhaust_memory_are_refused_first(field, value, words, copy_checkpoint, tmp_path, capsys):
    """A 0.5 MiB checkpoint whose config claims 10^9 positions (RoPE tables of 32 GB) or 3e7 layers (a weight plan
    of 1e8 entries) is exit 2 at once, before anything that size is allocated."""
    def edit(c):
        c[field] = value
        c.pop("layer_types", None)

    path = edit_config(copy_checkpoint("qwen2_window"), edit)
    capsys.readouterr()
    assert main(["build", "--model", str(path), "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("name, content, words", [
    ("tokenizer_config.json", "null", "must be a JSON object, got NoneType"),
    ("special_tokens_map.json", "[]", "must be a JSON object, got list"),
    ("generation_config.json", '{"eos_token_id": "x"}', "'eos_token_id' must be a token id, a list of ids or null"),
])
def test_tokenizer_side_files_must_be_what_the_runtime_reads(name, content, words, copy_checkpoint, tmp_path, capsys):
    path = copy_checkpoint("qwen2_window")
    (path / name).write_text(content)
    capsys.readouterr()
    assert main(["build", "--model", str(path), "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and name in err and "Traceback" not in err, err


def test_index_and_single_file_follow_transformers(copy_checkpoint, capsys):
    """Both model.safetensors and a shard index: transformers loads the single file, so we do too (with a
    warning), not the index's shards: here the shard holds other weights (all 0.5), and verify must still agree."""
    path = copy_checkpoint("qwen2_window")
    shard = {k: torch.full_like(v, 0.5) for k, v in load_file(str(path / "model.safetensors")).items()}
    save_file(shard, str(path / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in shard}}))
    rc, err = run_cli(capsys, "--model", str(path), "--steps", "2")
    assert rc == 0, err
    assert "holds both model.safetensors and model.safetensors.index.json; using model.safetensors" in err


# --------------------------------------------------------------------------------------------------------------
# HF hub cache snapshots: their files may link into the model's blobs/, and nowhere else

def hf_cache_snapshot(repo: Path, files_from: Path) -> Path:
    """`files_from` laid out as the HF hub cache stores it under `repo` (``models--ORG--NAME``): each file in
    blobs/<sha256>, the snapshot's files relative symlinks to ``../../blobs/<sha256>``. Returns the snapshot."""
    snap = repo / "snapshots" / SNAPSHOT
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snap


def _build(capsys, model: Path, out: Path) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["build", "--model", str(model), "--out", str(out), "--no-progress", "--max-seq-len", "64"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("via", ["plain", "repo dir behind a symlink"])
def test_hf_cache_snapshot_linking_into_its_blobs_builds(via, checkpoints, tmp_path, capsys):
    """The layout the hub writes (plain blobs/ and snapshots/, snapshot files linking into ../../blobs/) builds,
    also when models--ORG--NAME itself was moved to another disk and linked back."""
    real_repo = (tmp_path / "disk2" if via != "plain" else tmp_path / "hub") / "models--acme--tiny"
    snap = hf_cache_snapshot(real_repo, checkpoints("qwen2_window"))
    if via != "plain":
        (tmp_path / "hub").mkdir()
        (tmp_path / "hub" / real_repo.name).symlink_to(real_repo)
        snap = tmp_path / "hub" / real_repo.name / "snapshots" / SNAPSHOT
    out = tmp_path / "art"
    rc, err = _build(capsys, snap, out)
    assert rc == 0, err
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()


@pytest.mark.parametrize("linked", ["one file", "every file"])
def test_hf_cache_blobs_that_is_a_symlink_out_is_refused(linked, checkpoints, tmp_path, capsys):
    """A snapshot's blobs/ that is itself a symlink (here to a directory outside, holding a secret) is not the HF
    cache's blobs: trusting it let ``chat_template.jinja -> ../../blobs/id_rsa`` copy the secret into the
    artifact (and ``blobs -> /`` any file). Refused, exit 2, naming the file and the blobs link; nothing written."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("SECRET-KEY-MATERIAL")
    repo = tmp_path / "hub" / "models--evil--m"
    if linked == "one file":  # the probe: plain copies, one file linking to the secret through blobs -> outside
        snap = fake_hf_cache(tmp_path / "hub", "evil/m", files_from=checkpoints("qwen2_window"))
        (snap / "chat_template.jinja").symlink_to(Path("..", "..", "blobs", "id_rsa"))
        (repo / "blobs").symlink_to(secret)
        named = "chat_template.jinja"
    else:  # the hub layout, every file a link into blobs/, but blobs/ moved outside and linked back
        snap = hf_cache_snapshot(repo, checkpoints("qwen2_window"))
        for f in (repo / "blobs").iterdir():
            f.rename(secret / f.name)
        (repo / "blobs").rmdir()
        (repo / "blobs").symlink_to(secret)
        (snap / "chat_template.jinja").symlink_to(Path("..", "..", "blobs", "id_rsa"))
        named = "config.json"  # the first file read
    out = tmp_path / "art"
    rc, err = _build(capsys, snap, out)
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert f"{snap / named}: it is a symlink to" in err and "outside the checkpoint directory" in err, err
    assert f"{repo / 'blobs'} is itself a symlink" in err, err
    assert not out.exists() and "SECRET" not in err


@pytest.mark.parametrize("target", ["file outside", "snapshot of another model"])
def test_hf_cache_blob_that_links_on_out_is_refused(target, checkpoints, tmp_path, capsys):
    """A second hop: the snapshot file links into a plain blobs/, and that blob is itself a link leading out
    (every link resolved, the file's real location decides)."""
    repo = tmp_path / "hub" / "models--evil--m"
    snap = hf_cache_snapshot(repo, checkpoints("qwen2_window"))
    if target == "file outside":
        outside = tmp_path / "secret.txt"
        outside.write_text("SECRET-KEY-MATERIAL")
    else:  # inside the same HF cache, but not this model's blobs/
        outside = hf_cache_snapshot(tmp_path / "hub" / "models--other--m", checkpoints("qwen2_window")) / "config.json"
    (repo / "blobs" / "hop").symlink_to(outside)
    (snap / "chat_template.jinja").symlink_to(Path("..", "..", "blobs", "hop"))
    out = tmp_path / "art"
    rc, err = _build(capsys, snap, out)
    assert rc == 2, err
    assert f"{snap / 'chat_template.jinja'}: it is a symlink to {os.path.realpath(outside)}, outside" in err, err
    assert not out.exists() and "SECRET" not in err and "Traceback" not in err


@pytest.mark.parametrize("name, blob", [("config.json", "fifo"), ("model.safetensors", "fifo"),
                                        ("tokenizer.json", "fifo"), ("tokenizer.json", "/dev/zero")])
def test_hf_cache_blob_that_is_not_a_regular_file_is_refused(name, blob, checkpoints, tmp_path):
    """A snapshot file linking to a blob that is a FIFO (reading would block) or a link to /dev/zero (reading
    would never end) is refused before it is opened: the real `python -m export build`, under a timeout."""
    repo = tmp_path / "hub" / "models--evil--m"
    snap = hf_cache_snapshot(repo, checkpoints("qwen2_window"))
    (snap / name).unlink()
    if blob == "fifo":
        os.mkfifo(repo / "blobs" / "odd")
    else:
        (repo / "blobs" / "odd").symlink_to(blob)
    (snap / name).symlink_to(Path("..", "..", "blobs", "odd"))
    out = tmp_path / "art"
    r = _build_subprocess(snap, out, "--max-seq-len", "64", timeout=120)  # a hang fails here
    assert r.returncode == 2, r.stderr
    words = "not a regular file" if blob == "fifo" else "outside the checkpoint directory"
    assert f"error: {snap / name}: " in r.stderr and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()
