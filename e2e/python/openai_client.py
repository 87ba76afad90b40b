"""Drives a running `shardserve up` stack with the official `openai` client.

Run by e2e/tests/up.rs with the virtualenv's Python (`make test` creates it).
Environment: OPENAI_BASE_URL (http://HOST:PORT/v1) and SHARDSERVE_MODEL.
Prints one line per check; exits non-zero on the first failure.
"""

import os

import openai
from checks import check

BASE_URL = os.environ["OPENAI_BASE_URL"]
MODEL = os.environ["SHARDSERVE_MODEL"]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def main():
    client = openai.OpenAI(base_url=BASE_URL, api_key="none", max_retries=0, timeout=300)

    models = client.models.list()
    ids = [m.id for m in models.data]
    check("models.list names the served model", MODEL in ids, ids)

    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0
    )
    text = chat.choices[0].message.content
    check("chat answers", bool(text), chat)
    check("chat reports usage", chat.usage.completion_tokens > 0, chat.usage)
    check(
        "chat finish_reason",
        chat.choices[0].finish_reason in ("stop", "length"),
        chat.choices[0].finish_reason,
    )

    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, stream=True
    )
    streamed = "".join(
        chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
    )
    check("streamed text equals the non-streamed text", streamed == text, (streamed, text))

    completion = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    check("completions answer", bool(completion.choices[0].text), completion)

    try:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
        check("unknown model is refused", False, "no error")
    except openai.NotFoundError as e:
        check("unknown model is 404", e.status_code == 404, e)

    try:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, top_p=1.5)
        check("bad parameter is refused", False, "no error")
    except openai.BadRequestError as e:
        check("bad parameter is 400", e.status_code == 400, e)

    print("all openai client checks passed")


if __name__ == "__main__":
    main()
