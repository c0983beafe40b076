"""A full tool loop against `strata serve` with the official OpenAI Python client (run by
tests/it/tools.rs): a request with tools and `tool_choice="required"`, a call whose
arguments validate against the tool's schema (non-streamed and streamed, which must
agree), the tool's result sent back, and the final answer. A named `tool_choice` gives a
valid call of that function too.

usage: tool_loop.py BASE_URL MODEL_ID
Prints the transcript as one JSON object on the last line; exits non-zero on a failed check.
"""

import json
import sys

import jsonschema
import openai

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city's name"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    base, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    # One call: with parallel calls allowed, this small model writes the same call again
    # rather than end its turn (the grammar allows either).
    ask = dict(model=model, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=60, temperature=0)
    schema = TOOLS[0]["function"]["parameters"]

    # The call, whole.
    r = client.chat.completions.create(messages=messages, **ask)
    m = r.choices[0].message
    check(r.choices[0].finish_reason == "tool_calls", f"finish_reason {r.choices[0].finish_reason}: {m}")
    check(m.content is None, f"content beside the call: {m.content!r}")
    check(m.tool_calls is not None and len(m.tool_calls) == 1, f"tool_calls {m.tool_calls}")
    call = m.tool_calls[0]
    check(call.type == "function" and call.function.name == "get_weather", f"call {call}")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, schema)

    # A named function: its call, valid too.
    named = {"type": "function", "function": {"name": "get_weather"}}
    n = client.chat.completions.create(messages=messages, **{**ask, "tool_choice": named}).choices[0]
    check(n.finish_reason == "tool_calls" and len(n.message.tool_calls) == 1, f"named: {n}")
    jsonschema.validate(json.loads(n.message.tool_calls[0].function.arguments), schema)

    # The same call, streamed: the name first, then the arguments in increments, no content.
    stream = client.chat.completions.create(messages=messages, stream=True, **ask)
    names, ids, pieces, content, finishes = [], [], [], [], []
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.content:
                content.append(c.delta.content)
            for d in c.delta.tool_calls or []:
                check(d.index == 0, f"a second call: {d}")
                if d.function.name:
                    check(not pieces, "the name came after arguments")
                    names.append(d.function.name)
                if d.id:
                    ids.append(d.id)
                if d.function.arguments:
                    pieces.append(d.function.arguments)
            if c.finish_reason:
                finishes.append(c.finish_reason)
    check(content == [], f"content leaked into the stream: {content}")
    check(names == ["get_weather"] and len(ids) == 1, f"names {names}, ids {ids}")
    check("".join(pieces) == call.function.arguments, f"streamed arguments {''.join(pieces)!r} vs {call.function.arguments!r}")
    check(finishes == ["tool_calls"], f"finishes {finishes}")

    # The tool's result goes back; the model answers in words.
    result = json.dumps({"city": args["city"], "temperature_c": 18, "sky": "clear"})
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    final = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=40, temperature=0)
    f = final.choices[0]
    check(f.finish_reason in ("stop", "length"), f"final finish_reason {f.finish_reason}: {f.message}")
    check(f.message.tool_calls is None, f"a call instead of an answer: {f.message.tool_calls}")
    check(isinstance(f.message.content, str) and f.message.content.strip(), f"final content {f.message.content!r}")
    check(final.usage.prompt_tokens > r.usage.prompt_tokens, "the history grew")

    transcript = {
        "request": messages[0],
        "call": {"id": call.id, "name": call.function.name, "arguments": call.function.arguments},
        "streamed_argument_pieces": pieces,
        "tool_result": result,
        "final_answer": f.message.content,
        "final_finish_reason": f.finish_reason,
    }
    print(json.dumps(transcript))


if __name__ == "__main__":
    main()
