"""Text <-> ids for the runtime, from the files a checkpoint or artifact ships: no transformers needed.

What it does: :class:`Tokenizer` loads ``tokenizer.json`` with the ``tokenizers`` library and applies what
``tokenizer_config.json`` changes on top of it, the way transformers' ``PreTrainedTokenizerFast`` does: named special
tokens (``bos_token``, ``eos_token``, ``pad_token``, ... given as strings or ``{"content": ...}`` dicts) are added
when the vocabulary lacks them; an explicit ``add_bos_token`` / ``add_eos_token`` replaces the post-processor; and
``split_special_tokens`` is honoured. ``encode``/``decode`` then give the same ids and text as transformers.
``eos_ids`` is the union of the config's ``eos_token`` and ``generation_config.json``'s ``eos_token_id``.
:class:`StreamDecoder` turns ids arriving one at a time into text deltas that never split a UTF-8 character.
:func:`load_tokenizer_config` / :func:`special_tokens_of` are the one place tokenizer_config.json is read
(``chat.py`` uses them too).

What it does not do: no slow (sentencepiece / tiktoken) tokenizers, batching, padding, truncation or offsets;
``clean_up_tokenization_spaces`` is not applied (transformers skips it for BPE models, which every supported family
uses). Chat templates live in ``chat.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken

from artifacts.paths import json_loads

_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece-style byte-fallback pieces
# Text read from outside (a request body, a --file) is read and tokenized only up to this size: generous for any text
# the context can hold (a token is a few bytes of text; as JSON, ids are <= 8 bytes each and \uXXXX escapes 6).
TEXT_BYTES_PER_TOKEN = 64
MIN_TEXT_BYTES = 1 << 20


def text_bytes_limit(context: int) -> int:
    """The most bytes of input text (or request body) worth reading for a `context`-token model."""
    return max(MIN_TEXT_BYTES, TEXT_BYTES_PER_TOKEN * context)


# tokenizer.json is untrusted input: what it may make of a text, checked when it is loaded. A Replace normalizer of
# 20,000 characters turned a 100 KB prompt into 2 GB inside the tokenizer (before any length check could run), and a
# token (or a Replace decoder) of megabytes makes every generated token that large. Real tokenizers replace a
# character with one or two (" " -> "\u2581"), and their longest tokens are a few hundred characters.
MAX_REPLACE_CHARS = 16  # content of a Replace / Prepend normalizer or decoder
MAX_TOKEN_CHARS = 4096  # one vocabulary or added token


def check_tokenizer_limits(tok: "tokenizers.Tokenizer", vocab: dict[str, int], path: Path) -> None:
    """ValueError naming the file unless the loaded tokenizer's normalizers and decoders replace with at most
    MAX_REPLACE_CHARS characters and its tokens (`vocab`, with the added ones) have at most MAX_TOKEN_CHARS."""
    def walk(node, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
        elif isinstance(node, dict):
            for key in ("content", "prepend"):
                if node.get("type") in ("Replace", "Prepend") and isinstance(node.get(key), str) \
                        and len(node[key]) > MAX_REPLACE_CHARS:
                    raise ValueError(f"{path}: {where} {node['type']} {key} has {len(node[key]):,} characters "
                                     f"(at most {MAX_REPLACE_CHARS}): a text would grow that much when tokenized or "
                                     "decoded")
            for key in ("normalizers", "decoders"):
                walk(node.get(key), f"{where}.{key}")

    for section, component in (("normalizer", tok.normalizer), ("decoder", tok.decoder)):
        if component is not None:  # its own JSON (what pickling uses), not the whole file parsed a second time
            walk(json.loads(component.__getstate__()), section)
    longest = max(map(len, vocab), default=0)
    if longest > MAX_TOKEN_CHARS:
        raise ValueError(f"{path}: a token has {longest:,} characters (at most {MAX_TOKEN_CHARS}): every time it is "
                         "generated the text would grow that much")


# The named special tokens transformers passes to chat templates (SPECIAL_TOKENS_ATTRIBUTES), in its order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def read_json_object(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        value = json_loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON, bad UTF-8, nested too deeply
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must be a JSON object, got {type(value).__name__}")
    return value


def generation_token_ids(gen: dict, key: str, where: str = "generation_config.json") -> list[int]:
    """generation_config.json's `key` (eos_token_id, pad_token_id): an id, a list of ids, or null."""
    value = gen.get(key)
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{where}: '{key}' must be a token id, a list of ids or null, got "
                         f"{json.dumps(value)[:80]}")
    return values


