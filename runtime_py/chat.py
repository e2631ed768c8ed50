"""Chat templates: messages -> prompt text, rendered exactly as transformers' ``apply_chat_template`` renders it,
within bounds.

What it does: :func:`load_chat_template` finds a model's Jinja chat template the way transformers does
(``chat_template.jinja`` and ``additional_chat_templates/*.jinja`` win over ``tokenizer_config.json``'s
``chat_template``, which may be a string or a list of ``{name, template}``) and returns it with the named special
tokens. :func:`render_chat` renders it in the environment transformers builds (runtime_py/template_sandbox.py)
with the same input clean-up (keys whose value is None dropped, everything reduced to plain JSON data, reasoning fields aliased).
:func:`check_chat_templates` renders every template of a checkpoint on a sample conversation (the build calls it).

Templates are untrusted code from the Hub: every render runs in runtime_py/template_sandbox.py's bounded
sandbox, and every failure is a :class:`ChatTemplateError` (a ``ValueError``).

What it does not do: no tokenization (encode the result with ``add_special_tokens=False``: the template already
wrote the BOS), no assistant-token masks, ``continue_final_message`` or control-token sanitising, no automatic
conversion of Python functions to tool schemas (pass JSON schemas). The inputs themselves (messages, tools) are not
size-checked: they count toward the bounds where a template copies them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from artifacts.bundle import CHAT_TEMPLATE_DIR
from runtime_py.template_sandbox import ChatTemplateError, TemplateRejectedError, compile_template, render_bounded
from runtime_py.tokenizer import load_tokenizer_config, special_tokens_of

CHAT_TEMPLATE_FILE = "chat_template.jinja"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateCheckError(ValueError):
    """A checkpoint's chat template cannot render a sample conversation (see check_chat_templates)."""


# -- inputs ----------------------------------------------------------------------------------------------------------
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
    eos_token, ...) plus anything else the template reads (e.g. enable_thinking=False).

    Raises ValueError for bad arguments and ChatTemplateError (a ValueError) when rendering fails: the template
    refused the conversation (TemplateRejectedError), exceeded a bound (TemplateLimitError), tried a sandbox escape
    (TemplateSecurityError) or broke."""
    if not isinstance(template, str) or not template:
        raise ValueError("chat template must be a non-empty string")
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise ValueError("tools must be a list of JSON-schema dicts")
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise ValueError("documents must be a list of dicts with 'title' and 'text' keys")
    variables = dict(messages=_prepare_messages(messages), tools=_plain(tools), documents=_plain(documents),
                     add_generation_prompt=add_generation_prompt, **_plain(template_vars))
    return render_bounded(compile_template(template), variables)


# -- templates of a model --------------------------------------------------------------------------------------------
def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 ({e})") from None


def _template_sources(model_dir: Path, config: dict) -> dict[str, tuple[str, str]]:
    """name -> (template, where it comes from), with transformers' precedence: .jinja files replace the config's."""
    files: dict[str, tuple[str, str]] = {}
    if (model_dir / CHAT_TEMPLATE_FILE).is_file():
        path = model_dir / CHAT_TEMPLATE_FILE
        files["default"] = (_read_template(path), str(path))
    if (model_dir / CHAT_TEMPLATE_DIR).is_dir():
        for f in sorted((model_dir / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = (_read_template(f), str(f))
    if files:
        return files
    value = config.get("chat_template")
    where = str(model_dir / "tokenizer_config.json")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": (value, f"{where} (chat_template)")}
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: (t["template"], f"{where} (chat_template {t['name']!r})") for t in value}
    raise ValueError(f"{where}: chat_template must be a string or a list of {{name, template}}, "
                     f"got {type(value).__name__}")


def load_chat_template(artifact_or_model_dir: str | Path, name: str | None = None) -> tuple[str, dict[str, str]]:
    """(template, special tokens) for a model or artifact directory. `name` picks one of several templates
    (e.g. "tool_use"); without it the single template or the one named "default" is used."""
    d = Path(artifact_or_model_dir)
    config = load_tokenizer_config(d)
    templates = {k: text for k, (text, _) in _template_sources(d, config).items()}
    if not templates:
        raise ValueError(f"{d} has no chat template (no {CHAT_TEMPLATE_FILE} and no chat_template in "
                         "tokenizer_config.json): this is probably a base model; prompt it with plain text")
    if name is None:
        name = "default" if "default" in templates or len(templates) != 1 else next(iter(templates))
    if name not in templates:
        raise ValueError(f"{d}: no chat template named {name!r}; available: {sorted(templates)}")
    return templates[name], special_tokens_of(config)


SAMPLE_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! What can you do?"},
    {"role": "assistant", "content": "I can answer questions and help with writing."},
    {"role": "user", "content": "Write one sentence about the sea."},
)


def check_chat_templates(model_dir: str | Path) -> None:
    """Refuse a checkpoint whose chat templates do not render: call ``check_chat_templates(model_dir)`` before
    building; it returns None when every template is fine (or there is none: a base model) and raises
    :class:`ChatTemplateCheckError` (a ValueError) naming the file and template otherwise.

    Every template load_chat_template could pick (``chat_template.jinja``, ``additional_chat_templates/*.jinja``,
    else tokenizer_config.json's ``chat_template``, same precedence) renders :data:`SAMPLE_CONVERSATION` (system,
    user, assistant, user) with add_generation_prompt=True and the checkpoint's special tokens, under the bounds of
    render_chat. A template that refuses the system role (its raise_exception) is retried without the system
    message. It fails when it does not compile, raises, exceeds a bound or renders nothing."""
    d = Path(model_dir)
    config = load_tokenizer_config(d)
    try:
        sources = _template_sources(d, config)
    except ValueError as e:
        raise ChatTemplateCheckError(str(e)) from None
    special = special_tokens_of(config)
    for name, (template, where) in sources.items():
        try:
            try:
                text = render_chat(template, list(SAMPLE_CONVERSATION), add_generation_prompt=True, **special)
            except TemplateRejectedError:  # e.g. Gemma: 'System role not supported'; legal, try without it
                text = render_chat(template, list(SAMPLE_CONVERSATION[1:]), add_generation_prompt=True, **special)
            if not text.strip():
                raise ChatTemplateError("it rendered an empty prompt")
        except ValueError as e:
            raise ChatTemplateCheckError(f"{where}: chat template {name!r} cannot render a sample conversation "
                                         f"(system, user, assistant, user): {e}") from None
