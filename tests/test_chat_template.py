"""runtime_py.chat renders exactly what transformers' apply_chat_template renders, from the same files."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from transformers import PreTrainedTokenizerFast

from export.tiny import CHATML_TEMPLATE, write_tokenizer
from runtime_py.chat import ChatTemplateError, load_chat_template, render_chat

# Qwen2.5-Instruct's template (default system prompt, tools, tool calls, tool responses).
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Gemma(2)-style: BOS written by the template, no system role, strict alternation, 'model' for the assistant.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Every environment feature transformers provides: tojson options, namespace, dict, loopcontrols, generation tag,
# strftime_now, trim_blocks/lstrip_blocks whitespace handling, special tokens, None-valued keys dropped.
KITCHEN_SINK_TEMPLATE = """{{ bos_token }}|{{ eos_token }}|{{ pad_token }}
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'stop' %}{% break %}{% endif %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    {% generation %}[{{ m.role }}] {{ m.content if m.content is defined else '(no content)' }}{% endgeneration %}
    {{ m | tojson }} {{ m | tojson(indent=2, sort_keys=True) }} {{ m | tojson(separators=(',', ':')) }}
{% endfor %}
n={{ ns.n }} d={{ dict(a=1, b='<&>') | tojson }} year={{ strftime_now('%Y') }} tools={{ tools | tojson }}
{% if add_generation_prompt %}GEN{% endif %}"""


def _dir_with(tmp_path: Path, template, **config_overrides) -> Path:
    d = tmp_path / "tok"
    d.mkdir(parents=True, exist_ok=True)
    write_tokenizer(d, 256)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    config.update(config_overrides)
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return d


def _both(d: Path, messages, **kwargs):
    hf = PreTrainedTokenizerFast.from_pretrained(str(d)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs)
    template, special = load_chat_template(d)
    ours = render_chat(template, messages, add_generation_prompt=True, **kwargs, **special)
    return ours, hf


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello. <b>Bold</b> & 'quoted'"},
    {"role": "user", "content": "Héllo 世界 🙂 — what now?"},
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city <today> & tomorrow",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                   "required": ["city"]}}}]


def test_chatml_matches_transformers(tmp_path):
    d = _dir_with(tmp_path, CHATML_TEMPLATE)
    ours, hf = _both(d, CONVERSATION)
    assert ours == hf
    assert ours.endswith("<|im_start|>assistant\n") and "Héllo 世界 🙂" in ours
    no_gen = render_chat(CHATML_TEMPLATE, CONVERSATION, add_generation_prompt=False)
    assert no_gen == PreTrainedTokenizerFast.from_pretrained(str(d)).apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=False)


@pytest.mark.parametrize("case", ["default_system", "own_system", "tools", "tool_calls"])
def test_qwen25_matches_transformers(tmp_path, case):
    d = _dir_with(tmp_path, QWEN25_TEMPLATE)
    kwargs = {}
    if case == "default_system":
        messages = CONVERSATION[1:]
    elif case == "own_system":
        messages = CONVERSATION + [{"role": "assistant", "content": "ok"}, {"role": "system", "content": "late"},
                                   {"role": "user", "content": "again"}]
    else:
        kwargs["tools"] = TOOLS
        messages = [{"role": "user", "content": "Weather in Zürich and Köln?"}]
        if case == "tool_calls":
            messages += [
                {"role": "assistant", "content": None, "tool_calls": [  # content=None: key dropped, as HF does
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Köln"}}}]},
                {"role": "tool", "content": "{\"temp\": 21}"},
                {"role": "tool", "content": "{\"temp\": 18, \"note\": \"<rain>\"}"},
            ]
    ours, hf = _both(d, messages, **kwargs)
    assert ours == hf
    if case == "default_system":
        assert "You are Qwen, created by Alibaba Cloud." in ours
    if case == "tools":
        assert '"Weather for a city <today> & tomorrow"' in ours and "Zürich" in ours  # tojson: no escaping
    if case == "tool_calls":
        assert ours.count('<tool_call>\n{"name": "get_weather"') == 2 and ours.count("<tool_response>") == 2


def test_gemma_matches_and_raises_like_transformers(tmp_path):
    d = _dir_with(tmp_path, GEMMA_TEMPLATE, bos_token={"content": "<bos>", "special": True, "lstrip": False,
                                                       "rstrip": False, "normalized": False, "single_word": False,
                                                       "__type": "AddedToken"})
    ok = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "yo"},
          {"role": "user", "content": "more"}]
    ours, hf = _both(d, ok)
    assert ours == hf and ours.startswith("<bos><start_of_turn>user\nhi<end_of_turn>\n")
    template, special = load_chat_template(d)
    assert special["bos_token"] == "<bos>"
    for bad, why in [([{"role": "system", "content": "s"}] + ok, "System role not supported"),
                     ([ok[0], ok[0]], "roles must alternate")]:
        with pytest.raises(jinja2.exceptions.TemplateError, match=why):
            PreTrainedTokenizerFast.from_pretrained(str(d)).apply_chat_template(bad, tokenize=False)
        with pytest.raises(ChatTemplateError, match=f"chat template rejected the conversation: .*{why}"):
            render_chat(template, bad, **special)
        with pytest.raises(ValueError):  # ChatTemplateError is a ValueError too
            render_chat(template, bad, **special)


def test_environment_features_match_transformers(tmp_path):
    d = _dir_with(tmp_path, KITCHEN_SINK_TEMPLATE)
    messages = [{"role": "user", "content": "a <b> & 'c' ü"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": None, "extra": [1, 2.5, True, None]},
                {"role": "stop", "content": "y"}, {"role": "user", "content": "never"}]
    ours, hf = _both(d, messages, tools=TOOLS)
    assert ours == hf
    assert "n=2" in ours and "(no content)" in ours and "never" not in ours


def test_sandbox_blocks_escapes():
    for template in ["{{ ''.__class__.__mro__ }}",
                     "{{ ''.__class__.__mro__[1].__subclasses__() }}",
                     "{{ cycler.__init__.__globals__ }}"]:
        with pytest.raises(jinja2.exceptions.SecurityError, match="unsafe"):
            render_chat(template, [{"role": "user", "content": "x"}])
    # A lone unsafe attribute is an (empty) undefined, not a value: nothing leaks.
    for template in ["{{ messages.__class__ }}", "{{ messages[0].__class__.__init__ }}",
                     "{{ raise_exception.__globals__ }}"]:
        assert render_chat(template, [{"role": "user", "content": "x"}]) == ""
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable sandbox: no mutating inputs
        render_chat("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])


def test_load_template_sources(tmp_path):
    # List form: {name, template}; "default" chosen unless a name is asked for.
    d = _dir_with(tmp_path, [{"name": "default", "template": CHATML_TEMPLATE},
                             {"name": "tool_use", "template": QWEN25_TEMPLATE}])
    template, special = load_chat_template(d)
    assert template == CHATML_TEMPLATE
    assert special == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert load_chat_template(d, name="tool_use")[0] == QWEN25_TEMPLATE
    with pytest.raises(ValueError, match="no chat template named 'rag'.*default.*tool_use"):
        load_chat_template(d, name="rag")
    # A chat_template.jinja file wins over tokenizer_config.json, as in transformers.
    (d / "chat_template.jinja").write_text(GEMMA_TEMPLATE)
    assert load_chat_template(d)[0] == GEMMA_TEMPLATE
    assert PreTrainedTokenizerFast.from_pretrained(str(d)).chat_template == GEMMA_TEMPLATE


def test_missing_template_is_a_clear_error(tmp_path):
    d = _dir_with(tmp_path, None)
    with pytest.raises(ValueError, match="has no chat template"):
        load_chat_template(d)
    with pytest.raises(ValueError, match="non-empty list"):
        render_chat(CHATML_TEMPLATE, [])
    with pytest.raises(ValueError, match="must be a string or a list"):
        load_chat_template(_dir_with(tmp_path / "bad", 42))
