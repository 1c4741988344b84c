"""Chat templates: the sandboxed jinja2 compile, and the turn formats of template-less GGUF families.

Chat templates are the model's own Jinja template, rendered with jinja2 in a sandbox the way HF
transformers renders them. A GGUF file that carries none gets its family's turn format when the
family has a fixed one (`FAMILY_CHAT_FORMATS`: Gemma's <start_of_turn> turns, with <end_of_turn> as a
stop token, as llama.cpp does for the arch).
"""

from __future__ import annotations

import json
from datetime import datetime

from jaxinfer.errors import ChatTemplateError

# Gemma's turn format: user / model turns, a system message folded into the first user turn, roles
# alternating, content a string or a list of text parts. Written from the format Gemma's model card
# documents.
GEMMA_CHAT_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(prefix='') -%}
{%- if messages[0]['role'] == 'system' -%}
  {%- set ns.prefix = (messages[0]['content'] if messages[0]['content'] is string
                       else messages[0]['content'] | map(attribute='text') | join('')) + '\n\n' -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
  {%- if (m['role'] == 'user') != loop.index0 is even -%}
    {{ raise_exception('Gemma needs user and assistant turns to alternate, starting with user') }}
  {%- endif -%}
  {{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}
  {{- ns.prefix if loop.first else '' -}}
  {%- if m['content'] is string -%}
    {{ m['content'] | trim }}
  {%- else -%}
    {%- for part in m['content'] if part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endfor -%}
  {%- endif -%}
  {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"""

# general.architecture -> (chat template, stop tokens) for GGUF files without a template.
FAMILY_CHAT_FORMATS = {"gemma3": (GEMMA_CHAT_TEMPLATE, ("<end_of_turn>",))}


def compile_chat_template(chat_template: str):
    """The jinja2 template of `chat_template`, compiled in a sandbox (as HF transformers does)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template rejected the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(chat_template)
