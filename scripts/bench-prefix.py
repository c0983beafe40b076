#!/usr/bin/env python3
"""The prompt-prefix reuse benchmark behind the README's figure: an agent's second turn
over a long context (a code file in the system prompt), its time to first token on a
server with the prefix cache against one without (`--no-prefix-cache`). Streams with the
standard library only. A benchmark, not a test: it prints what it measured.

usage: bench-prefix.py [STRATA_BINARY] [MODEL]   (defaults: target/release/strata, SmolLM2 Q4_1)
"""

import json
import subprocess
import sys
import time
import urllib.request

STRATA = sys.argv[1] if len(sys.argv) > 1 else "target/release/strata"
MODEL = sys.argv[2] if len(sys.argv) > 2 else "models/SmolLM2-135M-Instruct.Q4_1.gguf"
# About 1,500 tokens of code: what an editor agent sends with every turn.
CODE = "\n".join(
    f"def step_{i}(state, rows):\n    total = sum(r * {i} for r in rows)\n    return state + total  # step {i}\n"
    for i in range(60)
)


def serve(*flags):
    p = subprocess.Popen([STRATA, "serve", "--model", MODEL, "--listen", "127.0.0.1:0", *flags],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    return p, line.strip().split("://")[1]


def ttft(addr, messages):
    """Seconds to the first streamed content, the whole answer, and its usage."""
    body = json.dumps({"messages": messages, "max_tokens": 24, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, text, usage = None, "", None
    with urllib.request.urlopen(req) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    first = first or time.perf_counter() - t0
                    text += c["delta"]["content"]
    return first, text, usage


def turns(addr):
    messages = [{"role": "system", "content": "You are a coding agent. The file:\n" + CODE},
                {"role": "user", "content": "What does step_3 return?"}]
    t1, a1, u1 = ttft(addr, messages)
    messages += [{"role": "assistant", "content": a1}, {"role": "user", "content": "And step_7?"}]
    t2, a2, u2 = ttft(addr, messages)
    return {"turn1_ttft_s": t1, "turn2_ttft_s": t2, "turn2_prompt_tokens": u2["prompt_tokens"],
            "turn2_cached_tokens": u2.get("prompt_tokens_details", {}).get("cached_tokens", 0), "answers": [a1, a2]}


def main():
    results = {}
    for name, flags in [("no-cache", ["--no-prefix-cache"]), ("cache", [])]:
        p, addr = serve(*flags)
        try:
            results[name] = turns(addr)
        finally:
            p.kill()
        print(f"{name}: {json.dumps(results[name])}")
    same = results["cache"]["answers"] == results["no-cache"]["answers"]
    ratio = results["cache"]["turn2_ttft_s"] / results["no-cache"]["turn2_ttft_s"]
    print(f"turn 2 time to first token with the cache: {ratio:.3f}x of without "
          f"({results['cache']['turn2_cached_tokens']} of {results['cache']['turn2_prompt_tokens']} prompt tokens reused); "
          f"answers identical: {same}")


if __name__ == "__main__":
    main()
