"""Find a checkpoint and read its safetensors lazily, tensor by tensor.

What it does: resolves ``--model`` (a local directory, a preset name from :data:`PRESETS`, an HF repo id found in
the local HF cache, or one of the embedded tiny models) to a directory; opens ``model.safetensors`` or the shards
listed in ``model.safetensors.index.json``; exposes names, shapes and dtypes from the headers without reading data;
reads one tensor at a time on request.

What it does not do: it never downloads (the HF cache is searched offline) and never unpickles: a checkpoint that
only has ``*.bin``/``*.pt``/``*.pth`` files is refused. Which tensors a model needs is decided in ``weights.py``.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from artifacts.paths import json_loads


class CheckpointError(ValueError):
    """The checkpoint cannot be found or is not usable (missing, corrupt, pickle-only, inconsistent)."""


# Preset name -> Hugging Face repo id. One table; `--model` accepts either column.
PRESETS: dict[str, str] = {
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "qwen2-1.5b": "Qwen/Qwen2-1.5B",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "qwen2-72b": "Qwen/Qwen2-72B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-14b": "Qwen/Qwen2.5-14B",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-27b": "google/gemma-2-27b",
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "gemma-2-9b-it": "google/gemma-2-9b-it",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn}  # F8_E4M3: the weights of FP8 checkpoints (export/prequant_checkpoint.py)


def resolve_model(model: str) -> Path:
    """Return the checkpoint directory for `model`, or raise CheckpointError saying what was looked for."""
    from export import tiny  # local import: tiny imports this module

    if model in tiny.TINY_MODELS:
        return tiny.ensure_tiny(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    looked = [f"a local directory '{path}' (not found)"]
    repo_id = PRESETS.get(model.lower(), model)
    if model.lower() in PRESETS:
        looked.append(f"preset '{model.lower()}' -> '{repo_id}'")
    if "/" in repo_id and not path.exists():
        cached = _from_hf_cache(repo_id)
        if cached is not None:
            return cached
        looked.append(f"the HF cache (offline) for '{repo_id}' (not cached)")
    elif model.lower() not in PRESETS:
        looked.append(f"the presets ({', '.join(sorted(PRESETS))}) and tiny models ({', '.join(tiny.TINY_MODELS)})")
    hint = repo_id if "/" in repo_id else "ORG/NAME"
    raise CheckpointError(
        f"model '{model}' not found. Looked for: " + "; ".join(looked) + ". "
        f"Download it first, e.g. `hf download {hint} --include '*.json' --include '*.safetensors'` "
        "(`huggingface-cli download` with huggingface_hub < 1.0), or pass a local checkpoint directory."
    )


def _from_hf_cache(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = -1  # where the bytes start in the file (-1: not a stored tensor)
    nbytes: int = 0


def _data_offsets(file: Path) -> dict[str, tuple[int, int]]:
    """name -> (absolute offset, length) of each tensor's bytes, from the safetensors header (8-byte little-endian
    length, then JSON). Called after safe_open accepted the file, so the header is known to be well formed."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {name: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for name, v in header.items() if name != "__metadata__"}


