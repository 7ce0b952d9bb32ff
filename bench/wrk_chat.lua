-- Scenario (a)/(b): non-streamed chat completion; the mock answers with
-- WORDS words (about 600 bytes). Run as: wrk -s bench/wrk_chat.lua URL
package.path = package.path .. ";" .. (os.getenv("BENCH_DIR") or "bench") .. "/?.lua"
require("wrk_report")
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in a few words."}]}'
wrk.headers["Content-Type"] = "application/json"
-- BENCH_KEY: a virtual key, for the run with keys, limits and usage on.
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "sk-bench-client")
wrk.headers["x-mock-chunks"] = os.getenv("WORDS") or "45"
function done(summary, latency, requests) report(summary, latency) end
