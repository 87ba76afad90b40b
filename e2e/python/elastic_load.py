"""Load on a running `shardserve up` stack with the official `openai` client, to
see it scale and survive crashes. Run by e2e/tests/up.rs with the virtualenv's
Python (`make test` creates it).

Environment: OPENAI_BASE_URL (http://HOST:PORT/v1), SHARDSERVE_MODEL.

  elastic_load.py scale   a model at zero: one request (a cold start), then 16
                          clients streaming for LOAD_SECONDS (a second group
                          comes), then idle until no group is left; prints a
                          timeline of requests and groups.
  elastic_load.py crash   16 clients streaming for LOAD_SECONDS; prints
                          "load started" when the test may kill a worker.

Every stream is classified (streams.py): finished, lost before its first token,
ended by an error after it, or cut silently. Exits non-zero when a goal is missed
(nothing lost before its first token, nothing cut silently).
"""

import os
import re
import sys
import threading
import time
import urllib.request

import openai
from streams import Outcomes, stream_once

BASE_URL = os.environ["OPENAI_BASE_URL"]
MODEL = os.environ["SHARDSERVE_MODEL"]
METRICS_URL = BASE_URL.rsplit("/v1", 1)[0] + "/metrics"
CLIENTS = 16
LOAD_SECONDS = float(os.environ.get("LOAD_SECONDS", "15"))
T0 = time.monotonic()


def now():
    return time.monotonic() - T0


def metrics():
    """In-flight and held requests of the model, and its groups (healthy backends)."""
    try:
        text = urllib.request.urlopen(METRICS_URL, timeout=2).read().decode()
    except OSError:
        return None

    def gauge(name):
        m = re.search(rf'^{name}{{model="{re.escape(MODEL)}"}} (\S+)$', text, re.M)
        return int(float(m.group(1))) if m else 0

    groups = len(
        re.findall(
            rf'^shardserve_router_backend_healthy{{[^}}]*model="{re.escape(MODEL)}"[^}}]*}} 1$',
            text,
            re.M,
        )
    )
    return {
        "in_flight": gauge("shardserve_router_model_in_flight_requests"),
        "held": gauge("shardserve_router_model_held_requests"),
        "groups": groups,
    }


class Timeline(threading.Thread):
    """Samples the router's metrics twice a second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples = []
        self.running = True

    def run(self):
        while self.running:
            m = metrics()
            if m is not None:
                self.samples.append((now(), m))
            time.sleep(0.5)

    def groups(self):
        return self.samples[-1][1]["groups"] if self.samples else 0

    def max_groups(self):
        return max((m["groups"] for _, m in self.samples), default=0)

    def print(self):
        print("timeline (s, in-flight, held, groups), on each change:")
        last = None
        for t, m in self.samples:
            row = (m["in_flight"], m["held"], m["groups"])
            if row != last:
                print(f"  {t:6.1f}  {row[0]:3d}  {row[1]:3d}  {row[2]}")
                last = row


def load(client, outcomes, seconds, max_tokens):
    def worker():
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            stream_once(client, MODEL, outcomes, max_tokens)

    threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    return threads


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def report(outcomes):
    c = outcomes.counts
    print(
        f"streams: {sum(c.values())}  finished {c['finished']}  lost before the first token "
        f"{c['lost']}  errors after the first token {c['error_after_first_token']}  "
        f"silent cuts {c['silent_cut']}"
    )
    print(
        f"TTFT p50 {percentile(outcomes.ttfts, 0.5):.2f} s  p95 "
        f"{percentile(outcomes.ttfts, 0.95):.2f} s  max {max(outcomes.ttfts, default=0):.2f} s"
    )
    for error, n in outcomes.top_errors(5):
        print(f"  {n:5d}  {error}")


def fail(message):
    print(f"FAIL {message}", file=sys.stderr)
    sys.exit(1)


def scale(client):
    timeline = Timeline()
    timeline.start()
    ids = [m.id for m in client.models.list().data]
    if MODEL not in ids:
        fail(f"a model at zero stays listed: {ids}")
    time.sleep(1)
    if timeline.groups() != 0:
        fail("a group runs before any request")
    cold = Outcomes()
    ttft = stream_once(client, MODEL, cold, 8)
    if cold.counts["finished"] != 1:
        fail(f"the first request failed: {cold.errors}")
    print(f"{now():6.1f}  first request answered from zero, TTFT {ttft:.2f} s (a cold start)")
    outcomes = Outcomes()
    print(f"{now():6.1f}  {CLIENTS} clients stream for {LOAD_SECONDS:.0f} s")
    for t in load(client, outcomes, LOAD_SECONDS, 24):
        t.join()
    print(f"{now():6.1f}  load ended; most groups seen: {timeline.max_groups()}")
    if timeline.max_groups() < 2:
        fail("the load brought no second group")
    deadline = time.monotonic() + 90
    while timeline.groups() > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    if timeline.groups() != 0:
        fail("groups still run 90 s after the load ended")
    print(f"{now():6.1f}  no group left")
    timeline.running = False
    timeline.print()
    report(outcomes)
    c = outcomes.counts
    if c["lost"] or c["error_after_first_token"] or c["silent_cut"]:
        fail("requests failed while scaling")


def crash(client):
    outcomes = Outcomes()
    threads = load(client, outcomes, LOAD_SECONDS, 64)
    time.sleep(2)
    print("load started", flush=True)
    for t in threads:
        t.join()
    report(outcomes)
    c = outcomes.counts
    if c["finished"] == 0:
        fail("nothing finished")
    if c["lost"] or c["silent_cut"]:
        fail("requests lost before their first token, or streams cut silently")


def main():
    client = openai.OpenAI(base_url=BASE_URL, api_key="none", max_retries=0, timeout=300)
    {"scale": scale, "crash": crash}[sys.argv[1]](client)
    print("ok", flush=True)


if __name__ == "__main__":
    main()
