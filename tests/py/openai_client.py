"""Drives `strata serve` with the official OpenAI Python client (run by tests/it/serve.rs).

usage: openai_client.py BASE_URL MODEL_ID CHECKS_JSON

CHECKS_JSON: {"greedy_prompt": str, "greedy_text": str, "max_tokens": int,
              "concurrent_prompts": [str, ...]}
Prints one JSON object of measurements on the last line; exits non-zero on a failed check.
"""

import json
import math
import sys
import threading
import time

import openai


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    base, model, checks = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
    n = checks["max_tokens"]
    report = {}

    # /v1/models
    models = client.models.list()
    ids = [m.id for m in models.data]
    check(ids == [model], f"/v1/models lists {ids}, expected [{model!r}]")

    # Non-streaming greedy chat equals `strata run --chat`'s greedy output.
    msgs = [{"role": "user", "content": checks["greedy_prompt"]}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=n, temperature=0)
    text = r.choices[0].message.content
    check(text == checks["greedy_text"], f"greedy chat differs from strata run:\n  server: {text!r}\n  run:    {checks['greedy_text']!r}")
    check(r.choices[0].finish_reason in ("stop", "length"), f"finish_reason {r.choices[0].finish_reason}")
    check(r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0, f"usage {r.usage}")
    check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "usage totals")
    check(r.object == "chat.completion" and r.model == model, f"object/model: {r.object} {r.model}")

    # Streaming: same text, role first, finish_reason last, usage chunk when asked.
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=n, temperature=0, stream=True, stream_options={"include_usage": True})
    parts, roles, finishes, usage = [], [], [], None
    for chunk in stream:
        check(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object}")
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finishes.append(c.finish_reason)
    check("".join(parts) == text, f"streamed text differs: {''.join(parts)!r} vs {text!r}")
    check(roles == ["assistant"], f"roles {roles}")
    check(finishes == [r.choices[0].finish_reason], f"finish reasons {finishes}")
    check(usage is not None and usage.completion_tokens == r.usage.completion_tokens, f"stream usage {usage}")

    # A stop sequence: output ends before it, nothing of it shows, finish_reason stop.
    words = text.split()
    if len(words) >= 3:
        stop = " " + words[2]
        cut = text[: text.index(stop)]
        for streaming in (False, True):
            if streaming:
                s = client.chat.completions.create(model=model, messages=msgs, max_tokens=n, temperature=0, stop=[stop], stream=True)
                got, fin = "", None
                for chunk in s:
                    for c in chunk.choices:
                        got += c.delta.content or ""
                        fin = c.finish_reason or fin
            else:
                rr = client.chat.completions.create(model=model, messages=msgs, max_tokens=n, temperature=0, stop=stop)
                got, fin = rr.choices[0].message.content, rr.choices[0].finish_reason
            check(got == cut, f"stop {stop!r} (stream={streaming}): got {got!r}, expected {cut!r}")
            check(fin == "stop", f"stop finish_reason {fin}")
        report["stop_checked"] = stop

    # The same seed twice gives the same sampled answer; content parts as a list work.
    seeded = dict(model=model, max_tokens=n, temperature=1.0, top_p=0.95, seed=1234,
                  messages=[{"role": "system", "content": "You are a poet."}, {"role": "user", "content": [{"type": "text", "text": "Write about the sea."}]}])
    a = client.chat.completions.create(**seeded).choices[0].message.content
    b = client.chat.completions.create(**seeded).choices[0].message.content
    check(a == b, f"same seed, different answers:\n  {a!r}\n  {b!r}")
    report["seeded_text"] = a

    # /v1/completions, plain and streaming.
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    cs = "".join(ch.choices[0].text for ch in client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if ch.choices)
    check(c.choices[0].text == cs and len(cs) > 0, f"completions: {c.choices[0].text!r} vs streamed {cs!r}")

    # Log-probabilities: greedy picks the most likely token, so each token's logprob is
    # its list's first; the tokens spell the answer; streamed equals non-streamed.
    lp = client.chat.completions.create(model=model, messages=msgs, max_tokens=n, temperature=0, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    check(lp.choices[0].message.content == r.choices[0].message.content, "logprobs changed the greedy answer")
    check(len(content) == lp.usage.completion_tokens, f"{len(content)} logprob entries for {lp.usage.completion_tokens} tokens")
    for e in content:
        check(len(e.top_logprobs) == 3, f"top_logprobs {e.top_logprobs}")
        check(e.logprob <= 0 and abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6, f"entry {e}")
        check(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob, f"order {e.top_logprobs}")
        check(sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1.0 + 1e-4, f"probabilities {e.top_logprobs}")
    if lp.choices[0].finish_reason == "length":
        check(b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == lp.choices[0].message.content, "tokens do not spell the answer")
    streamed = [e for ch in client.chat.completions.create(model=model, messages=msgs, max_tokens=n, temperature=0, logprobs=True, top_logprobs=3, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    check([(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content], "streamed logprobs differ")
    report["logprobs_first"] = [(e.token, round(e.logprob, 4)) for e in content[:3]]

    # Concurrency: every prompt alone, then all at once; each answer must be the same.
    prompts = checks["concurrent_prompts"]

    def one(p, out, i):
        t0 = time.perf_counter()
        first = None
        text = ""
        toks = 0
        s = client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], max_tokens=n, temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in s:
            if chunk.usage is not None:
                toks = chunk.usage.completion_tokens
            for ch in chunk.choices:
                if ch.delta.content:
                    first = first or time.perf_counter()
                    text += ch.delta.content
        out[i] = (text, toks, (first or time.perf_counter()) - t0, time.perf_counter() - t0)

    alone = [None] * len(prompts)
    for i, p in enumerate(prompts):
        one(p, alone, i)

    def together(k):
        out = [None] * k
        threads = [threading.Thread(target=one, args=(prompts[i], out, i)) for i in range(k)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        return out, wall

    throughput = {}
    for k in (1, 4, len(prompts)):
        out, wall = together(k)
        for i in range(k):
            check(out[i] is not None, f"concurrent request {i} of {k} did not finish")
            check(out[i][0] == alone[i][0], f"prompt {i} with {k} concurrent: {out[i][0]!r} vs alone {alone[i][0]!r}")
        toks = sum(o[1] for o in out)
        throughput[k] = {"tokens": toks, "seconds": round(wall, 2), "tokens_per_s": round(toks / wall, 2),
                         "mean_ttft_s": round(sum(o[2] for o in out) / k, 3), "max_ttft_s": round(max(o[2] for o in out), 3)}
    report["throughput"] = throughput
    print(json.dumps(report))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"CHECK FAILED: {e}", file=sys.stderr)
        sys.exit(1)
