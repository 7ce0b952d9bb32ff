"""The official Anthropic Python SDK as a real client of llmproxy's
/v1/messages: routed to an OpenAI-compatible upstream (translated) when
UPSTREAM=openai, passed through to an Anthropic upstream when
UPSTREAM=anthropic; both served by the built-in mock.

Run by tests/sdk_compat.rs with ANTHROPIC_BASE_URL pointing at the proxy.
"""

import os

import anthropic

upstream = os.environ["UPSTREAM"]
client = anthropic.Anthropic(base_url=os.environ["ANTHROPIC_BASE_URL"], api_key="sk-ant-client", max_retries=0, timeout=30)
hello = [{"role": "user", "content": "Say hello"}]

message = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, system="Be brief.", messages=hello)
assert message.type == "message", message
assert message.stop_reason == "end_turn", message
text = message.content[0].text
assert text.startswith("Hello from the llmproxy mock upstream"), text
assert message.usage.output_tokens > 0, message.usage

with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=hello) as stream:
    streamed = stream.get_final_text()
    final = stream.get_final_message()
assert streamed == text, (streamed, text)
assert final.stop_reason == "end_turn", final
assert final.usage.output_tokens > 0, final.usage

if upstream == "anthropic":
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    called = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=hello, tools=tools)
    use = [b for b in called.content if b.type == "tool_use"][0]
    assert called.stop_reason == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}, called
    count = client.messages.count_tokens(model="claude-sonnet-4-5", messages=hello)
    assert count.input_tokens > 0, count

try:
    client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=hello, extra_headers={"x-mock-status": "429"})
    raise SystemExit("expected RateLimitError")
except anthropic.RateLimitError as err:
    assert err.status_code == 429, err

try:
    client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=hello, extra_headers={"x-mock-status": "500"})
    raise SystemExit("expected InternalServerError")
except anthropic.InternalServerError as err:
    assert err.status_code == 500, err
print("ok", upstream)
