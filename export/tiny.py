"""Embedded tiny models: small random checkpoints the project makes itself, one per family.

What it does: ``ensure_tiny("tiny-qwen2")`` writes (once, atomically) a complete Hugging Face style checkpoint
directory under ``~/.cache/llm-export/tiny/`` (or ``$LLM_EXPORT_CACHE``): ``config.json`` in the transformers v4
layout real checkpoints use, ``model.safetensors`` with seeded weights briefly trained on a built-in paragraph, a
byte-level BPE ``tokenizer.json`` trained on a built-in paragraph with the ``tokenizers`` library,
``tokenizer_config.json`` with a ChatML chat template, and ``generation_config.json``. README's first command and the
tests use these so nothing is ever downloaded. :func:`write_tokenizer` is shared with the tests, which build their
checkpoints through transformers' ``save_pretrained``.

The weights start random and get a few seconds of training on the built-in paragraph, so the demo continues a
prompt with words from it. What it does not do: be a useful language model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from artifacts.paths import cache_root  # noqa: F401 - also what bench/ imports from here

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = """The quick brown fox jumps over the lazy dog. A compiled export pipeline turns checkpoints into
engines. Attention, rotary embeddings and key value caches are the heart of a decoder. Tokens stream out one at a
time; the model reads what it wrote. Hello world! How are you today? I am fine, thank you. Numbers: 0 1 2 3 4 5 6 7
8 9 10 100 1000. Qwen, Gemma and mixtures of experts run on ONNX Runtime, TensorRT and Triton Inference Server."""

_BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
             bos_token_id=None, eos_token_id=2, torch_dtype="float32")

TINY_MODELS: dict[str, dict] = {
    "tiny-qwen2": dict(_BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=2,
                       hidden_act="silu", tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
                       max_window_layers=2),
    "tiny-gemma2": dict(_BASE, model_type="gemma2", architectures=["Gemma2ForCausalLM"], num_hidden_layers=2,
                        head_dim=32, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32,
                        sliding_window=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        tie_word_embeddings=True, pad_token_id=0),
    "tiny-qwen3-moe": dict(_BASE, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                           num_hidden_layers=2, head_dim=16, hidden_act="silu", tie_word_embeddings=False,
                           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                           decoder_sparse_step=1, mlp_only_layers=[0]),
}


def write_tokenizer(out_dir: str | Path, vocab_size: int, eos_token: str = "<|im_end|>") -> None:
    """Train a byte-level BPE on CORPUS and write tokenizer.json + tokenizer_config.json (ChatML template).

    The special tokens get ids 0, 1, 2 (<|endoftext|>, <|im_start|>, <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos_token,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 512,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_tiny(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint `name` into out_dir (which must not exist); atomic."""
    from export.spec import spec_from_config
    from export.weights import _source_shape, weight_plan

    config = TINY_MODELS[name]
    spec = spec_from_config(config)
    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        gen = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for w in weight_plan(spec):
            for src in w.sources:
                if src in tensors or (w.name == "lm_head.weight" and spec.tie_embeddings):
                    continue
                shape = _source_shape(w)
                if w.transform == "norm":  # stored as HF stores them: Gemma2 as (w), used as (1 + w)
                    tensors[src] = torch.full(shape, 1.0 - spec.norm_offset) + 0.05 * torch.randn(shape, generator=gen)
                else:
                    tensors[src] = 0.08 * torch.randn(shape, generator=gen)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen_config = {"eos_token_id": config["eos_token_id"], "do_sample": False, "max_new_tokens": 32}
        (tmp / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
        write_tokenizer(tmp, config["vocab_size"])
        _train_on_corpus(tmp, seed)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _train_on_corpus(model_dir: Path, seed: int, steps: int = 300, window: int = 48) -> None:
    """A few seconds of AdamW on CORPUS so the demo continues 'Hello world' with words, not noise. Trains our
    own decoder and writes the weights back under their Hugging Face names (the inverse of weights.py)."""
    from tokenizers import Tokenizer

    from export.model import load_model
    from export.weights import weight_plan

    model, spec = load_model(model_dir)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    ids = torch.tensor(Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(" ".join(CORPUS.split())).ids)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    pos = torch.arange(window)[None].expand(8, window)
    mask = torch.ones(8, window, dtype=torch.int64)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - window - 1, (8,), generator=gen)
        x = torch.stack([ids[s:s + window] for s in starts])
        y = torch.stack([ids[s + 1:s + window + 1] for s in starts])
        logits = model(x, pos, mask, *model.empty_past(8, 0))[0]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, spec.vocab_size), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    for w in weight_plan(spec):
        t = state[w.name]
        if w.transform == "norm":
            tensors[w.sources[0]] = (t - spec.norm_offset).contiguous()
        elif w.transform == "copy":
            tensors.setdefault(w.sources[0], t.contiguous())
        elif w.transform == "stack":
            tensors.update({src: t[e].contiguous() for e, src in enumerate(w.sources)})
        else:  # stack_gate_up: [E, 2I, H] -> gate [I, H], up [I, H] per expert
            half = t.shape[1] // 2
            for e, (g, u) in enumerate(zip(w.sources[0::2], w.sources[1::2])):
                tensors[g], tensors[u] = t[e, :half].contiguous(), t[e, half:].contiguous()
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def ensure_tiny(name: str) -> Path:
    """The directory of tiny model `name`, made on first use; the name carries a hash of its recipe."""
    import hashlib

    recipe = json.dumps([TINY_MODELS[name], CORPUS, CHATML_TEMPLATE, "trained-v1"], sort_keys=True).encode()
    out = cache_root() / "tiny" / f"{name}-{hashlib.sha256(recipe).hexdigest()[:10]}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            make_tiny(name, out)
        except OSError:
            if not (out / "config.json").exists():  # lost a race with another process: fine if it finished
                raise
    return out
