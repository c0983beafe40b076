"""Structured output against `strata serve` with the official OpenAI Python client (run by
tests/it/structured.rs): `response_format` with a strict JSON schema gives answers that
parse and validate, for 20 seeds in a row, while free requests share the batch with them
and answer as they do alone; `json_object` gives an object; streamed equals whole; beside
strict tools under `tool_choice: auto` every token is sampled under the grammar, and any
call made has arguments that validate.

usage: structured.py BASE_URL MODEL_ID
Prints what it saw as one JSON object on the last line (the Rust test compares it between
servers); exits non-zero on a failed check.
"""

import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"enum": ["Rust", "Python", "C", "Go"]}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": SCHEMA}}
PERSON = [{"role": "user", "content": "Describe a software engineer as JSON: name, age, languages."}]
FREE = ["Write one sentence about the sea.", "Name three colours.", "What is 2 + 2?", "Say hello in French."]


def grammar_masks(base):
    """The server's `strata_grammar_masks_total`."""
    root = base.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{root}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith("strata_grammar_masks_total "):
                return int(float(line.split()[1]))
    raise AssertionError("no strata_grammar_masks_total in /metrics")


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    base, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)

    def ask(messages, **kw):
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=80, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason

    def free(prompt):
        return ask([{"role": "user", "content": prompt}], temperature=0)

    def constrained(seed):
        text, finish = ask(PERSON, response_format=FORMAT, temperature=0.9, seed=seed)
        check(finish == "stop", f"seed {seed}: finish_reason {finish}: {text!r}")
        value = json.loads(text)
        jsonschema.validate(value, SCHEMA)
        return text

    # Alone first: the free answers, and the greedy constrained one.
    alone = [free(p) for p in FREE]
    greedy, finish = ask(PERSON, response_format=FORMAT, temperature=0)
    check(finish == "stop", f"greedy finish_reason {finish}: {greedy!r}")
    jsonschema.validate(json.loads(greedy), SCHEMA)

    # 20 seeds in a row, sampled, sharing steps with free requests.
    with ThreadPoolExecutor(max_workers=8) as pool:
        samples = pool.map(constrained, range(20))
        frees = pool.map(free, FREE)
        samples, frees = list(samples), list(frees)
    check(frees == alone, f"free answers changed beside constrained ones: {frees} vs {alone}")
    check(constrained(3) == samples[3], "the same seed, another answer")

    # Streamed equals whole.
    stream = client.chat.completions.create(
        model=model, messages=PERSON, max_tokens=80, response_format=FORMAT, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    check(streamed == greedy, f"streamed {streamed!r} vs whole {greedy!r}")

    # Any JSON object.
    obj, finish = ask([{"role": "user", "content": "Give me a JSON object about a cat."}],
                      response_format={"type": "json_object"}, temperature=0)
    check(finish == "stop" and isinstance(json.loads(obj), dict), f"json_object: {finish} {obj!r}")

    # Strict tools, the model free to call or not: what it writes is content without call
    # markup, or calls whose arguments follow the schema.
    weather = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 32}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city now.", "parameters": weather, "strict": True}}]
    ask_weather = [{"role": "user", "content": "What is the weather in Paris right now? Call get_weather."}]
    strict, sampled = [], 0
    masks_before = grammar_masks(base)
    for seed in range(4):
        r = client.chat.completions.create(model=model, messages=ask_weather, tools=tools, tool_choice="auto",
                                           temperature=1.0, seed=seed, max_tokens=40)
        m, finish = r.choices[0].message, r.choices[0].finish_reason
        calls = m.tool_calls or []
        for c in calls:
            check(c.function.name == "get_weather", f"seed {seed}: called {c.function.name}")
            jsonschema.validate(json.loads(c.function.arguments), weather)
        check(bool(calls) == (finish == "tool_calls"), f"seed {seed}: {finish} with {len(calls)} calls")
        if finish == "stop":
            check("<tool_call>" not in (m.content or ""), f"seed {seed}: call markup in the content: {m.content!r}")
        strict.append([m.content, [[c.function.name, c.function.arguments] for c in calls], finish])
        sampled += r.usage.completion_tokens
    # Every token of those answers was sampled under the grammar (SmolLM2-135M seldom
    # calls unforced: the grammar's own tests show the calls it holds).
    masks = grammar_masks(base) - masks_before
    check(masks >= sampled, f"{masks} grammar masks for {sampled} tokens sampled beside strict tools")

    print(json.dumps({"greedy": greedy, "samples": samples, "json_object": obj, "free": frees, "strict": strict}))


if __name__ == "__main__":
    main()
