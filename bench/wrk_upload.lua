-- Scenario (e): 1 MiB request bodies to the mock's draining endpoint.
package.path = package.path .. ";" .. (os.getenv("BENCH_DIR") or "bench") .. "/?.lua"
require("wrk_report")
wrk.method = "POST"
wrk.path = "/v1/uploads"
wrk.body = string.rep("a", 1048576)
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "sk-bench-client")
function done(summary, latency, requests) report(summary, latency) end
