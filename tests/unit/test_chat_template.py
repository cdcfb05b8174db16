"""Chat templates: found where transformers finds them, and rendered to the same text as
`AutoTokenizer.from_pretrained(dir).apply_chat_template(..., tokenize=False)`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pytest
import transformers

from services.engine.chat_template import ChatTemplateError
from services.engine.tokenizer import Tokenizer

# Llama 3.1 style: bos, header ids, eot; today's date from strftime_now; tools as indented JSON.
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "Call a function by answering {\\"name\\": ..., \\"parameters\\": ...}. Functions:\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
        {%- for call in message.tool_calls %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
            {{- '{"name": "' + call.function.name + '", "parameters": ' }}
            {{- call.function.arguments | tojson }}
            {{- "}<|eot_id|>" }}
        {%- endfor %}
    {%- elif message.role in ['tool', 'ipython'] %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen2/Qwen3 style: im_start/im_end, tools as JSON lines, tool responses folded into a user turn,
# reasoning shown unless enable_thinking is false, {% generation %} around assistant text.
QWEN2 = """{%- set ns = namespace(last_user=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- else %}
        {{- 'You are a helpful assistant.\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nCall one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
        {%- continue %}
    {%- elif message.role in ['user', 'system'] %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
        {%- if message.reasoning_content is defined and loop.index0 > ns.last_user
              and enable_thinking | default(true) %}
            {{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
        {%- endif %}
        {%- if message.content is defined %}
            {{- message.content }}
        {%- endif %}
        {%- for call in message.tool_calls | default([]) %}
            {{- '\\n<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' }}
            {{- call.function.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {%- endgeneration %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# Mistral style: [INST] turns that must alternate, the system message folded into the last user turn.
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, after an optional system message') }}
    {%- endif %}
{%- endfor %}
"""

# The filters and variables real templates lean on: tojson's arguments, documents, every special token.
PLUMBING = """{{- bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}
{{ tools | tojson(indent=2, sort_keys=true) }}
{{ messages[0] | tojson(separators=(',', ':')) }}
{% for d in documents %}
{% if loop.index > 2 %}{% break %}{% endif %}
[{{ d.title }}] {{ d.text }}
{% endfor %}
{{ dict(a=1) | tojson }} {{ greeting | default('none') }}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city; für Zürich too.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
                "required": ["city"],
            },
        },
    }
]

TOOL_CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": "You answer weather questions."},
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": '{"temp": 21, "unit": "C"}'},
    {"role": "tool", "content": '{"wind": "calm"}'},
    {"role": "assistant", "content": "It is 21 °C and calm.", "reasoning_content": "The tool said 21 C."},
    {"role": "user", "content": "  And tomorrow?  "},
]

CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]

KEEP = object()  # model_dir(): leave tokenizer_config.json["chat_template"] as make-model wrote it


def model_dir(base: Path, out: Path, config_template: Any = None, files: dict[str, str] | None = None) -> Path:
    """A copy of `base`'s tokenizer in `out`, with this tokenizer_config.json["chat_template"] and template files."""
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "special_tokens_map.json", "config.json"):
        shutil.copy(base / name, out / name)
    config = json.loads((base / "tokenizer_config.json").read_text())
    if config_template is None:
        config.pop("chat_template", None)
    elif config_template is not KEEP:
        config["chat_template"] = config_template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return out


def render_both(
    path: Path,
    messages: list[dict[str, Any]],
    *,
    override: str | Path | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> str:
    """Renders with ours and with transformers, asserts they agree, returns the text. Ours renders before and
    after transformers, so a template reading the clock agrees with one of them even across a second's edge."""
    ours = Tokenizer(path, chat_template=override)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    source = override.read_text() if isinstance(override, Path) else override

    def render() -> str:
        return ours.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            chat_template_kwargs=kwargs,
        )

    before = render()
    expected = theirs.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tools=tools,
        documents=documents,
        chat_template=source,
        **(kwargs or {}),
    )
    assert expected in (before, render())
    return str(expected)


@pytest.fixture
def llama3_dir(tiny_model: Path, tmp_path: Path) -> Path:
    """transformers 5's layout: the template in chat_template.jinja, none in tokenizer_config.json."""
    return model_dir(tiny_model, tmp_path / "llama3", files={"chat_template.jinja": LLAMA3})


def test_jinja_file_as_transformers_5_saves_it(llama3_dir: Path) -> None:
    text = render_both(llama3_dir, CHAT)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: ")
    assert text.endswith("What is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert Tokenizer(llama3_dir).chat_template == LLAMA3


def test_generation_prompt_off(llama3_dir: Path) -> None:
    with_prompt = render_both(llama3_dir, CHAT, add_generation_prompt=True)
    without = render_both(llama3_dir, CHAT, add_generation_prompt=False)
    assert with_prompt == without + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_llama3_tools_and_tool_roles(llama3_dir: Path) -> None:
    text = render_both(llama3_dir, TOOL_CHAT, tools=TOOLS)
    assert '    "type": "function",' in text and "für Zürich" in text  # indent=4, ensure_ascii=False
    assert '"parameters": {"city": "Zürich"}}<|eot_id|>' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n{\"wind\": \"calm\"}<|eot_id|>" in text


def test_llama3_date_variable_from_kwargs(llama3_dir: Path) -> None:
    text = render_both(llama3_dir, CHAT, kwargs={"date_string": "26 Jul 2024"})
    assert "Today Date: 26 Jul 2024\n" in text


def test_jinja_file_wins_over_tokenizer_config(tiny_model: Path, tmp_path: Path) -> None:
    path = model_dir(tiny_model, tmp_path / "model", config_template=KEEP, files={"chat_template.jinja": MISTRAL})
    assert "chat_template" in json.loads((path / "tokenizer_config.json").read_text())
    expected = "<|begin_of_text|>[INST] Hi there![/INST] Hello.<|end_of_text|>[INST] What is 2+2?[/INST]"
    assert render_both(path, CHAT[1:]) == expected


def test_made_model_template_in_tokenizer_config(tiny_model: Path) -> None:
    text = render_both(tiny_model, [{"role": "user", "content": [{"type": "text", "text": " hi "}]}])
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_qwen2_string_in_tokenizer_config_with_kwargs(tiny_model: Path, tmp_path: Path, enable_thinking: Any) -> None:
    path = model_dir(tiny_model, tmp_path / "model", config_template=QWEN2)
    kwargs = None if enable_thinking is None else {"enable_thinking": enable_thinking}
    # After the last user turn, and under the name vLLM gives it, which transformers copies to reasoning_content.
    shown = {"role": "assistant", "content": "Yes.", "reasoning": "It checked."}
    text = render_both(path, [*TOOL_CHAT, shown], kwargs=kwargs)
    assert "<think>\nThe tool said 21 C." not in text
    assert ("<|im_start|>assistant\n<think>\nIt checked.\n</think>\n\nYes.<|im_end|>" in text) == (
        enable_thinking is not False
    )
    assert text.endswith("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if enable_thinking is False else ""))


def test_qwen2_tools(tiny_model: Path, tmp_path: Path) -> None:
    path = model_dir(tiny_model, tmp_path / "model", config_template=QWEN2)
    text = render_both(path, TOOL_CHAT, tools=TOOLS)
    assert '\n{"type": "function", "function": {"name": "get_weather", "description": "Current weather' in text
    assert '<|im_start|>assistant\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}' in text
    assert "<|im_start|>user\n<tool_response>\n" in text and "</tool_response>\n<tool_response>\n" in text
    assert "<|im_start|>system\nYou answer weather questions.\n\n# Tools" in text


def test_named_templates_in_tokenizer_config(tiny_model: Path, tmp_path: Path) -> None:
    named = [{"name": "default", "template": MISTRAL}, {"name": "tool_use", "template": QWEN2}]
    path = model_dir(tiny_model, tmp_path / "model", config_template=named)
    assert render_both(path, CHAT[1:2]) == "<|begin_of_text|>[INST] Hi there![/INST]"
    assert render_both(path, TOOL_CHAT, tools=TOOLS).startswith("<|im_start|>system\n")
    assert Tokenizer(path).chat_template == MISTRAL


def test_named_template_files(tiny_model: Path, tmp_path: Path) -> None:
    files = {"chat_template.jinja": MISTRAL, "additional_chat_templates/tool_use.jinja": LLAMA3}
    path = model_dir(tiny_model, tmp_path / "model", config_template=QWEN2, files=files)
    assert render_both(path, CHAT[1:2]) == "<|begin_of_text|>[INST] Hi there![/INST]"
    assert "get_weather" in render_both(path, TOOL_CHAT, tools=TOOLS)


def test_named_templates_without_default(tiny_model: Path, tmp_path: Path) -> None:
    path = model_dir(tiny_model, tmp_path / "model", config_template=[{"name": "tool_use", "template": QWEN2}])
    assert Tokenizer(path).chat_template is None
    assert render_both(path, CHAT, tools=[]).startswith("<|im_start|>system\nBe brief.")  # [] still picks tool_use
    with pytest.raises(ChatTemplateError, match="no default chat template, only: tool_use"):
        Tokenizer(path).apply_chat_template(CHAT)


def test_operator_override_string_and_file(llama3_dir: Path, tmp_path: Path) -> None:
    assert render_both(llama3_dir, CHAT, override=QWEN2).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    file = tmp_path / "mistral.jinja"
    file.write_text(MISTRAL)
    for override in (file, str(file)):
        assert Tokenizer(llama3_dir, chat_template=override).chat_template == MISTRAL
    assert render_both(llama3_dir, CHAT, override=file).startswith("<|begin_of_text|>[INST] Hi there![/INST]")
    with pytest.raises(ChatTemplateError, match="neither a file nor a Jinja template"):
        Tokenizer(llama3_dir, chat_template=str(tmp_path / "missing.jinja"))


def test_continue_final_message(llama3_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    chat = [*CHAT, {"role": "assistant", "content": "The answer is "}]
    trimmed = render_both(llama3_dir, chat, add_generation_prompt=False, continue_final_message=True)
    assert trimmed.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nThe answer is")
    qwen = model_dir(tiny_model, tmp_path / "qwen2", config_template=QWEN2)
    kept = render_both(qwen, chat, add_generation_prompt=False, continue_final_message=True)
    assert kept.endswith("<|im_start|>assistant\nThe answer is ")
    blocks = [*CHAT, {"role": "assistant", "content": [{"type": "text", "text": "Four"}, {"type": "image"}]}]
    assert render_both(qwen, blocks, add_generation_prompt=False, continue_final_message=True).endswith("Four")


def test_continue_final_message_errors(llama3_dir: Path) -> None:
    tokenizer = Tokenizer(llama3_dir)
    chat = [*CHAT, {"role": "assistant", "content": "The answer is"}]
    with pytest.raises(ChatTemplateError, match="continue_final_message and add_generation_prompt"):
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, continue_final_message=True)
    dropping = "{% for m in messages if m.role == 'user' %}{{ m.content }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="does not render the final message"):
        Tokenizer(llama3_dir, chat_template=dropping).apply_chat_template(
            chat, add_generation_prompt=False, continue_final_message=True
        )
    with pytest.raises(ChatTemplateError, match="no text to continue"):
        tokenizer.apply_chat_template(
            [*CHAT, {"role": "assistant", "content": [{"type": "image"}]}],
            add_generation_prompt=False,
            continue_final_message=True,
        )


def test_raise_exception_in_template(tiny_model: Path, tmp_path: Path) -> None:
    path = model_dir(tiny_model, tmp_path / "model", files={"chat_template.jinja": MISTRAL})
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="Conversation roles must alternate") as theirs:
        transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError) as ours:
        Tokenizer(path).apply_chat_template(bad)
    assert str(ours.value) == str(theirs.value) == "Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        Tokenizer(path).apply_chat_template([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])


def test_plumbing_tojson_documents_and_special_tokens(tiny_model: Path, tmp_path: Path) -> None:
    path = model_dir(tiny_model, tmp_path / "model", config_template=PLUMBING)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|reserved_special_token_0|>"}))
    documents = [{"title": f"Doc {i}", "text": f"Text {i} ✓"} for i in range(4)]
    text = render_both(path, CHAT, tools=TOOLS, documents=documents, kwargs={"greeting": "héllo"})
    assert text.startswith("<|begin_of_text|>|<|end_of_text|>|<|reserved_special_token_0|>|False\n")
    assert '[\n  {\n    "function": {\n      "description"' in text  # indent=2, sort_keys
    assert '{"role":"system","content":"Be brief."}' in text and "[Doc 1] Text 1 ✓" in text
    assert "[Doc 2]" not in text and '{"a": 1} héllo' in text
    overridden = render_both(path, CHAT, tools=[], documents=[], kwargs={"bos_token": "<s>"})
    assert overridden.startswith("<s>|")


def test_chat_template_kwargs_cannot_replace_messages(llama3_dir: Path) -> None:
    tokenizer = Tokenizer(llama3_dir)
    for name in ("messages", "tools", "add_generation_prompt"):
        with pytest.raises(ChatTemplateError, match=f"chat_template_kwargs cannot set {name}"):
            tokenizer.apply_chat_template(CHAT, chat_template_kwargs={name: []})


def test_model_without_template(tiny_model: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer(model_dir(tiny_model, tmp_path / "model"))
    assert tokenizer.chat_template is None
    with pytest.raises(ChatTemplateError, match="this model has no chat template"):
        tokenizer.apply_chat_template(CHAT)


def test_template_errors_are_chat_template_errors(llama3_dir: Path) -> None:
    cases = {
        "{% if %}": "does not compile",
        "{{ messages[0].content + 1 }}": "the chat template failed",
        "{{ messages.__class__.__subclasses__() }}": "the chat template failed",
        "{% set ns = namespace(_x=1) %}": "underscore name",
    }
    for source, message in cases.items():
        with pytest.raises(ChatTemplateError, match=message):
            Tokenizer(llama3_dir, chat_template=source).apply_chat_template(CHAT)
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        Tokenizer(llama3_dir).apply_chat_template([])


def test_messages_are_not_modified(llama3_dir: Path) -> None:
    chat = json.loads(json.dumps([*TOOL_CHAT, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]))
    before = json.dumps(chat)
    Tokenizer(llama3_dir).apply_chat_template(chat, add_generation_prompt=False, continue_final_message=True)
    assert json.dumps(chat) == before
