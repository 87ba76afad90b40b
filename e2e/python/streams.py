"""Streamed chat completions with the official `openai` client, each one classified:
finished (a finish_reason came), lost before its first token (the goal is none),
ended by an error after its first token (reported to the client), or cut silently
(no finish_reason and no error: the goal is none). Shared by elastic_load.py and
soak.py."""

import threading
import time


class Outcomes:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"finished": 0, "lost": 0, "error_after_first_token": 0, "silent_cut": 0}
        self.ttfts = []
        # "kind: message" -> how many times.
        self.errors = {}

    def add(self, kind, ttft=None, error=None):
        with self.lock:
            self.counts[kind] += 1
            if ttft is not None:
                self.ttfts.append(ttft)
            if error is not None:
                key = f"{kind}: {error[:160]}"
                self.errors[key] = self.errors.get(key, 0) + 1

    def top_errors(self, n):
        with self.lock:
            return sorted(self.errors.items(), key=lambda e: -e[1])[:n]


def stream_once(client, model, outcomes, max_tokens):
    """One streamed chat completion; its time to first token, or None."""
    start = time.monotonic()
    first = None
    finish = None
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Tell me about the sea."}],
            max_tokens=max_tokens,
            stream=True,
        )
        for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if first is None and (choice.delta.content or choice.finish_reason):
                first = time.monotonic() - start
            if choice.finish_reason:
                finish = choice.finish_reason
    except Exception as e:  # noqa: BLE001 - every failure is classified
        kind = "lost" if first is None else "error_after_first_token"
        outcomes.add(kind, first, repr(e))
        return first
    if finish is None:
        outcomes.add("silent_cut", first, "the stream ended without a finish_reason")
    else:
        outcomes.add("finished", first)
    return first