class Checkpoint:
    """The safetensors files of one checkpoint directory; headers read at open, data read per tensor."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: checkpoint directory does not exist")
        self.files = self._files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            try:
                with safe_open(file, framework="pt") as f:
                    offsets = _data_offsets(file)
                    for name in f.keys():
                        sl = f.get_slice(name)
                        dtype = _DTYPES.get(sl.get_dtype())
                        if dtype is None:
                            raise CheckpointError(
                                f"{file.name}: tensor '{name}' has unsupported dtype {sl.get_dtype()}; accepted: "
                                "F32, F16, BF16 for weights (F64, I64, I32, I8, U8, BOOL only in unused tensors; I32 and "
                                "F8_E4M3 in the quantized linears of a checkpoint with a quantization_config)")
                        if name in self.tensors:
                            raise CheckpointError(
                                f"tensor '{name}' is stored twice, in {self.tensors[name].file.name} and {file.name}")
                        self.tensors[name] = TensorInfo(file, tuple(sl.get_shape()), dtype, *offsets[name])
            except SafetensorError as e:
                raise CheckpointError(
                    f"{file}: not a readable safetensors file (truncated or corrupt?): {e}"
                ) from None

    def _files(self) -> list[Path]:
        files = self._listed_files()
        for f in files:  # a weight file may be a link only into the checkpoint (or its HF cache blobs/)
            checkpoint_file(self.dir, f.name)
        return files

    def _listed_files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_symlink() and not index.exists():  # an HF snapshot whose index blob never arrived
            checkpoint_file(self.dir, index.name)  # refuses it, naming it
        if single.exists() and index.exists():  # transformers loads the single file: so do we, and say so
            print(f"warning: {self.dir} holds both {single.name} and {index.name}; using {single.name}, as "
                  "transformers does (remove whichever is stale)", file=sys.stderr)
            return [single]
        if index.exists():
            checkpoint_file(self.dir, index.name)
            try:
                weight_map = json_loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: 'weight_map' is not an object of tensor name -> shard file")
            bad = sorted({str(n) for n in weight_map.values()
                          if not isinstance(n, str) or n in ("", ".", "..") or Path(n).name != n})
            if bad:
                raise CheckpointError(f"{index}: shard names must be plain file names in the directory, got {bad}")
            files = sorted({self.dir / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index}: shard file(s) listed but missing: {missing}")
            return files
        if single.exists():
            return [single]
        others = sorted(self.dir.glob("*.safetensors"))
        if others:
            return others
        pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{self.dir}: only pickle checkpoint files found ({', '.join(pickles)}). We load safetensors only "
                "(pickle can run arbitrary code). Convert once with transformers: "
                "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`."
            )
        raise CheckpointError(f"{self.dir}: no model.safetensors, shard index or *.safetensors file found")

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read out of the file into memory of its own."""
        return self.read(self.tensors[name], name)

    @staticmethod
    def read(info: TensorInfo, name: str) -> torch.Tensor:
        """Tensor `name` of the file `info` names: its bytes read (plain reads at the header's offset, no mmap)
        straight into a new tensor, so reading costs the tensor's size once. (safetensors' get_tensor on a mapped
        file keeps the mapped pages, its copy and the clone a caller needs alive together: 3x a 3.4 GiB embedding.)"""
        t = torch.empty(info.shape, dtype=info.dtype)
        buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        if info.offset < 0 or len(buf) != info.nbytes:
            raise CheckpointError(f"{info.file}: tensor '{name}' holds {info.nbytes} bytes in the file; its shape "
                                  f"{list(info.shape)} and dtype need {len(buf)}")
        try:
            with open(info.file, "rb") as f:
                f.seek(info.offset)
                done = 0
                while done < len(buf):
                    n = f.readinto(buf[done:])
                    if not n:
                        raise CheckpointError(f"{info.file}: tensor '{name}' is cut short ({done} of {len(buf)} "
                                              "bytes): the file was truncated after it was opened")
                    done += n
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor '{name}': {e}") from None
        return t

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _hf_cache_blobs(model_dir: Path) -> tuple[Path | None, str]:
    """The blobs/ an HF hub cache snapshot's files may link into (None if `model_dir` is no snapshot or its blobs/
    is not trusted) and, when it looks like a snapshot but its blobs/ is not trusted, why.

    Worked out from the snapshot's real location, where the kernel resolves its ``../../blobs/`` links: the real
    directory must be ``models--ORG--NAME/snapshots/REV`` and ``blobs`` a real directory, not a symlink, directly in
    that (real) ``models--`` directory. Everything under ``models--ORG--NAME`` is as untrusted as the checkpoint
    (the hub itself makes blobs/ and snapshots/ plain directories; only the snapshot's files are links): a blobs/
    that is a link would widen the allowed area to wherever it points (``blobs -> /``: any file)."""
    real = Path(os.path.realpath(model_dir))
    repo = real.parent.parent
    if real.parent.name != "snapshots" or not repo.name.startswith("models--"):
        return None, ""
    blobs = repo / "blobs"
    try:
        mode = os.lstat(blobs).st_mode
    except OSError:
        return None, ""  # no blobs/: a snapshot of plain files
    if stat.S_ISLNK(mode):
        return None, (f"{blobs} is itself a symlink (to {os.readlink(blobs)}), not the HF cache's blobs directory "
                      "inside its models-- directory")
    if not stat.S_ISDIR(mode) or Path(os.path.realpath(blobs)) != blobs:
        return None, f"{blobs} is not a directory inside {repo}"
    return blobs, ""


def allowed_roots(model_dir: Path) -> list[Path]:
    """Where the files of `model_dir` may really live: the directory itself and, for an HF cache snapshot
    (``models--ORG--NAME/snapshots/REV``, whose files are symlinks into the repository's ``blobs/``), that blobs/,
    when it is a real directory (no symlink) in the real ``models--ORG--NAME`` directory (:func:`_hf_cache_blobs`)."""
    model_dir = Path(model_dir)
    blobs, _ = _hf_cache_blobs(model_dir)
    return [model_dir] if blobs is None else [model_dir, blobs]


def checkpoint_file(model_dir: Path, name: str) -> Path | None:
    """`model_dir/name` if it exists as a regular file whose real location is inside :func:`allowed_roots`;
    None if absent; CheckpointError if it is a link (or a path) leading anywhere else, or not a regular file (a FIFO,
    a device: checked on the resolved file, so also for a blob reached through the snapshot's link)."""
    from artifacts.paths import real_inside

    path = Path(model_dir) / name
    if not path.exists() and not path.is_symlink():
        return None
    if not real_inside(path, allowed_roots(model_dir)):
        _, why = _hf_cache_blobs(Path(model_dir))
        raise CheckpointError(f"{path}: it is a symlink to {os.path.realpath(path)}, outside the checkpoint "
                              "directory" + (f" ({why})" if why else "") + "; refusing to read it (copy the file "
                              "into the checkpoint instead)")
    if not path.is_file():
        dangling = path.is_symlink() and not path.exists()
        raise CheckpointError(f"{path}: " + ("a link to a file that does not exist (an unfinished download?)"
                                              if dangling else "not a regular file"))
    return path
