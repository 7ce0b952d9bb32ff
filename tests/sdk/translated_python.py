"""The official OpenAI Python SDK reaching a translated upstream (the
mock's Anthropic or Gemini dialect) through llmproxy: text, streaming,
tool calls, usage, and 529 / 429 as the SDK's exceptions — through Chat
Completions and through the Responses API (stateless, as agents send it).

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
# The Responses API, translated for the same deployment.
prompt_tokens = int(os.environ.get("PROMPT_TOKENS", "10"))
answer = client.responses.create(
    model="claude-sonnet-4-5", instructions="Be brief.", input="Say hello", max_output_tokens=50, store=False
)
assert answer.status == "completed", answer
assert answer.output_text == text, (answer.output_text, text)
assert answer.usage.input_tokens == prompt_tokens and answer.usage.output_tokens > 0, answer.usage

with client.responses.stream(model="claude-sonnet-4-5", instructions="Be brief.", input="Say hello") as stream:
    deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
    final = stream.get_final_response()
assert "".join(deltas) == text and final.output_text == text, (deltas, final)
assert final.usage.input_tokens == prompt_tokens, final.usage

response_tools = [{"type": "function", "name": "get_weather", "parameters": tools[0]["function"]["parameters"]}]
turn = [{"role": "user", "content": "Weather in Paris?"}]
called = client.responses.create(model="claude-sonnet-4-5", input=turn, tools=response_tools, store=False)
calls = [item for item in called.output if item.type == "function_call"]
assert len(calls) == 1 and calls[0].name == "get_weather", called.output
assert json.loads(calls[0].arguments) == {"city": "Paris"}, calls[0]

with client.responses.stream(model="claude-sonnet-4-5", input=turn, tools=response_tools) as stream:
    final = stream.get_final_response()
streamed_calls = [item for item in final.output if item.type == "function_call"]
assert [json.loads(c.arguments) for c in streamed_calls] == [{"city": "Paris"}], final.output

# The next turn carries the call and its output (no previous_response_id).
follow = turn + [
    {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
    {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
]
after = client.responses.create(model="claude-sonnet-4-5", input=follow, tools=response_tools, store=False)
assert after.status == "completed", after

try:
    client.responses.create(model="claude-sonnet-4-5", input="x", previous_response_id="resp_1")
    raise SystemExit("expected BadRequestError for previous_response_id")
except openai.BadRequestError as err:
    assert "previous_response_id" in str(err), err

try:
    client.responses.create(model="claude-sonnet-4-5", input="x", extra_headers={"x-mock-status": "429"})
    raise SystemExit("expected RateLimitError")
except openai.RateLimitError as err:
    assert err.status_code == 429, err
print("ok")
