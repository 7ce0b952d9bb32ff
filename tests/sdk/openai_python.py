"""The official OpenAI Python SDK as a real client of llmproxy.

Run by tests/sdk_compat.rs with OPENAI_BASE_URL pointing at a proxy in
front of the built-in mock upstream. Exits non-zero on the first mismatch.
"""

import os
import sys

import openai
from openai import OpenAI

base_url = os.environ["OPENAI_BASE_URL"]
client = OpenAI(base_url=base_url, api_key="sk-client-key", max_retries=0, timeout=30)

# Non-streamed chat completion, and the raw response's headers.
raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Say hello"}],
)
assert len(raw.headers["x-llmproxy-request-id"]) == 32, raw.headers
completion = raw.parse()
assert completion.model == "gpt-4o-mini", completion
assert completion.choices[0].finish_reason == "stop"
full_text = completion.choices[0].message.content
assert full_text.startswith("Hello from the llmproxy mock upstream"), full_text
assert completion.usage.completion_tokens > 0

# Streamed: the deltas add up to the same text, usage arrives last.
stream = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Say hello"}],
    stream=True,
    stream_options={"include_usage": True},
)
pieces, chunks, usage = [], 0, None
for chunk in stream:
    chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
assert "".join(pieces) == full_text, ("".join(pieces), full_text)
assert chunks > 3, chunks
assert usage is not None and usage.total_tokens > 0, usage

# Other endpoints.
models = client.models.list()
assert [m.id for m in models.data] == ["mock-model"], models
embedding = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
assert len(embedding.data) == 2, embedding

# An upstream error reaches the SDK as the right exception type.
try:
    client.files.retrieve("file-missing")
except openai.NotFoundError as err:
    assert err.status_code == 404
    assert "unknown path" in str(err), err
else:
    raise AssertionError("expected NotFoundError")

print(f"python openai {openai.__version__}: ok", file=sys.stderr)
