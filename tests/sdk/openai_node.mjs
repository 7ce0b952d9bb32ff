// The official OpenAI Node SDK as a real client of llmproxy.
// Run by tests/sdk_compat.rs with OPENAI_BASE_URL pointing at a proxy in
// front of the built-in mock upstream. Exits non-zero on the first mismatch.
import assert from "node:assert/strict";
import OpenAI, { NotFoundError } from "openai";

const client = new OpenAI({
  baseURL: process.env.OPENAI_BASE_URL,
  apiKey: "sk-client-key",
  maxRetries: 0,
  timeout: 30_000,
});

// Non-streamed, with the raw response's headers.
const { data: completion, response } = await client.chat.completions
  .create({ model: "gpt-4o-mini", messages: [{ role: "user", content: "Say hello" }] })
  .withResponse();
assert.equal(response.headers.get("x-llmproxy-request-id").length, 32);
assert.equal(completion.model, "gpt-4o-mini");
assert.equal(completion.choices[0].finish_reason, "stop");
const fullText = completion.choices[0].message.content;
assert.ok(fullText.startsWith("Hello from the llmproxy mock upstream"), fullText);

// Streamed: the deltas add up to the same text, usage arrives last.
const stream = await client.chat.completions.create({
  model: "gpt-4o-mini",
  messages: [{ role: "user", content: "Say hello" }],
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let chunks = 0;
let usage = null;
for await (const chunk of stream) {
  chunks += 1;
  if (chunk.usage) usage = chunk.usage;
  for (const choice of chunk.choices) text += choice.delta?.content ?? "";
}
assert.equal(text, fullText);
assert.ok(chunks > 3, `only ${chunks} chunks`);
assert.ok(usage && usage.total_tokens > 0);

// Other endpoints.
const models = await client.models.list();
assert.deepEqual(models.data.map((m) => m.id), ["mock-model"]);
const embedding = await client.embeddings.create({ model: "text-embedding-3-small", input: ["a", "b"] });
assert.equal(embedding.data.length, 2);

// An upstream error reaches the SDK as the right exception type.
await assert.rejects(client.files.retrieve("file-missing"), (err) => {
  assert.ok(err instanceof NotFoundError, String(err));
  assert.equal(err.status, 404);
  return true;
});

console.error(`node openai ${OpenAI.VERSION ?? ""}: ok`);
