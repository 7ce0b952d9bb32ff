"""The official OpenAI Python SDK with a llmproxy virtual key.

Run by tests/sdk_compat.rs: OPENAI_BASE_URL points at a gateway that
requires keys, VIRTUAL_KEY is a key allowed 2 requests per minute.
"""

import os

import openai
from openai import OpenAI

base_url = os.environ["OPENAI_BASE_URL"]
key = os.environ["VIRTUAL_KEY"]
hello = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}

client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
completion = client.chat.completions.create(**hello)
assert completion.choices[0].message.content.startswith("Hello"), completion

try:
    OpenAI(base_url=base_url, api_key="sk-llmp-wrong", max_retries=0).chat.completions.create(**hello)
except openai.AuthenticationError as err:
    assert err.status_code == 401
    assert err.code == "invalid_api_key", err.body
else:
    raise AssertionError("a wrong key must be AuthenticationError")

stream = client.chat.completions.create(**hello, stream=True)
assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).startswith("Hello")

try:
    client.chat.completions.create(**hello)
except openai.RateLimitError as err:
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded", err.body
    assert err.response.headers["x-ratelimit-limit-requests"] == "2"
else:
    raise AssertionError("the third request in a minute must be RateLimitError")
print("ok")
