"""LoRA adapters through a running `shardserve up`, with the official `openai` client.

Run by e2e/tests/lora.rs with the virtualenv's Python (`make test` creates it).
Environment: OPENAI_BASE_URL (http://HOST:PORT/v1), SHARDSERVE_MODEL (the base),
SHARDSERVE_ADAPTERS (the manifest's adapter names, comma-separated) and
SHARDSERVE_BROKEN_ADAPTER (a PEFT directory whose v_proj does not fit the base).
Prints one line per check; exits non-zero on the first failure.
"""

import json
import os
import urllib.error
import urllib.request

import openai
from checks import check

BASE_URL = os.environ["OPENAI_BASE_URL"]
MODEL = os.environ["SHARDSERVE_MODEL"]
ADAPTERS = os.environ["SHARDSERVE_ADAPTERS"].split(",")
BROKEN = os.environ["SHARDSERVE_BROKEN_ADAPTER"]
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def post(path, body):
    """POSTs JSON to the router: (status, body text)."""
    request = urllib.request.Request(
        BASE_URL + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def greedy(client, model):
    chat = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=16, temperature=0
    )
    check(f"{model} answers under its own name", chat.model == model, chat.model)
    return chat.choices[0].message.content


def main():
    client = openai.OpenAI(base_url=BASE_URL, api_key="none", max_retries=0, timeout=300)

    models = {m.id: m.to_dict() for m in client.models.list().data}
    check("models.list has the base and each adapter", len(models) == 1 + len(ADAPTERS), models)
    for name in ADAPTERS:
        check(f"{name} is listed with its base as parent", models[name].get("parent") == MODEL, models)

    answers = {name: greedy(client, name) for name in [MODEL, *ADAPTERS]}
    check("three different greedy answers", len(set(answers.values())) == 3, answers)

    # An adapter unloaded while one of its requests streams: the stream finishes,
    # then the name is unknown.
    first = ADAPTERS[0]
    stream = client.chat.completions.create(
        model=first,
        messages=MESSAGES,
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)
    status, text = post("/unload_lora_adapter", {"lora_name": first})
    check("unload answers 200", status == 200, text)
    rest = list(chunks)
    finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    text = "".join(c.choices[0].delta.content or "" for c in rest if c.choices)
    check("the stream under way finished", finish == ["length"] and text, (finish, text))
    try:
        client.chat.completions.create(model=first, messages=MESSAGES, max_tokens=4)
        check("an unloaded adapter is refused", False, "no error")
    except openai.NotFoundError as e:
        check("an unloaded adapter is 404", e.status_code == 404, e)
    names = [m.id for m in client.models.list().data]
    check("an unloaded adapter leaves models.list", first not in names, names)

    # A bad adapter: 400 naming the problem; serving goes on.
    status, text = post("/load_lora_adapter", {"lora_name": "broken", "lora_path": BROKEN})
    check("a bad adapter is 400", status == 400, text)
    message = json.loads(text)["error"]["message"]
    check("the refusal names the tensor", "v_proj" in message, message)
    check("the base still answers as before", greedy(client, MODEL) == answers[MODEL])
    status, text = post(
        "/load_lora_adapter", {"lora_name": first, "lora_path": os.environ["SHARDSERVE_RELOAD"]}
    )
    check("an adapter loads at run time", status == 200, text)
    check("it answers as before", greedy(client, first) == answers[first])

    print("all LoRA client checks passed")


if __name__ == "__main__":
    main()
