-- wrk script for the overhead benchmark: POST one small chat completion per request and
-- print one machine-readable RESULT line (run.py parses it). The model name comes from
-- the MODEL environment variable (the instant server's or the gateway's name for it); an
-- API_KEY one, when set, is sent as `Authorization: Bearer` (a distillgate key, LiteLLM's
-- master key).
local model = os.getenv("MODEL") or "instant"
local key = os.getenv("API_KEY")
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"Say hello."}],'
  .. '"max_tokens":16,"temperature":0}'

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
      .. '"mean_us":%.1f,"errors":%d,"non2xx":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, e.connect + e.read + e.write + e.timeout, e.status))
end
