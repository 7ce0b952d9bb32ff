// The official OpenAI Node SDK with a llmproxy virtual key. Run by
// tests/sdk_compat.rs: OPENAI_BASE_URL points at a gateway that requires
// keys, VIRTUAL_KEY is a key allowed 2 requests per minute.
import assert from "node:assert/strict";
import OpenAI from "openai";

const baseURL = process.env.OPENAI_BASE_URL;
const apiKey = process.env.VIRTUAL_KEY;
const hello = { model: "gpt-4o-mini", messages: [{ role: "user", content: "Say hello" }] };

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const completion = await client.chat.completions.create(hello);
assert.ok(completion.choices[0].message.content.startsWith("Hello"));

await assert.rejects(
  new OpenAI({ baseURL, apiKey: "sk-llmp-wrong", maxRetries: 0 }).chat.completions.create(hello),
  (err) => err instanceof OpenAI.AuthenticationError && err.status === 401 && err.code === "invalid_api_key",
);

let text = "";
for await (const chunk of await client.chat.completions.create({ ...hello, stream: true })) {
  text += chunk.choices[0]?.delta?.content ?? "";
}
assert.ok(text.startsWith("Hello"), text);

await assert.rejects(client.chat.completions.create(hello), (err) => {
  assert.ok(err instanceof OpenAI.RateLimitError, String(err));
  assert.equal(err.status, 429);
  assert.equal(err.code, "rate_limit_exceeded");
  assert.equal(err.headers["x-ratelimit-limit-requests"] ?? err.headers.get?.("x-ratelimit-limit-requests"), "2");
  return true;
});
console.log("ok");
