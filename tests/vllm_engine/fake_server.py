"""A stand-in for ``vllm serve`` (a test double, stdlib only): the OpenAI-compatible endpoints lmpo's server client
uses, answering with deterministic token ids and log-probs, so the client and its process handling are tested
without vLLM. Not an engine: every reply is token ``(prompt[-1] + k) % 50`` for k = 1..max_tokens, log-prob
``-0.1 * k``, stopped early at a stop token.

Usage: python fake_server.py --port P [--mode ok|malformed|die-after-1|no-logprobs|fail-start]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"requests": 0, "synced": []}


def completion(body: dict, mode: str) -> dict:
    choices = []
    prompts = body["prompt"]
    if prompts and isinstance(prompts[0], int):  # one prompt of token ids
        prompts = [prompts]
    for i, prompt in enumerate(prompts):
        toks, lps = [], []
        finish = "length"
        for k in range(1, int(body["max_tokens"]) + 1):
            t = (int(prompt[-1]) + k + len(STATE["synced"])) % 50
            toks.append(t)
            lps.append(-0.1 * k)
            if t in body.get("stop_token_ids", []):
                finish = "stop"
                break
        lp = {"tokens": [f"token_id:{t}" for t in toks], "token_logprobs": lps}
        if mode == "malformed":
            lp = {"tokens": ["hello"] * len(toks), "token_logprobs": lps}
        if mode == "no-logprobs":
            lp = None
        choices.append({"index": i, "text": "", "logprobs": lp, "finish_reason": finish})
    return {"id": "x", "object": "text_completion", "choices": choices}


class Handler(BaseHTTPRequestHandler):
    mode = "ok"

    def log_message(self, *a):
        pass

    def _send(self, code: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self._send(200, {})
        if self.path == "/v1/models":
            return self._send(200, {"data": [{"id": "fake-model"}]})
        return self._send(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/v1/completions":
            STATE["requests"] += 1
            if self.mode == "die-after-1" and STATE["requests"] > 1:
                os._exit(3)
            return self._send(200, completion(body, self.mode))
        if self.path == "/collective_rpc":
            STATE["synced"].append(body)
            return self._send(200, {"results": [len(STATE["synced"])]})
        if self.path == "/reset_prefix_cache":
            return self._send(200, {})
        return self._send(404, {"error": "not found"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--mode", default="ok")
    a = ap.parse_args()
    if a.mode == "fail-start":
        print("ValueError: Model architectures ['Nope'] are not supported", file=sys.stderr)
        sys.exit(1)
    Handler.mode = a.mode
    ThreadingHTTPServer((a.host, a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
