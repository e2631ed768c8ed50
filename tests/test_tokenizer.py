"""runtime_py.tokenizer against transformers' fast tokenizer on the same files, and streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizersTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from export.tiny import CORPUS, write_tokenizer
from runtime_py.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "",
    "Hello world! How are you today?",
    "héllo 世界 🙂",
    "  leading and trailing spaces  \n\ttabs\n\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox: 0 1 2 3 100 1000. Ünïcödé — ✓ 🚀🚀 ok",
]


def _tiny(tmp_path: Path, **config_overrides) -> Path:
    d = tmp_path / "tiny"
    d.mkdir(parents=True, exist_ok=True)
    write_tokenizer(d, 256)
    if config_overrides:
        config = json.loads((d / "tokenizer_config.json").read_text())
        config.update(config_overrides)
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def _sentencepiece_style(tmp_path: Path, **config_overrides) -> Path:
    """A Llama/Gemma-like tokenizer: BPE with byte fallback, Metaspace pre-tokenizer, Replace/ByteFallback/Fuse/
    Strip decoder, a BOS added by tokenizer.json's post-processor. CJK and emoji come out as <0xXX> byte tokens."""
    d = tmp_path / "sp"
    d.mkdir(exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    tok = HFTokenizersTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator([CORPUS] * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                               show_progress=False))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    sp = HFTokenizersTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    sp.add_special_tokens(specials)
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", sp.token_to_id("<s>"))])
    sp.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "clean_up_tokenization_spaces": False, **config_overrides}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def _hf(d: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(d))


