"""Checks `strata serve --api-key --tls-cert --tls-key --max-seqs 1 --max-queue 0` with
the official OpenAI Python client over HTTPS (run by tests/it/serve.rs).

usage: secure_client.py BASE_URL MODEL_ID CA_PEM API_KEY
The server must run with --max-body 4KiB and --ctx 2048. Prints one JSON object on the
last line; exits non-zero on a failed check.
"""

import json
import sys

import openai


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    base, model, ca, key = sys.argv[1:5]
    root = base.removesuffix("/v1")
    # The client class the openai package itself uses (httpx, or httpx2 in newer releases).
    http = openai.DefaultHttpxClient(verify=ca, timeout=600)
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, http_client=http)
    report = {}
    msgs = [{"role": "user", "content": "hello"}]

    # The right key over HTTPS: an answer.
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    check(r.usage.completion_tokens > 0, f"usage {r.usage}")
    report["answer"] = r.choices[0].message.content

    # A wrong key, and none at all: 401 in OpenAI's shape, naming the problem.
    for bad, what in [("wrong", "is wrong"), (None, "needs an API key")]:
        headers = {"Authorization": f"Bearer {bad}"} if bad else {}
        resp = http.post(f"{base}/chat/completions", headers=headers, json={"messages": msgs, "max_tokens": 4})
        check(resp.status_code == 401, f"key {bad!r}: status {resp.status_code}")
        err = resp.json()["error"]
        check(err["code"] == "invalid_api_key" and what in err["message"], f"key {bad!r}: {err}")
        check(resp.headers.get("www-authenticate") == "Bearer", f"WWW-Authenticate: {resp.headers}")
    try:
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0, http_client=http).models.list()
        check(False, "a wrong key listed the models")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, f"status {e.status_code}")
    # Anthropic-style header, /health and the page without a key.
    check(http.get(f"{base}/models", headers={"x-api-key": key}).status_code == 200, "x-api-key refused")
    check(http.get(f"{root}/health").status_code == 200, "/health needs no key")
    check(http.get(f"{root}/").status_code == 200, "the page needs no key")
    check(http.get(f"{root}/metrics").status_code == 401, "/metrics without the key")

    # Absurd parameters: 400s naming them.
    for params, name in [
        ({"max_tokens": 1_000_000}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"n": 5}, "n"),
        ({"logprobs": True, "top_logprobs": 500}, "top_logprobs"),
        ({"stop": ["x"] * 100}, "stop"),
        ({"stop": "y" * 2000}, "stop"),
    ]:
        try:
            client.chat.completions.create(model=model, messages=msgs, **params)
            check(False, f"{params} was accepted")
        except openai.BadRequestError as e:
            check(e.status_code == 400 and e.body.get("param") == name, f"{name}: {e.status_code} {e.body}")

    # A body over --max-body (4 KiB): 413 naming the limit.
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "z " * 4000}], max_tokens=4)
        check(False, "an oversized body was accepted")
    except openai.APIStatusError as e:
        check(e.status_code == 413 and "4096 bytes" in e.body["message"], f"413: {e.status_code} {e.body}")

    # One request runs (--max-seqs 1) and none may wait (--max-queue 0): while a long
    # stream is held open, another request gets 503 with Retry-After, and once the stream
    # is closed requests are taken again.
    stream = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=1900, temperature=1.0, seed=7, stream=True
    )
    first = next(iter(stream))
    check(first.choices[0].delta.role == "assistant", f"first chunk {first}")
    resp = http.post(f"{base}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={"messages": msgs, "max_tokens": 4})
    check(resp.status_code == 503, f"a request beyond the queue got {resp.status_code}: {resp.text}")
    check(resp.headers.get("retry-after") == "1", f"Retry-After: {resp.headers}")
    check(resp.json()["error"]["code"] == "queue_full", resp.text)
    report["queue_full"] = resp.json()["error"]["message"]
    stream.close()
    # The server notices the closed stream and frees its place; the client's own retries
    # (Retry-After) carry the next request through.
    patient = openai.OpenAI(base_url=base, api_key=key, max_retries=8, http_client=http)
    r = patient.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0)
    check(r.usage.completion_tokens > 0, f"after the stream: {r.usage}")
    metrics = http.get(f"{root}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    report["refused_503"] = sum(
        int(float(l.split()[-1])) for l in metrics.splitlines() if l.startswith("strata_requests_total") and 'status="503"' in l
    )
    check(report["refused_503"] >= 1, metrics)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
