"""A served model with a hermes/Qwen-style chat template (tools, tool results, a thinking section).

The fixture's own template knows neither tools nor thinking, so this model supplies
one, as users do per model (``chat_template`` in its config). mlx-lm picks its
``json_tools`` parser from the template's text; ``enable_thinking`` (through
``chat_template_kwargs``) opens a ``<think>`` section in the generation prompt.
Deployed once per session as its own application next to any other, with room
for 16 concurrent requests, and a short SSE keepalive so streams show it.
"""

from __future__ import annotations

import pytest

from mlx_ray.serve.config import ServeConfig

OAI_APP = "mlx-ray-oai"
OAI_MODEL = "smol-tools"

TOOLS_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}<|im_start|>user
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content or '' }}
{%- for tool_call in message.tool_calls or [] %}
{%- set tool_call = tool_call.function %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking %}<think>
{% endif %}{% endif %}"""


@pytest.fixture(scope="session")
def served_tools(ray_cluster, mlx_f32):
    """Base URL of the application serving ``OAI_MODEL``."""
    from fixtures_ray import free_ports
    from mlx_ray.serve.cli import deploy, wait_ready

    cfg = ServeConfig.from_args({
        "port": free_ports(1)[0],
        "sse_keepalive_s": 0.05,
        "models": [{"model": str(mlx_f32), "name": OAI_MODEL, "chat_template": TOOLS_TEMPLATE,
                    "engine": {"max_num_seqs": 16, "max_queue": 16, "max_model_len": 2048},
                    # no gpu_apple_mps left on the test cluster's "Mac" (the shared app holds it)
                    "placement": {"resource": None, "num_cpus": 0}}],
    })
    url = deploy(cfg, app_name=OAI_APP, route_prefix="/oai", proxy_location="HeadOnly")
    wait_ready(cfg, url, app_name=OAI_APP, timeout=300)
    return url
