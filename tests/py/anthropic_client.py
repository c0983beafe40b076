"""Drives `strata serve`'s /v1/messages with the official Anthropic Python client (run by
tests/it/tools.rs): text, streaming, stop sequences, token counting, and a tool-use round
trip, whole and streamed.

usage: anthropic_client.py BASE_URL MODEL_ID OPENAI_GREEDY_TEXT
OPENAI_GREEDY_TEXT: the greedy answer /v1/chat/completions gave to the same prompt.
Prints one JSON object (the transcript) on the last line; exits non-zero on a failed check.
"""

import json
import sys

import anthropic

# Recent clients no longer send sampling parameters; the server takes them as extra fields.
GREEDY = {"temperature": 0}
PROMPT = "What is the capital of France? Answer in one sentence."
TOOLS = [{
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city's name"}},
        "required": ["city"],
    },
}]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def text_of(message):
    return "".join(b.text for b in message.content if b.type == "text")


def main():
    base, model, openai_text = sys.argv[1], sys.argv[2], sys.argv[3]
    client = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=600)
    msgs = [{"role": "user", "content": PROMPT}]

    # Text: the same greedy answer the OpenAI endpoint gives.
    r = client.messages.create(model=model, max_tokens=24, messages=msgs, extra_body=GREEDY)
    check(r.type == "message" and r.role == "assistant" and r.model == model, f"message {r}")
    text = text_of(r)
    check(text == openai_text, f"/v1/messages {text!r} vs /v1/chat/completions {openai_text!r}")
    check(r.stop_reason in ("end_turn", "max_tokens"), f"stop_reason {r.stop_reason}")
    check(r.usage.input_tokens > 0 and r.usage.output_tokens > 0, f"usage {r.usage}")

    # Streaming: the text deltas join to the same text, and the final message agrees.
    with client.messages.stream(model=model, max_tokens=24, messages=msgs, extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(streamed == text and text_of(final) == text, f"streamed {streamed!r} vs {text!r}")
    check(final.stop_reason == r.stop_reason and final.usage.output_tokens == r.usage.output_tokens, f"final {final}")

    # A stop sequence taken from the answer itself ends it there.
    words = text.split()
    check(len(words) >= 3, f"too short an answer to test stop sequences: {text!r}")
    stop = words[2]
    s = client.messages.create(model=model, max_tokens=24, messages=msgs, extra_body=GREEDY, stop_sequences=[stop])
    check(s.stop_reason == "stop_sequence" and s.stop_sequence == stop, f"stop {s.stop_reason} {s.stop_sequence}")
    check(text.startswith(text_of(s)) and stop not in text_of(s), f"stopped text {text_of(s)!r}")

    count = client.messages.count_tokens(model=model, messages=msgs)
    # Input tokens the server computed, and those it read from its prefix cache.
    used = r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0)
    check(count.input_tokens == used, f"count_tokens {count.input_tokens} vs {r.usage}")

    # Tool use: a forced call, whole and streamed, then its result and a final answer.
    ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    choice = {"type": "tool", "name": "get_weather"}
    t = client.messages.create(model=model, max_tokens=40, messages=ask, tools=TOOLS, tool_choice=choice, extra_body=GREEDY)
    uses = [b for b in t.content if b.type == "tool_use"]
    check(t.stop_reason == "tool_use" and len(uses) == 1, f"tool use {t}")
    use = uses[0]
    check(use.name == "get_weather" and isinstance(use.input, dict) and isinstance(use.input.get("city"), str), f"tool_use {use}")
    with client.messages.stream(model=model, max_tokens=40, messages=ask, tools=TOOLS, tool_choice=choice, extra_body=GREEDY) as stream:
        events = [e.type for e in stream]
        streamed_use = stream.get_final_message()
    s_uses = [b for b in streamed_use.content if b.type == "tool_use"]
    check(len(s_uses) == 1 and s_uses[0].input == use.input and s_uses[0].name == use.name, f"streamed tool use {streamed_use}")
    check(streamed_use.stop_reason == "tool_use", f"streamed stop_reason {streamed_use.stop_reason}")
    check("input_json" in events, f"no input_json events: {events}")

    result = json.dumps({"city": use.input["city"], "temperature_c": 18, "sky": "clear"})
    ask += [
        {"role": "assistant", "content": [b.model_dump() for b in t.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result}]},
    ]
    answer = client.messages.create(model=model, max_tokens=40, messages=ask, tools=TOOLS, extra_body=GREEDY)
    check(answer.stop_reason in ("end_turn", "max_tokens"), f"final stop_reason {answer.stop_reason}: {answer}")
    check(text_of(answer).strip() and not any(b.type == "tool_use" for b in answer.content), f"final answer {answer}")
    total = lambda u: u.input_tokens + (u.cache_read_input_tokens or 0)
    check(total(answer.usage) > total(t.usage), "the history grew")

    # A malformed request is a 400 in Anthropic's shape.
    try:
        client.messages.create(model=model, max_tokens=10, messages=[{"role": "robot", "content": "hi"}])
        check(False, "role robot was accepted")
    except anthropic.BadRequestError as e:
        check(e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error", f"error body {e.body}")

    print(json.dumps({
        "text": text,
        "tool_use": {"id": use.id, "name": use.name, "input": use.input},
        "stream_events": sorted(set(events)),
        "tool_result": result,
        "final_answer": text_of(answer),
    }))


if __name__ == "__main__":
    main()