def _token_str(value, where: str) -> str | None:
    """A special token as saved by transformers: a string, or an AddedToken dict with a "content" key."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a string or a dict with a 'content' string, got {value!r}")


def parse_ids(text: str) -> list[int]:
    """Comma-separated decimal token ids, as the CLIs take them: ASCII digits with an optional minus (not int()'s
    "1_0" or other scripts' digits); empty items are skipped. ValueError otherwise."""
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if not all(re.fullmatch(r"-?[0-9]+", t, re.ASCII) for t in ids):
        raise ValueError(f"expected comma-separated integers, got {text[:80]!r}")
    return [int(t) for t in ids]


def load_tokenizer_config(model_dir: str | Path) -> dict:
    """tokenizer_config.json as a dict ({} when absent), with legacy special_tokens_map.json entries filling any
    named special token the config does not set."""
    d = Path(model_dir)
    config = read_json_object(d / "tokenizer_config.json")
    legacy = read_json_object(d / "special_tokens_map.json")
    for name in SPECIAL_TOKEN_NAMES:
        if config.get(name) is None and legacy.get(name) is not None:
            config[name] = legacy[name]
    return config


def special_tokens_of(config: dict) -> dict[str, str]:
    """{"bos_token": "<s>", ...}: the named special tokens that are set, as plain strings."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        token = _token_str(config.get(name), f"tokenizer_config.json {name}")
        if token is not None:
            out[name] = token
    return out


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the runtime needs a fast-tokenizer tokenizer.json "
                                    "(save the tokenizer with transformers to produce one)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for every parse error
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        vocab = tok.get_vocab(with_added_tokens=True)
        check_tokenizer_limits(tok, vocab, path)
        tok.no_truncation()  # ids must be exact; length limits are the generation loop's business
        tok.no_padding()
        self.config = load_tokenizer_config(d)
        self.special_tokens = special_tokens_of(self.config)

        # transformers adds named special tokens the vocabulary lacks (new ids at the end); do the same so ids agree.
        missing = [t for t in self.special_tokens.values() if tok.token_to_id(t) is None]
        for t in missing:  # a token like any other once added: the vocabulary's bound applies to it too
            if len(t) > MAX_TOKEN_CHARS:
                raise ValueError(f"{d / 'tokenizer_config.json'}: a special token has {len(t):,} characters (at most "
                                 f"{MAX_TOKEN_CHARS}): every time it is generated the text would grow that much")
        if missing:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        tok.encode_special_tokens = bool(self.config.get("split_special_tokens", False))

        # tokenizer.json's post-processor decides which special tokens encode() adds (transformers v5 drops the
        # config's add_bos_token/add_eos_token when a tokenizer.json exists). One exception, the transformers v4
        # Llama/Gemma behaviour: add_bos_token=true while the post-processor adds no BOS means "prepend BOS".
        bos = self.special_tokens.get("bos_token")
        self.bos_id: int | None = tok.token_to_id(bos) if bos is not None else None
        probe, plain = tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids
        adds_bos = self.bos_id is not None and probe[:1] == [self.bos_id] and plain[:1] != [self.bos_id]
        self._prepend_bos = bool(self.config.get("add_bos_token")) and self.bos_id is not None and not adds_bos
        self._tok = tok
        self.special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        # Byte-fallback pieces: the decoder joins a run of them before UTF-8 decoding (StreamDecoder needs to know).
        self.byte_ids = frozenset(i for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t)) \
            if getattr(tok.model, "byte_fallback", False) else frozenset()

        where = d / "generation_config.json"
        gen = read_json_object(where)
        gen_eos, gen_pad = (generation_token_ids(gen, k, str(where)) for k in ("eos_token_id", "pad_token_id"))
        cfg_eos = [self.token_id(self.special_tokens["eos_token"])] if "eos_token" in self.special_tokens else []
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in gen_eos + cfg_eos))
        if "pad_token" in self.special_tokens:
            self.pad_id: int | None = self.token_id(self.special_tokens["pad_token"])
        elif gen_pad:
            self.pad_id = gen_pad[0]
        else:  # what HF generate does without a pad token: pad with EOS
            self.pad_id = self.eos_ids[0] if self.eos_ids else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def knows(self, i: int) -> bool:
        """Has the tokenizer a piece for id `i`? (A model's vocabulary may be larger: the decoder drops the rest.)"""
        return self._tok.id_to_token(int(i)) is not None

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`. add_special_tokens=True applies the post-processor (e.g. a BOS when add_bos_token);
        special-token strings inside `text` map to their ids either way. Chat prompts rendered by a template
        already contain their BOS: encode them with add_special_tokens=False, as transformers does.
        Through encode_batch, which releases the GIL while it works (encode holds it: a 1 MiB prompt froze the
        server's event loop and engine thread for a second and more)."""
        ids = self._tok.encode_batch([check_text(text)], add_special_tokens=add_special_tokens)[0].ids
        return [self.bos_id] + ids if add_special_tokens and self._prepend_bos else ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a raw prompt: encode(text) with the special tokens, less one BOS when the text already begins with
        one (a chat template's rendering, as Triton's OpenAI frontend sends it; transformers would put two BOS in
        front, which it warns about and models were not trained on)."""
        ids = self.encode(text)
        if self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
            plain = self.encode(text, add_special_tokens=False)
            if plain[:1] == [self.bos_id] and len(plain) < len(ids):  # the second BOS is the text's own
                return ids[1:]
        return ids

    def encode_pair(self, first: str, second: str) -> tuple[list[int], list[int | None], list[tuple[int, int]]]:
        """A text pair as the post-processor joins it (a QA question and context): ids, which text each token
        came from (0, 1, None for a special token) and its character offsets in that text."""
        enc = self._tok.encode_batch([(check_text(first), check_text(second))])[0]  # GIL released, as encode()
        ids, seq, offsets = list(enc.ids), list(enc.sequence_ids), list(enc.offsets)
        if self._prepend_bos:
            ids, seq, offsets = [self.bos_id] + ids, [None] + seq, [(0, 0)] + offsets
        return ids, seq, offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def check_text(text: str, what: str = "the text") -> str:
    """`text`, if it is valid Unicode; ValueError (bad input) naming the first bad character otherwise: an
    undecodable byte (Python hands those over from argv or a file as surrogate escapes) or a lone UTF-16 surrogate
    (JSON's "\\ud800"), which the tokenizer would refuse with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise ValueError(f"{what} is not valid UTF-8 ({bad} at character {e.start}); pass UTF-8 text") from None
    return text


class StreamDecoder:
    """Incremental detokenizer: push ids as they are generated, get the new text.

    Decodes a short window (the ids since the last emitted boundary, plus the ids before it back to the previous
    boundary, so decoders that treat a leading space specially see the same context both times) and emits only the
    part past what that context already produced, and only when it does not end in U+FFFD (an incomplete UTF-8
    sequence whose remaining bytes are still to come) nor in a byte-fallback piece (the decoder turns a whole run of
    <0xXX> pieces into U+FFFDs when the run is not valid UTF-8, so a run is never split). flush() emits whatever is
    held back. The concatenation of all deltas equals tokenizer.decode(all ids) for byte-level and
    SentencePiece-style (Metaspace, ByteFallback, Fuse, Strip) decoders."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # window start: the boundary before the last emitted one
        self._read_offset = 0  # ids before this have been emitted as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: int | Iterable[int]) -> str:
        """Add one id or several; return the text they complete ("" while a character is unfinished)."""
        self.ids.extend([int(new_ids)] if isinstance(new_ids, int) else [int(i) for i in new_ids])
        if self._in_byte_run():
            return ""
        prefix_text = self._decode(self.ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def _in_byte_run(self) -> bool:
        """Is the last id that reaches the decoder a byte-fallback piece (so the next id may extend its run)?"""
        for i in reversed(self.ids[self._read_offset:]):
            if (self.skip_special_tokens and i in self.tokenizer.special_ids) or not self.tokenizer.knows(i):
                continue  # the decoder drops both: a byte run goes on across them
            return i in self.tokenizer.byte_ids
        return False

    def flush(self) -> str:
        """The held-back tail (possibly ending in U+FFFD when the ids end mid-character); call once at the end."""
        prefix_text = self._decode(self.ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset:])
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return new_text[len(prefix_text):]