def _assert_parity(d: Path, texts=TEXTS):
    ours, hf = Tokenizer(d), _hf(d)
    for text in texts:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), (text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    return ours, hf


@pytest.mark.parametrize("flavour", ["byte_level", "sentencepiece_style"])
def test_encode_decode_match_transformers(tmp_path, flavour):
    d = _tiny(tmp_path) if flavour == "byte_level" else _sentencepiece_style(tmp_path)
    ours, hf = _assert_parity(d)
    assert ours.vocab_size == len(hf)
    ids = ours.encode("héllo 世界 🙂")
    assert ours.decode(ids) == ("héllo 世界 🙂")
    if flavour == "sentencepiece_style":
        assert ids[0] == ours.bos_id == hf.bos_token_id  # from tokenizer.json's post-processor
        assert ours._tok.token_to_id("<0xF0>") in ids  # the emoji really is byte tokens
    # Special-token strings in the text map to their ids; decoding can drop them.
    chat_ids = ours.encode(TEXTS[4], add_special_tokens=False)
    if flavour == "byte_level":
        assert chat_ids[0] == ours.token_id("<|im_start|>") == 1
        assert "<|im_start|>" not in ours.decode(chat_ids) and "<|im_start|>" in ours.decode(chat_ids, False)


@pytest.mark.parametrize("add_bos", [None, True, False])
def test_tokenizer_json_post_processor_decides_like_transformers(tmp_path, add_bos):
    # tokenizer.json adds <s>: the config's add_bos_token (either way) changes nothing, as in transformers 5.
    d = _sentencepiece_style(tmp_path, **({} if add_bos is None else {"add_bos_token": add_bos}))
    ours, hf = _assert_parity(d, TEXTS[1:3])
    assert ours.encode("hi")[0] == ours.bos_id == hf.encode("hi")[0]
    assert ours.encode("hi", add_special_tokens=False)[0] != ours.bos_id


@pytest.mark.parametrize("by", ["post-processor", "add_bos_token"])
def test_a_prompt_that_already_starts_with_bos_gets_one(tmp_path, by):
    """A chat template's rendering sent as a raw prompt (Triton's OpenAI frontend does that) begins with the BOS
    the tokenizer adds again: encode_prompt keeps one (transformers' encode gives two); texts without it are
    encoded as encode does."""
    d = _sentencepiece_style(tmp_path) if by == "post-processor" else \
        _tiny(tmp_path, bos_token="<|endoftext|>", add_bos_token=True)
    ours, hf = Tokenizer(d), _hf(d)
    bos = ours.special_tokens["bos_token"]
    rendered = f"{bos}Hello world"
    assert ours.encode(rendered)[:2] == [ours.bos_id] * 2  # what encode (and transformers' tokenizer) give
    assert ours.encode_prompt(rendered) == ours.encode(rendered, add_special_tokens=False) == \
        hf.encode(rendered, add_special_tokens=False)
    assert ours.encode_prompt(rendered).count(ours.bos_id) == 1
    for text in ("Hello world", f"x{bos}y", f"{bos}{bos}twice"):  # only the one the tokenizer adds is dropped
        want = ours.encode(text)
        assert ours.encode_prompt(text) == (want[1:] if text.startswith(bos) else want), text


def test_add_bos_token_prepends_when_tokenizer_json_does_not(tmp_path):
    # Deliberate difference from transformers 5 (which drops add_bos_token when tokenizer.json exists): a config
    # that asks for a BOS the post-processor does not add gets one (transformers 4's Llama/Gemma behaviour).
    d = _tiny(tmp_path, bos_token="<|endoftext|>", add_bos_token=True)
    ours, hf = Tokenizer(d), _hf(d)
    text = "Hello world"
    assert ours.encode(text) == [0] + hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text
    # Without the flag, or without a bos_token, nothing is prepended.
    assert Tokenizer(_tiny(tmp_path / "a", bos_token="<|endoftext|>", add_bos_token=False)).encode(text) == \
        hf.encode(text)
    assert Tokenizer(_tiny(tmp_path / "b", add_bos_token=True)).encode(text) == hf.encode(text)


def test_special_token_missing_from_vocab_is_added_like_transformers(tmp_path):
    d = _tiny(tmp_path, bos_token={"content": "<bos>", "special": True, "__type": "AddedToken"})
    ours, hf = _assert_parity(d, ["<bos>hi", "Hello"])
    assert ours.bos_id == hf.bos_token_id == ours.vocab_size - 1 == len(hf) - 1
    assert ours.encode("<bos>hi")[0] == ours.bos_id


def _stream(tok: Tokenizer, ids, skip=True) -> list[str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    deltas = [dec.push(i) for i in ids]
    return deltas + [dec.flush()]


@pytest.mark.parametrize("flavour", ["byte_level", "sentencepiece_style"])
def test_stream_decoder_concatenates_to_full_decode(tmp_path, flavour):
    tok = Tokenizer(_tiny(tmp_path) if flavour == "byte_level" else _sentencepiece_style(tmp_path))
    for text in TEXTS + ["x" + TEXTS[2] * 3, "世界世界 🙂🙂🙂 end"]:
        ids = tok.encode(text)
        for skip in (True, False):
            deltas = _stream(tok, ids, skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), (text, deltas)
            assert not any("\ufffd" in d for d in deltas), deltas  # never a broken character
    # Multi-byte characters span several ids; the stream holds them back until they are complete.
    ids = tok.encode("héllo 世界 🙂", add_special_tokens=False)
    deltas = _stream(tok, ids)
    assert "" in deltas[:-1]  # some pushes completed no character
    assert any("🙂" in d for d in deltas) and "".join(deltas) == "héllo 世界 🙂"


@pytest.mark.parametrize("flavour", ["byte_level", "sentencepiece_style"])
def test_stream_decoder_random_ids(tmp_path, flavour):
    # What a random-weight model emits: arbitrary ids, including lone UTF-8 continuation bytes and specials.
    tok = Tokenizer(_tiny(tmp_path) if flavour == "byte_level" else _sentencepiece_style(tmp_path))
    rng = np.random.default_rng(0)
    byte_ids = sorted(tok.byte_ids) or list(range(3, 259))  # byte-level vocab: the first ids are the 256 bytes
    for n in range(100):
        # a model's vocabulary is often larger than its tokenizer's (Qwen2: 151936 vs 151665): ids past the
        # tokenizer's decode to nothing, even in the middle of a byte-fallback run
        ids = rng.integers(0, tok.vocab_size + 16, size=int(rng.integers(1, 40))).tolist()
        if n % 2:  # dense in raw bytes, so invalid and split UTF-8 sequences are common
            ids = [int(rng.choice(byte_ids)) if rng.random() < 0.7 else i for i in ids]
        skip = n % 3 != 0
        dec = StreamDecoder(tok, skip_special_tokens=skip)
        deltas = [dec.push(i) for i in ids[:len(ids) // 2]] + [dec.push(ids[len(ids) // 2:]), dec.flush()]
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), (ids, deltas)
        assert all(not d.endswith("\ufffd") for d in deltas[:-1])


def test_eos_and_pad_ids(tmp_path):
    d = _tiny(tmp_path)
    tok = Tokenizer(d)
    assert tok.eos_ids == (2,) == (_hf(d).eos_token_id,)
    assert tok.pad_id == 0 == _hf(d).pad_token_id
    assert tok.bos_id is None
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert Tokenizer(d).eos_ids == (0, 2)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "pad_token_id": 1}))
    assert set(Tokenizer(d).eos_ids) == {1, 2}
    # No pad token anywhere: pad with the first EOS, as HF generate does.
    d2 = _tiny(tmp_path / "nopad", pad_token=None)
    (d2 / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "pad_token_id": 0}))
    assert Tokenizer(d2).pad_id == 0
    (d2 / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert Tokenizer(d2).pad_id == 1


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(tmp_path)


def test_encode_lets_other_threads_run(tmp_path):
    """Tokenizer.encode releases the GIL while the Rust tokenizer works (the server tokenizes a prompt of up to
    its body limit on a worker thread while the event loop and the engine thread go on): during a long encode the
    main thread keeps waking every millisecond. tokenizers' own encode() holds the GIL throughout, so the main
    thread's longest gap was the whole encode (about 1.7 s for this text on a 2-core VM); the bound is relative to
    the encode's own time so that a slow machine does not fail it. Same ids as the one-text call."""
    import threading
    import time

    d = _tiny(tmp_path)
    tok, raw = Tokenizer(d), HFTokenizersTokenizer.from_file(str(d / "tokenizer.json"))
    text = "Hello world, how are you? " * 40000
    gaps, done = [], {}

    def work():
        t0 = time.perf_counter()
        done["ids"] = tok.encode(text, add_special_tokens=False)
        done["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=work)
    last = time.perf_counter()
    thread.start()
    while thread.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    thread.join()
    assert done["ids"] == raw.encode(text, add_special_tokens=False).ids
    assert done["seconds"] > 0.2, done["seconds"]  # long enough for the gaps to mean something
    assert max(gaps) < done["seconds"] / 2, (max(gaps), done["seconds"])
