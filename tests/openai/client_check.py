"""Drives a Fathom server with the official `openai` Python client (run by tests/tests/openai_http.rs).

Reads a plan (JSON) on stdin:
  {"base_url": "http://127.0.0.1:P/v1", "max_tokens": N, "prompt": "...",
   "messages": [...], "stop": "..."}
and prints one JSON object with what the client got back: the model list, a completion, the
same completion with a stop string, a chat completion (with logprobs), a streamed chat
completion (with usage) and a streamed thinking-mode chat completion (reasoning_content split).
The Rust test compares these with the gRPC path's greedy output; this script only checks what
the client itself guarantees (types, stream shape) and fails loudly on any exception.
"""

import json
import sys

from openai import OpenAI


def usage(u):
    return None if u is None else {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def stream_chat(client, **kwargs):
    """Collects a streamed chat completion: content, reasoning, finish reason, usage, roles."""
    content, reasoning, roles = [], [], []
    finish, last_usage, chunks = None, None, 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        chunks += 1
        assert chunk.object == "chat.completion.chunk", chunk.object
        if chunk.usage is not None:
            last_usage = usage(chunk.usage)
        for choice in chunk.choices:
            delta = choice.delta
            if delta.role:
                roles.append(delta.role)
            if delta.content:
                content.append(delta.content)
            r = (delta.model_extra or {}).get("reasoning_content")
            if r:
                reasoning.append(r)
            if choice.finish_reason:
                finish = choice.finish_reason
    return {
        "content": "".join(content),
        "reasoning": "".join(reasoning),
        "content_pieces": len(content),
        "roles": roles,
        "finish_reason": finish,
        "usage": last_usage,
        "chunks": chunks,
    }


def main():
    plan = json.load(sys.stdin)
    client = OpenAI(base_url=plan["base_url"], api_key="not-needed", max_retries=0, timeout=60)
    out = {}

    models = client.models.list()
    out["models"] = [m.id for m in models.data]
    model = out["models"][0]
    n = plan["max_tokens"]

    c = client.completions.create(model=model, prompt=plan["prompt"], max_tokens=n, temperature=0)
    assert c.object == "text_completion", c.object
    out["completion"] = {
        "text": c.choices[0].text,
        "finish_reason": c.choices[0].finish_reason,
        "usage": usage(c.usage),
    }

    s = client.completions.create(
        model=model, prompt=plan["prompt"], max_tokens=n, temperature=0, stop=[plan["stop"]]
    )
    out["completion_stop"] = {
        "text": s.choices[0].text,
        "finish_reason": s.choices[0].finish_reason,
    }

    ch = client.chat.completions.create(
        model=model,
        messages=plan["messages"],
        max_tokens=n,
        temperature=0,
        seed=7,
        logprobs=True,
        top_logprobs=2,
    )
    assert ch.object == "chat.completion", ch.object
    msg = ch.choices[0].message
    assert msg.role == "assistant", msg.role
    out["chat"] = {
        "content": msg.content,
        "finish_reason": ch.choices[0].finish_reason,
        "usage": usage(ch.usage),
        "logprob_tokens": len(ch.choices[0].logprobs.content),
        "top_logprobs": [len(t.top_logprobs) for t in ch.choices[0].logprobs.content],
    }

    out["stream_chat"] = stream_chat(
        client,
        model=model,
        messages=plan["messages"],
        max_tokens=n,
        temperature=0,
        stream_options={"include_usage": True},
    )

    out["stream_thinking"] = stream_chat(
        client,
        model=model,
        messages=plan["messages"],
        max_tokens=n,
        temperature=0,
        extra_body={"chat_template_kwargs": {"thinking": True}},
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
