"""The official OpenAI Python SDK reaching a translated upstream (the
mock's Anthropic or Gemini dialect) through llmproxy: text, streaming,
tool calls, usage, and 529 / 429 as the SDK's exceptions.

Run by tests/sdk_compat.rs with OPENAI_BASE_URL pointing at the proxy.
"""

import json
import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="sk-client-key", max_retries=0, timeout=30)
hello = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]

completion = client.chat.completions.create(model="claude-sonnet-4-5", messages=hello, max_tokens=50)
assert completion.object == "chat.completion", completion
assert completion.choices[0].finish_reason == "stop", completion
text = completion.choices[0].message.content
assert text.startswith("Hello from the llmproxy mock upstream"), text
assert completion.usage.prompt_tokens == int(os.environ.get("PROMPT_TOKENS", "10")), completion.usage  # anthropic: 8 input + 2 cache reads

stream = client.chat.completions.create(
    model="claude-sonnet-4-5", messages=hello, stream=True, stream_options={"include_usage": True}
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
assert "".join(pieces) == text, ("".join(pieces), text)
assert finish == "stop", finish
assert usage is not None and usage.completion_tokens > 0, usage

tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
called = client.chat.completions.create(model="claude-sonnet-4-5", messages=hello, tools=tools)
call = called.choices[0].message.tool_calls[0]
assert called.choices[0].finish_reason == "tool_calls"
assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}, call

stream = client.chat.completions.create(model="claude-sonnet-4-5", messages=hello, tools=tools, stream=True)
arguments = {}
for chunk in stream:
    for choice in chunk.choices:
        for delta in choice.delta.tool_calls or []:
            arguments[delta.index] = arguments.get(delta.index, "") + (delta.function.arguments or "")
assert {i: json.loads(a) for i, a in arguments.items()} == {0: {"city": "Paris"}}, arguments

try:
    client.chat.completions.create(model="claude-sonnet-4-5", messages=hello, extra_headers={"x-mock-status": "529"})
    raise SystemExit("expected an exception for 529")
except openai.InternalServerError as err:
    assert err.status_code == 529, err
    assert "injected" in str(err), err

try:
    client.chat.completions.create(model="claude-sonnet-4-5", messages=hello, extra_headers={"x-mock-status": "429"})
    raise SystemExit("expected RateLimitError")
except openai.RateLimitError as err:
    assert err.status_code == 429, err
print("ok")
