"""Default chat templates for checkpoints that ship none (e.g. Gemma 3 GGUFs carry no tokenizer.chat_template).

Each is the family's reference Jinja template as found in its Hugging Face tokenizer_config.json, rendered by
`Tokenizer.apply_chat_template` with transformers' settings (trim_blocks, lstrip_blocks).
"""

from __future__ import annotations

from collections.abc import Container

# google/gemma-3-*-it: system text is folded into the first user turn; "assistant" is spelled "model".
GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# ChatML (Qwen 2/3, SmolLM): <|im_start|>role\ncontent<|im_end|>\n
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TEMPLATES = {"gemma": GEMMA, "chatml": CHATML, "llama3": LLAMA3}
_BY_FAMILY = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma",
    "qwen2": "chatml", "qwen3": "chatml", "chatml": "chatml", "smollm": "chatml", "smollm2": "chatml",
    "llama3": "llama3",
}
# A vocabulary token that gives the format away, for families (llama, mistral) shared by several formats.
_MARKERS = (("<start_of_turn>", "gemma"), ("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"))


def default_chat_template(family: str, tokens: Container[str] | None = None) -> str | None:
    """The standard template for `family` (e.g. "gemma3", "qwen2", "llama3"), else one the vocabulary's
    turn markers identify when `tokens` is given, else None."""
    name = _BY_FAMILY.get(family.lower()) if family else None
    if name is None and tokens is not None:
        name = next((fmt for marker, fmt in _MARKERS if marker in tokens), None)
    return TEMPLATES.get(name) if name else None
