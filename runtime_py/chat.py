"""Chat templates: messages -> prompt text, rendered exactly as transformers' ``apply_chat_template`` renders it.

What it does: :func:`load_chat_template` finds a model's Jinja chat template the way transformers does
(``chat_template.jinja`` and ``additional_chat_templates/*.jinja`` win over ``tokenizer_config.json``'s
``chat_template``, which may be a string or a list of ``{name, template}``) and returns it with the named special
tokens. :func:`render_chat` renders it in Jinja's immutable sandbox with the environment transformers builds
(trim_blocks, lstrip_blocks, loopcontrols, a no-op ``{% generation %}`` tag, ``raise_exception``,
``strftime_now``, the non-HTML-escaping ``tojson`` filter, guarded ``dict``/``namespace``) and the same input
clean-up (keys whose value is None dropped, everything reduced to plain JSON data, reasoning fields aliased).
Templates are untrusted code from the Hub: the sandbox blocks attribute tricks such as ``''.__class__.__mro__``
with a ``jinja2.exceptions.SecurityError``.

What it does not do: no tokenization (encode the result with ``add_special_tokens=False``: the template already
wrote the BOS), no assistant-token masks, ``continue_final_message`` or control-token sanitising, no automatic
conversion of Python functions to tool schemas (pass JSON schemas).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime_py.tokenizer import load_tokenizer_config, special_tokens_of

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(jinja2.exceptions.TemplateError, ValueError):
    """The template itself refused the conversation (its raise_exception), e.g. 'System role not supported'."""


def _raise_exception(message):
    raise ChatTemplateError(f"chat template rejected the conversation: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: Jinja's own tojson HTML-escapes '<', '>', '&' and "'" and sorts keys.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict` for templates without exposing the dict type itself (no attribute walks from it)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore-prefixed names (no dunder access through it)."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2.utils.Namespace: namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore-prefixed namespace "
                                                  f"attributes, got {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def _plain(value):
    """Rebuild inputs from plain JSON types (rich objects carry methods the sandbox does not know are unsafe)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} must be a dict, got {type(m).__name__}")
        # Drop None values: OpenAI-style APIs send content=None / tool_calls=None and templates expect absence.
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:  # templates read `reasoning_content` (most) or `thinking` (gpt-oss)
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None, documents: list[dict] | None = None, **template_vars) -> str:
    """The prompt text for `messages`. `template_vars` are the special tokens from load_chat_template (bos_token,
    eos_token, ...) plus anything else the template reads (e.g. enable_thinking=False)."""
    if not isinstance(template, str) or not template:
        raise ValueError("chat template must be a non-empty string")
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise ValueError("tools must be a list of JSON-schema dicts")
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise ValueError("documents must be a list of dicts with 'title' and 'text' keys")
    return _compile(template).render(messages=_prepare_messages(messages), tools=_plain(tools),
                                     documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                                     **_plain(template_vars))


def _templates_in(model_dir: Path, config: dict) -> dict[str, str]:
    """All templates by name, with transformers' precedence: .jinja files replace the config's templates."""
    files: dict[str, str] = {}
    if (model_dir / CHAT_TEMPLATE_FILE).is_file():
        files["default"] = (model_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (model_dir / CHAT_TEMPLATE_DIR).is_dir():
        for f in sorted((model_dir / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if files:
        return files
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError("tokenizer_config.json chat_template must be a string or a list of {name, template}, "
                     f"got {type(value).__name__}")


def load_chat_template(artifact_or_model_dir: str | Path, name: str | None = None) -> tuple[str, dict[str, str]]:
    """(template, special tokens) for a model or artifact directory. `name` picks one of several templates
    (e.g. "tool_use"); without it the single template or the one named "default" is used."""
    d = Path(artifact_or_model_dir)
    config = load_tokenizer_config(d)
    templates = _templates_in(d, config)
    if not templates:
        raise ValueError(f"{d} has no chat template (no {CHAT_TEMPLATE_FILE} and no chat_template in "
                         "tokenizer_config.json): this is probably a base model; prompt it with plain text")
    if name is None:
        name = "default" if "default" in templates or len(templates) != 1 else next(iter(templates))
    if name not in templates:
        raise ValueError(f"{d}: no chat template named {name!r}; available: {sorted(templates)}")
    return templates[name], special_tokens_of(config)
