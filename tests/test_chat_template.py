"""runtime_py.chat renders exactly what transformers' apply_chat_template renders, from the same files, and bounds
every render: each hostile template (huge center/multiplication/format widths, nested range loops, loops without
output, macro recursion doubling a string, namespace growth, shared references, captured output) fails fast with
TemplateLimitError naming the bound, without the memory it asked for. check_chat_templates (the build's check) and
the CLI's refusal of non-UTF-8 command-line text (a real subprocess on a built artifact) are tested here too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import jinja2
import pytest
from transformers import PreTrainedTokenizerFast

from export.tiny import CHATML_TEMPLATE, write_tokenizer
from runtime_py import template_sandbox as sandbox
from runtime_py.chat import ChatTemplateCheckError, check_chat_templates, load_chat_template, render_chat
from runtime_py.template_sandbox import ChatTemplateError, TemplateLimitError, TemplateRejectedError, TemplateSecurityError

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

# Qwen3's template (namespace, messages[::-1], string methods, reasoning_content, tool calls, enable_thinking).
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

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



@pytest.mark.parametrize("case", ["thinking", "tool_calls", "no_thinking", "long"])
def test_qwen3_matches_transformers(tmp_path, case):
    d = _dir_with(tmp_path, QWEN3_TEMPLATE)
    kwargs = {}
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                {"role": "user", "content": "Héllo 世界 and 3+3?"},
                {"role": "assistant", "content": "6", "reasoning_content": "again"}]
    if case == "tool_calls":
        kwargs["tools"] = TOOLS
        messages = [{"role": "user", "content": "Weather in Zürich?"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
                        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'}}]},
                    {"role": "tool", "content": "<tool_response>sunny</tool_response>"},
                    {"role": "tool", "content": "{\"temp\": 18}"}]
    elif case == "no_thinking":
        kwargs["enable_thinking"] = False
    elif case == "long":  # 300 messages of 10k characters: a 3 M character prompt, within the bounds, identical
        messages = [messages[0]] + [{"role": ("user", "assistant")[i % 2], "content": f"{i} " + "word " * 2000}
                                    for i in range(300)]
    ours, hf = _both(d, messages, **kwargs)
    assert ours == hf
    if case == "thinking":
        assert "<think>\nagain\n</think>\n\n6" in ours and "add them" not in ours  # only after the last query
    if case == "tool_calls":
        assert '{"name": "get_weather", "arguments": {"city": "Zürich"}}' in ours
        assert ours.count("<tool_response>") == 3
    if case == "no_thinking":
        assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    if case == "long":
        assert 3_000_000 < len(ours) < sandbox.MAX_OUTPUT_CHARS

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


# -- bounds ----------------------------------------------------------------------------------------------------------
ONE = [{"role": "user", "content": "hi"}]


def _refused(template: str, bound: str, what: str | None = None, messages=ONE) -> tuple[float, float]:
    """The render fails with TemplateLimitError naming `bound` (and `what`), within 10 s and without allocating
    the memory it asked for (tracemalloc's peak stays under 200 MiB). Returns (wall seconds, CPU seconds)."""
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        with pytest.raises(TemplateLimitError) as e:
            render_chat(template, messages)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    message = str(e.value)
    assert f"chat template exceeded {bound} = " in message, message
    if what is not None:
        assert what in message, message
    assert isinstance(e.value, ValueError) and sandbox._current() is None  # a clean error, no budget left behind
    assert wall < 10, f"{template!r} took {wall:.1f} s to fail"
    assert peak < 200 * 2**20, f"{template!r} allocated {peak / 2**20:.0f} MiB before failing"
    return wall, cpu


SIZE_DECIDING = [  # (template, bound, what the message names): each checked before it runs
    ("{{ 'x'|center(300000000) }}", "MAX_VALUE_SIZE", "|center"),
    ("{{ 'x'.center(300000000) }}", "MAX_VALUE_SIZE", "str.center()"),
    ("{{ 'x'.ljust(300000000) }}", "MAX_VALUE_SIZE", "str.ljust()"),
    ("{{ 'x' * 10**9 }}", "MAX_VALUE_SIZE", "a str repeated 1,000,000,000 times"),
    ("{% set n = 10**9 %}{{ (['x'] * n)|length }}", "MAX_VALUE_SIZE", "a list repeated"),
    ("{{ 2 ** 100000000 }}", "MAX_INT_BITS", "2 ** 100000000"),
    ("{{ '%0999999999d' % 1 }}", "MAX_VALUE_SIZE", "a % format"),
    ("{{ '%*d' % (999999999, 1) }}", "MAX_VALUE_SIZE", "a % format"),
    ("{{ '%0999999999d'|format(1) }}", "MAX_VALUE_SIZE", "|format"),
    ("{{ '{:>999999999}'.format(1) }}", "MAX_VALUE_SIZE", "str.format spec"),
    ("{{ '{:>{}}'.format(1, 999999999) }}", "MAX_VALUE_SIZE", "str.format spec"),
    ("{{ ('{0}' * 100000).format('x' * 1000) }}", "MAX_VALUE_SIZE", "the result of str.format"),
    ("{{ ('a\\n' * 100000)|indent(100000) }}", "MAX_VALUE_SIZE", "|indent"),
    ("{{ ('a' * 100000)|replace('', 'x' * 1000) }}", "MAX_VALUE_SIZE", "|replace"),
    ("{{ (['x'] * 100000)|join('y' * 1000) }}", "MAX_VALUE_SIZE", "|join"),
    ("{{ ('y' * 100000).join(['x'] * 1000) }}", "MAX_VALUE_SIZE", "str.join()"),
    ("{{ [1]|slice(100000000)|list }}", "MAX_VALUE_SIZE", "|slice"),
    ("{{ [1]|batch(100000000, 'x' * 100)|list }}", "MAX_VALUE_SIZE", "|batch"),
    ("{{ (1).to_bytes(999999999, 'big') }}", "MAX_VALUE_SIZE", "int.to_bytes()"),
    ("{{ ('\\t' * 100000).expandtabs(100000) }}", "MAX_VALUE_SIZE", "str.expandtabs()"),
    ("{% set l = [[[[[[[[[[1]]]]]]]]]] %}{{ ([l] * 1000)|tojson(indent=10000) }}", "MAX_VALUE_SIZE", "|tojson"),
    ("{{ lipsum(10000000) }}", "MAX_VALUE_SIZE", "lipsum()"),
    ("{{ strftime_now('%Y' * 100000) }}", "MAX_VALUE_SIZE", "strftime_now"),
    ("{{ ('xy' * 2000000)|sort(reverse=true)|length }}", "MAX_VALUE_SIZE", "|sort of a string"),  # 3.9 s, 670 MB
    ("{{ ('x' * 4000000)|batch(1)|list|length }}", "MAX_VALUE_SIZE", "|batch of a string"),  # 440 MB
    ("{{ ('a ' * 2000000)|title|length }}", "MAX_VALUE_SIZE", "|title of a string"),  # 350 MB
    ("{{ ('x' * 4000000)|list|length }}", "MAX_VALUE_SIZE", "|list of a string"),
]


@pytest.mark.parametrize("template,bound,what", SIZE_DECIDING, ids=[t[2] for t in SIZE_DECIDING])
def test_size_deciding_operations_are_refused_before_they_run(template, bound, what):
    wall, _ = _refused(template, bound, what)
    assert wall < 2


def test_nested_range_loops_are_bounded():
    # The template: 70 s and 7 GB before. range() now stops at MAX_RANGE items.
    wall, _ = _refused("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
                       "MAX_RANGE", "range(100000,)")
    assert wall < 1
    # Ranges within MAX_RANGE, nested: the output bound stops it after ~4 k iterations.
    wall, _ = _refused("{% for i in range(10000) %}{% for j in range(10000) %}{{ 'x' * 1000 }}{% endfor %}"
                       "{% endfor %}", "MAX_OUTPUT_CHARS", "the rendered prompt")
    assert wall < 5
    assert render_chat("{% for i in range(10000) %}{% if i % 1000 == 0 %}{{ i }},{% endif %}{% endfor %}", ONE) == \
        "0,1000,2000,3000,4000,5000,6000,7000,8000,9000,"


def test_loop_without_output_stops_at_the_time_budget():
    wall, cpu = _refused("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
                         "MAX_RENDER_SECONDS", "CPU time")
    assert sandbox.MAX_RENDER_SECONDS * 0.9 < cpu < sandbox.MAX_RENDER_SECONDS + 2, cpu
    print(f"\n100 M-iteration silent loop stopped after {wall:.2f} s wall, {cpu:.2f} s CPU")


def test_macro_recursion_is_bounded():
    # Doubling a string per level (2**64 characters at the bottom): refused when it passes MAX_VALUE_SIZE.
    _refused("{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}"
             "{{ d('x', 64) }}", "MAX_VALUE_SIZE", "a ~ concatenation")
    _refused("{% macro d(s, n) %}{% if n %}{{ d(s + s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}"
             "{{ d('x', 64) }}", "MAX_VALUE_SIZE", "a str concatenation (+)")
    # Doubling the output per level: every level's captured output counts toward MAX_WRITTEN_CHARS.
    _refused("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% else %}{{ 'x' * 100000 }}{% endif %}"
             "{% endmacro %}{{ f(40) }}", "MAX_WRITTEN_CHARS", "captured blocks and macro output")
    # 2**60 calls writing nothing: the time budget.
    _refused("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
             "MAX_RENDER_SECONDS")
    # Recursion without end: Python's recursion limit, reported as a limit (not a RecursionError traceback).
    with pytest.raises(TemplateLimitError, match="nested too deeply"):
        render_chat("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", ONE)


def test_namespace_growth_is_bounded():
    _refused("{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
             "MAX_VALUE_SIZE", "a ~ concatenation")
    _refused("{% set ns = namespace(l=[1]) %}{% for i in range(100) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
             "MAX_VALUE_SIZE", "a list concatenation (+)")
    # Each attribute within bounds, the namespace in all not.
    _refused("{% set s = 'x' * 3000000 %}{% set ns = namespace(a=s) %}{% set ns.b = s %}", "MAX_VALUE_SIZE",
             "namespace attribute 'b' (the namespace in all)")
    _refused("{% set s = 'x' * 3000000 %}{% set ns = namespace(a=s, b=s) %}", "MAX_VALUE_SIZE", "a namespace")
    # A namespace prints without its attributes: a list of it cannot grow by later writes.
    assert render_chat("{% set ns = namespace(a=1) %}{% set l = [ns] * 1000 %}{% set ns.a = 'x' * 4000000 %}"
                       "{{ l[0] }} {{ (l|string)|length }} {{ ns.a|length }}", ONE) == "<Namespace> 13000 4000000"


def test_shared_references_count_each_time():
    # Ten references per level, seven levels: 10**7 items that print as ~30 MB from a 200-character template.
    levels = "".join(f"{{% set l{i + 1} = [{', '.join([f'l{i}'] * 10)}] %}}" for i in range(7))
    _refused("{% set l0 = 1 %}" + levels + "{{ l7 }}", "MAX_VALUE_SIZE", "a list literal")
    # A list of two references per recursion level (2**60 items): never built, let alone compared or printed.
    _refused("{% macro f(x, n) %}{% if n %}{{ f([x, x], n - 1) }}{% else %}{{ x == x }}{% endif %}{% endmacro %}"
             "{{ f(1, 60) }}", "MAX_VALUE_SIZE", "a list literal")
    _refused("{{ dict.fromkeys(range(4000), 'x' * 2000) }}", "MAX_VALUE_SIZE", "the result of")
    _refused("{% set x = 'x' * 4000000 %}{{ [x, x] }}", "MAX_VALUE_SIZE", "a list literal")


def test_captured_output_is_bounded():
    _refused("{% set x %}{% for i in range(10000) %}{{ 'x' * 4000000 }}{% endfor %}{% endset %}{{ x|length }}",
             "MAX_WRITTEN_CHARS")
    _refused("{% set x %}{% for i in range(10000) %}{% filter center(4000000) %}x{% endfilter %}{% endfor %}"
             "{% endset %}", "MAX_WRITTEN_CHARS")
    _refused("{% macro m() %}{{ caller() }}{% endmacro %}{% set x %}{% for i in range(10000) %}{% call m() %}"
             "{{ 'x' * 4000000 }}{% endcall %}{% endfor %}{% endset %}", "MAX_WRITTEN_CHARS")


def test_renders_are_bounded_per_thread():
    """Triton renders on worker threads: hostile renders fail on theirs while good ones render on others, and each
    thread's budget is its own (a good render right after a violation on the same thread works)."""
    d = QWEN25_TEMPLATE
    expected = render_chat(d, CONVERSATION)
    hostile = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
    results: dict = {}

    def bad(i):
        try:
            render_chat(hostile, ONE)
            results[i] = "rendered"
        except TemplateLimitError as e:
            results[i] = "MAX_RENDER_SECONDS" in str(e) and render_chat(d, CONVERSATION) == expected

    def good(i):
        results[i] = all(render_chat(d, CONVERSATION) == expected for _ in range(300))

    threads = [threading.Thread(target=f, args=(i,)) for i, f in enumerate([bad, good, bad, good])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {0: True, 1: True, 2: True, 3: True}
    assert sandbox._current() is None


COLLIDING = 2**61 - 1  # the ints k * (2**61 - 1) all hash alike: sets and dicts of them are quadratic
SUPERLINEAR = [  # one filter or method call each, every value far below MAX_VALUE_SIZE, that ran for minutes
    ("{{ ((' ' * 1000000) ~ 'a')|wordwrap(5) }}", "MAX_WORDWRAP_CHARS"),  # 39 s at this size
    ("{{ ((')' * 30000) ~ 'a)')|urlize }}", "MAX_URLIZE_WORK"),  # 23 s, in C, holding the GIL
    ("{% set w = (')' * 1022) ~ 'a) ' %}{{ (w * 200)|urlize }}", "MAX_URLIZE_WORK"),  # short enough words, many
    ("{{ ('a' * 1000000)|trim(('b' * 1000000) ~ 'a') }}", "MAX_STRIP_CHARS"),  # 13 s
    ("{{ ('a' * 1000000).strip(('b' * 1000000) ~ 'a') }}", "MAX_STRIP_CHARS"),
    ("{{ (range(0, 10000 * %d, %d)|list + range(10000 * %d, 20000 * %d, %d)|list)|unique|list|length }}"
     % ((COLLIDING,) * 5), "MAX_HASHED_ITEMS"),
    ("{{ dict.fromkeys(range(0, 10000 * %d, %d)|list)|length }}" % (COLLIDING, COLLIDING), "MAX_HASHED_ITEMS"),
]


@pytest.mark.parametrize("template,bound", SUPERLINEAR, ids=[f"{b}-{i}" for i, (_, b) in enumerate(SUPERLINEAR)])
def test_operations_slower_than_their_input_are_refused_before_they_run(template, bound):
    t0 = time.thread_time()
    with pytest.raises(TemplateLimitError, match=f"exceeded {bound}"):
        render_chat(template, ONE)
    assert time.thread_time() - t0 < 1.0


def test_a_render_whose_last_operation_overran_the_budget_fails(monkeypatch):
    """One operation within every bound that takes longer than the whole budget, with nothing after it that ticks:
    the render used to succeed; the clock is now read after each filter and method call and at the end."""
    template = "{{ ((' ' * 65535) ~ 'a')|wordwrap(5)|length }}"  # ~0.2 s in one call
    assert render_chat(template, ONE) == "1"
    monkeypatch.setattr(sandbox, "MAX_RENDER_SECONDS", 0.01)
    with pytest.raises(TemplateLimitError, match="MAX_RENDER_SECONDS"):
        render_chat(template, ONE)


def test_every_render_failure_is_a_chat_template_error():
    for template, kind, match in [
        ("{{ 'a' + 1 }}", ChatTemplateError, "chat template failed: TypeError"),
        ("{{ foo.bar.baz }}", ChatTemplateError, "UndefinedError: 'foo' is undefined"),
        ("{% for %}", ChatTemplateError, "does not compile: line 1"),
        ("{{ 1 / 0 }}", ChatTemplateError, "ZeroDivisionError"),
        ("{{ ''.__class__.__mro__ }}", TemplateSecurityError, "unsafe"),
        ("{{ raise_exception('x' * 100000) }}", TemplateRejectedError, "rejected the conversation: xxx"),
    ]:
        with pytest.raises(kind, match=match) as e:
            render_chat(template, ONE)
        assert isinstance(e.value, ValueError) and len(str(e.value)) < 3000
    assert issubclass(TemplateSecurityError, jinja2.exceptions.SecurityError)
    assert issubclass(TemplateLimitError, ChatTemplateError) and issubclass(TemplateRejectedError, ChatTemplateError)


# -- check_chat_templates (the build's check) ------------------------------------------------------------------------
def test_check_accepts_good_templates(tmp_path):
    check_chat_templates(_dir_with(tmp_path / "chatml", CHATML_TEMPLATE))
    check_chat_templates(_dir_with(tmp_path / "gemma", GEMMA_TEMPLATE))  # refuses the system role: retried without
    qwen3 = _dir_with(tmp_path / "qwen3", None)
    (qwen3 / "chat_template.jinja").write_text(QWEN3_TEMPLATE)
    (qwen3 / "additional_chat_templates").mkdir()
    (qwen3 / "additional_chat_templates" / "tool_use.jinja").write_text(QWEN25_TEMPLATE)
    check_chat_templates(qwen3)
    check_chat_templates(_dir_with(tmp_path / "base", None))  # no template: a base model, nothing to check


HOSTILE_CENTER = "{{ 'x'|center(300000000) }}"
REFUSED = [  # (where the template goes, template, what the error says)
    ("config", "{{ raise_exception('never') }}", "rejected the conversation: never"),
    ("config", "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
               "{{ 'x' * 10**9 }}", "exceeded MAX_VALUE_SIZE"),  # refuses system, then fails without it too
    ("file", HOSTILE_CENTER, "exceeded MAX_VALUE_SIZE"),
    ("extra", "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
     "exceeded MAX_RENDER_SECONDS"),
    ("config", "{{ messages[0].content.nope() }}", "UndefinedError"),
    ("config", "{% for m in messages %}", "does not compile"),
    ("config", "{% if false %}x{% endif %}", "rendered an empty prompt"),
    ("list", HOSTILE_CENTER, "exceeded MAX_VALUE_SIZE"),
]


@pytest.mark.parametrize("where,template,match", REFUSED, ids=[f"{r[0]}: {r[2]}" for r in REFUSED])
def test_check_refuses_bad_templates_naming_the_file(tmp_path, where, template, match):
    if where == "config":
        d, source, name = _dir_with(tmp_path, template), "tokenizer_config.json (chat_template)", "'default'"
    elif where == "list":
        d = _dir_with(tmp_path, [{"name": "default", "template": CHATML_TEMPLATE},
                                 {"name": "rag", "template": template}])
        source, name = "tokenizer_config.json (chat_template 'rag')", "'rag'"
    elif where == "file":
        d = _dir_with(tmp_path, CHATML_TEMPLATE)
        (d / "chat_template.jinja").write_text(template)
        source, name = "chat_template.jinja", "'default'"
    else:
        d = _dir_with(tmp_path, CHATML_TEMPLATE)
        (d / "additional_chat_templates").mkdir()
        (d / "additional_chat_templates" / "tool_use.jinja").write_text(template)
        source, name = "additional_chat_templates/tool_use.jinja", "'tool_use'"
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateCheckError) as e:
        check_chat_templates(d)
    message = str(e.value)
    assert isinstance(e.value, ValueError)
    assert message.startswith(f"{d / source}: chat template {name} cannot render a sample conversation"), message
    assert match in message, message
    assert time.perf_counter() - t0 < 10


# -- the CLI: text that is not UTF-8 ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(artifacts):
    return artifacts("qwen2_window")


def _cli(*argv, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """python -m runtime_py ARGV (str or bytes items: bytes reach sys.argv as surrogate escapes)."""
    env = {**os.environ, "PYTHONUTF8": "1"}
    return subprocess.run([sys.executable, "-m", "runtime_py", *argv], input=stdin, capture_output=True,
                          cwd=Path(__file__).resolve().parents[1], env=env, timeout=120)


@pytest.mark.parametrize("argv,flag", [
    (["generate", "{a}", "--prompt", b"caf\xe9 \xff"], "--prompt"),
    (["generate", "{a}", "--chat", b"\xff\xfe"], "--chat"),
    (["generate", "{a}", "--prompt", "Hello", "--stop", b"x\xff"], "--stop"),
    (["chat", "{a}", "--system", b"\xc3"], "--system"),
], ids=["prompt", "chat", "stop", "system"])
def test_cli_refuses_text_that_is_not_utf8(artifact, argv, flag):
    argv = [str(artifact) if a == "{a}" else a for a in argv]
    done = _cli(*argv, "--max-new-tokens", "2")
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 2, err
    assert f"error: {flag} is not valid UTF-8 (byte 0x" in err and "Traceback" not in err, err
    if flag == "--prompt":
        assert "byte 0xe9 at character 3" in err


def test_cli_still_takes_utf8_and_refuses_bad_stdin(artifact):
    done = _cli("generate", str(artifact), "--prompt", "Héllo 世界".encode(), "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    done = _cli("chat", str(artifact), "--max-new-tokens", "2", stdin=b"hi\n\xff\xfe\n")
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 2 and "not valid UTF-8" in err and "Traceback" not in err, err


def test_chat_outgrowing_the_context_drops_the_oldest_exchange(artifact):
    # 128-token context: a few exchanges of ~50 tokens outgrow it; the chat goes on with the oldest dropped
    turns = [f"tell me story number {i} about the sea and the sky and the wind" for i in range(5)]
    done = _cli("chat", str(artifact), "--max-new-tokens", "20", "--ignore-eos", "--seed", "0",
                stdin=("\n".join(turns) + "\n").encode())
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert done.stdout.decode().count("assistant> ") == len(turns)
    assert "oldest exchange(s) were dropped" in err and "Traceback" not in err, err


def test_chat_message_that_cannot_be_sent_is_reported_and_the_chat_goes_on(artifact):
    too_long = " ".join(["word"] * 400)
    done = _cli("chat", str(artifact), "--max-new-tokens", "4", "--ignore-eos",
                stdin=f"hi\n{too_long}\nhello again\n".encode())
    err = done.stderr.decode()
    assert done.returncode == 2, err  # a message was not sent: scripts see it
    assert done.stdout.decode().count("assistant> ") == 2, (done.stdout, err)
    assert "> the artifact's context length 128; not sent" in err and "Traceback" not in err, err
