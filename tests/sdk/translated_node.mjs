// The official OpenAI Node SDK reaching an Anthropic-dialect upstream (the
// mock's /v1/messages) through llmproxy's translation. Run by
// tests/sdk_compat.rs with OPENAI_BASE_URL pointing at the proxy.
import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.OPENAI_BASE_URL, apiKey: "sk-client-key", maxRetries: 0, timeout: 30000 });
const messages = [{ role: "user", content: "Say hello" }];

const completion = await client.chat.completions.create({ model: "claude-sonnet-4-5", messages });
const text = completion.choices[0].message.content;
assert.ok(text.startsWith("Hello from the llmproxy mock upstream"), text);
assert.equal(completion.usage.prompt_tokens, Number(process.env.PROMPT_TOKENS ?? "10"));

const stream = await client.chat.completions.create({ model: "claude-sonnet-4-5", messages, stream: true, stream_options: { include_usage: true } });
let pieces = "";
let usage = null;
for await (const chunk of stream) {
  if (chunk.usage) usage = chunk.usage;
  for (const choice of chunk.choices) pieces += choice.delta.content ?? "";
}
assert.equal(pieces, text);
assert.ok(usage && usage.completion_tokens > 0);

const tools = [{ type: "function", function: { name: "get_weather", parameters: { type: "object" } } }];
const called = await client.chat.completions.create({ model: "claude-sonnet-4-5", messages, tools });
assert.equal(called.choices[0].finish_reason, "tool_calls");
assert.deepEqual(JSON.parse(called.choices[0].message.tool_calls[0].function.arguments), { city: "Paris" });

await assert.rejects(
  client.chat.completions.create({ model: "claude-sonnet-4-5", messages }, { headers: { "x-mock-status": "529" } }),
  (err) => err instanceof OpenAI.InternalServerError && err.status === 529,
);
await assert.rejects(
  client.chat.completions.create({ model: "claude-sonnet-4-5", messages }, { headers: { "x-mock-status": "429" } }),
  (err) => err instanceof OpenAI.RateLimitError,
);
// The Responses API, translated for the same deployment.
const prompt = Number(process.env.PROMPT_TOKENS ?? "10");
const answer = await client.responses.create({ model: "claude-sonnet-4-5", instructions: "Be brief.", input: "Say hello", store: false });
assert.equal(answer.status, "completed");
assert.equal(answer.output_text, text);
assert.equal(answer.usage.input_tokens, prompt);

const runner = client.responses.stream({ model: "claude-sonnet-4-5", input: "Say hello" });
let deltas = "";
for await (const event of runner) {
  if (event.type === "response.output_text.delta") deltas += event.delta;
}
const final = await runner.finalResponse();
assert.equal(deltas, text);
assert.equal(final.output_text, text);

const responseTools = [{ type: "function", name: "get_weather", parameters: { type: "object" } }];
const streamed = client.responses.stream({ model: "claude-sonnet-4-5", input: "Weather?", tools: responseTools });
const withCall = await streamed.finalResponse();
const calls = withCall.output.filter((item) => item.type === "function_call");
assert.equal(calls.length, 1);
assert.deepEqual(JSON.parse(calls[0].arguments), { city: "Paris" });

await assert.rejects(
  client.responses.create({ model: "claude-sonnet-4-5", input: "x" }, { headers: { "x-mock-status": "529" } }),
  (err) => err instanceof OpenAI.InternalServerError && err.status === 529,
);
console.log("ok");
