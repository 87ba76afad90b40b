"""The GPU check (scripts/gpu-check.sh runs it): shardserve's `cuda` binary against
transformers on random-weight Llama checkpoints made here with torch, its speed on
Llama-3.1-8B's shape in bf16, and the GGUF demo model through `--device cuda`.

Prints one line per check and a summary; exits non-zero when a check fails. Needs
torch, transformers and safetensors, no internet. `--dry-run` runs the same plumbing on
a machine without a GPU (candle's CPU device, a small stand-in for the 8B shape), to
test this script.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

# A prompt position passes when shardserve's log-probabilities of its 20 best tokens
# are within this of transformers' f32 ones (the KV cache is f16 on the device, which
# alone moves them by ~1e-3)...
MAX_ABS_LOGPROB = 0.05
# ...and the mean KL divergence over positions, on those 20 tokens (renormalised), is
# below this.
MAX_MEAN_KL = 1e-3
# The same for bf16 weights, against transformers in f32 on those weights: shardserve
# also rounds each product's input and output to bf16 (the dry run measured 1.5e-2
# and 5e-6, as close as f32).
MAX_ABS_LOGPROB_BF16 = 0.1
MAX_MEAN_KL_BF16 = 1e-3
TOP = 20
# Teacher-forced best token of the demo model against the golden answers (README:
# a faithful engine agrees at >= 96% of positions).
DEMO_AGREEMENT = 0.96

FAILURES = []
STARTED = time.time()
# The 8B shape's op-by-op profile (one more load of 16 GB) runs only if the check has
# used less than this much of its 8 minutes.
PROFILE_BEFORE_S = 360


def log(msg):
    print(msg, flush=True)


def check(name, ok, detail):
    log(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        FAILURES.append(name)


def run(cmd, timeout, env=None):
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:3])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return proc.stdout, time.time() - started


def bytes_to_unicode():
    """GPT-2's byte-level alphabet: printable stand-ins for the 256 bytes."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer(path, vocab_size):
    """A byte-level BPE without merges (id = byte), an end-of-text token, and fillers
    up to the model's vocabulary so that every id decodes."""
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    eos = 256
    for i in range(257, vocab_size):
        vocab[f"<filler_{i}>"] = i
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": eos, "content": "<|end_of_text|>", "single_word": False,
             "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                          "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                    "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": []},
    }
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|end_of_text|>", "add_bos_token": False}, f)


def llama_config(hidden, layers, heads, kv_heads, ffn, vocab, dtype):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        vocab_size=vocab,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=256,
        torch_dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


# -- 1. logits against transformers, f32 ----------------------------------------------


def small_model_check(args, work, device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    vocab = 2048
    config = llama_config(512, 4, 8, 2, 1408, vocab, "float32")
    # Wider than the default init, so that distributions are peaked, not flat.
    config.initializer_range = 0.08
    model = LlamaForCausalLM(config).eval()
    path = os.path.join(work, "llama-small-f32")
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, vocab)
    model = LlamaForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, attn_implementation="eager"
    )
    ids = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = reference_logprobs(model, ids, device)

    launch_overhead(args, path)
    for tensor in (1, 2):
        compare_logprobs(args, path, ids, ref, tensor, "f32", MAX_ABS_LOGPROB, MAX_MEAN_KL)

    # The same weights in bf16, as most checkpoints are stored: the device backend
    # rounds activations to bf16 for cuBLAS's bf16 products. Reference: transformers
    # in f32 on the bf16-rounded weights, so only shardserve's roundings differ.
    path16 = os.path.join(work, "llama-small-bf16")
    model = LlamaForCausalLM.from_pretrained(
        path, torch_dtype=torch.bfloat16, attn_implementation="eager"
    )
    model.save_pretrained(path16, safe_serialization=True)
    write_tokenizer(path16, vocab)
    ref16 = reference_logprobs(model.float(), ids, device)
    compare_logprobs(args, path16, ids, ref16, 1, "bf16", MAX_ABS_LOGPROB_BF16,
                     MAX_MEAN_KL_BF16)
    sampling_check(args, path, ids)
    long_context_check(args, path)
    graphs_check(args, path, ids)


def reference_logprobs(model, ids, device):
    """transformers' log-softmax of the logits at each position of `ids`, in f32 on
    `device`; the GPU's memory is given back."""
    model = model.to(device).eval()
    with torch.no_grad():
        ref = torch.log_softmax(
            model(torch.tensor([ids], device=device)).logits[0].float(), dim=-1
        ).cpu()
    model.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()
    return ref


def compare_logprobs(args, path, ids, ref, tensor, label, max_abs, max_kl):
    """shardserve's prompt log-probabilities of each position's 20 best tokens against
    transformers' (`ref`, one log-softmax row per position)."""
    out, secs = run(
        [args.bin, "generate", "--model", path, "--device", args.device,
         "--tensor", str(tensor), "--prompt-ids", ",".join(map(str, ids)),
         "--max-tokens", "0", "--prompt-logprobs", str(TOP), "--json",
         "--max-seq-len", "512"],
        timeout=120,
    )
    scores = json.loads(out)["prompt_logprobs"]
    worst, kls, agree = 0.0, [], 0
    for pos in range(1, len(ids)):
        row = ref[pos - 1]
        top = scores[pos]["top"]
        got = torch.tensor([t["logprob"] for t in top], dtype=torch.float64)
        want = torch.tensor([row[t["id"]].item() for t in top], dtype=torch.float64)
        worst = max(worst, (got - want).abs().max().item())
        # KL(transformers || shardserve) over these tokens, each side renormalised.
        p, q = torch.log_softmax(want, 0), torch.log_softmax(got, 0)
        kls.append(float((p.exp() * (p - q)).sum()))
        agree += top[0]["id"] == int(row.argmax())
    mean_kl = sum(kls) / len(kls)
    check(
        f"{label} logits vs transformers, tensor={tensor}",
        worst <= max_abs and mean_kl <= max_kl,
        f"max |Δ logprob| {worst:.2e} (limit {max_abs}), mean KL on the top "
        f"{TOP} {mean_kl:.2e} (limit {max_kl}), best token equal at "
        f"{agree}/{len(ids) - 1} positions; {secs:.1f} s",
    )


def sampling_check(args, path, ids):
    """Seeded sampled answers, drawn on the GPU after their penalties (only ids and the
    log-probabilities asked for come back) and by the CPU engine on the host from the same seeds: the
    same uniform numbers through the same filters give the same tokens where the
    logits agree (they do to ~1e-2 here), and the same log-probabilities."""
    # (temperature, top-k, top-p, min-p, repetition penalty); temperature 0 is greedy.
    settings = [(0.8, 0, 1.0, 0.0, 1.0), (1.0, 0, 0.9, 0.0, 1.3), (0.7, 40, 1.0, 0.0, 1.0),
                (1.2, 0, 1.0, 0.05, 1.0), (0.9, 20, 0.8, 0.02, 1.1), (0.0, 0, 1.0, 0.0, 1.5)]
    answers = {}
    for device in (args.device, "cpu"):
        for seed, (temperature, top_k, top_p, min_p, repetition) in enumerate(settings * 2):
            out, _ = run(
                [args.bin, "generate", "--model", path, "--device", device,
                 "--prompt-ids", ",".join(map(str, ids[:32])), "--max-tokens", "16",
                 "--temperature", str(temperature), "--top-k", str(top_k),
                 "--top-p", str(top_p), "--min-p", str(min_p), "--seed", str(seed),
                 "--repetition-penalty", str(repetition),
                 "--logprobs", "3", "--json", "--max-seq-len", "512"],
                timeout=60,
            )
            answers.setdefault(device, []).append(json.loads(out))
    here, there = answers[args.device], answers["cpu"]
    same = [(a, b) for a, b in zip(here, there) if a["token_ids"] == b["token_ids"]]
    distinct = len({tuple(a["token_ids"]) for a in here})  # greedy ones repeat
    worst = 0.0
    for a, b in same:
        for x, y in zip(a["logprobs"], b["logprobs"]):
            pairs = [(x, y)] + list(zip(x["top"], y["top"]))
            for p, q in pairs:
                worst = max(worst, abs(p["logprob"] - q["logprob"]) if p["id"] == q["id"]
                            else float("inf"))
    check(
        "sampled tokens and log-probabilities taken on the device",
        len(same) >= len(here) - 2 and distinct > len(here) // 2
        and worst <= MAX_ABS_LOGPROB,
        f"{len(same)}/{len(here)} seeded answers (16 tokens, temperature/top-k/top-p/min-p/"
        f"repetition penalty mixed) identical to the CPU engine's (limit {len(here) - 2}); {distinct} distinct; "
        f"their log-probabilities (chosen and 3 best) within {worst:.2e} "
        f"(limit {MAX_ABS_LOGPROB})",
    )


def long_context_check(args, path):
    """Greedy decode after a prompt of 1,600 tokens, on the device and on the CPU
    engine: each decode token's positions are then split into chunks (1 token of 8
    heads: 3 chunks of 640), whose partial softmaxes a second kernel merges, a path
    prompts of a few hundred tokens never take."""
    ids = torch.randint(0, 256, (1600,), generator=torch.Generator().manual_seed(3)).tolist()
    same, worst = greedy_agreement(args, path, ids, 12, 2048,
                                   [(args.device, None), ("cpu", None)])
    check(
        "long-context decode (attention split into chunks) against the CPU engine",
        same and worst <= MAX_ABS_LOGPROB,
        f"12 greedy tokens after 1,600 prompt tokens {'identical' if same else 'differ'}; "
        f"log-probabilities within {worst:.2e} (limit {MAX_ABS_LOGPROB})",
    )


GRAPHS = {"SHARDSERVE_CUDA_GRAPHS": "1"}


def greedy_agreement(args, path, ids, tokens, max_seq_len, runs):
    """Greedy answers to the prompt `ids` by two runs ((device, environment) each):
    whether their tokens are identical, and the largest difference between their
    log-probabilities."""
    answers = []
    for device, env in runs:
        out, _ = run(
            [args.bin, "generate", "--model", path, "--device", device,
             "--prompt-ids", ",".join(map(str, ids)), "--max-tokens", str(tokens),
             "--temperature", "0", "--logprobs", "1", "--json",
             "--max-seq-len", str(max_seq_len)],
            timeout=120, env=env,
        )
        answers.append(json.loads(out))
    a, b = answers
    worst = max((abs(x["logprob"] - y["logprob"])
                 for x, y in zip(a["logprobs"], b["logprobs"])), default=float("inf"))
    return a["token_ids"] == b["token_ids"], worst


def launch_overhead(args, path):
    """A decode step of the small model computes next to nothing: its time is the
    step's fixed cost (kernel launches, the upload, the download, the host's share),
    what CUDA graphs or fusion would cut; measured eagerly and with decode steps
    recorded as CUDA graphs and replayed (SHARDSERVE_CUDA_GRAPHS=1)."""
    for label, env in (("eager", None), ("CUDA graphs", GRAPHS)):
        out, _ = run(
            [args.bin, "bench", "--model", path, "--device", args.device,
             "--prompt-tokens", "16", "--gen-tokens", "64", "--batch", "1",
             "--repetitions", "3", "--json"],
            timeout=120, env=env,
        )
        report = json.loads(out)
        rate = report["results"][0]["decode_tok_s"]
        step_ms = 1000 / rate if rate else float("nan")
        log(f"launch overhead ({label}): a decode step of the 4-layer model takes "
            f"{step_ms:.2f} ms ({1000 * step_ms / 4:.0f} us per layer, head and sampling "
            f"included; {report.get('replayed_steps', 0)} steps replayed)")
        if env:
            check("decode steps recorded and replayed", report.get("replayed_steps", 0) > 0,
                  f"{report.get('replayed_steps', 0)} of the bench's decode steps replayed "
                  "(0 would mean that recording failed: the worker warns why)")
    profile(args, path, "the 4-layer model")


def graphs_check(args, path, ids):
    """Greedy answers with decode steps recorded as CUDA graphs and replayed against
    the same answers run eagerly: the same tokens, log-probabilities within the check's
    limit (replays split attention as for full block tables, so sums may round apart)."""
    same, worst = greedy_agreement(args, path, ids[:48], 40, 512,
                                   [(args.device, None), (args.device, GRAPHS)])
    check(
        "decode steps replayed as CUDA graphs against eager steps",
        same and worst <= MAX_ABS_LOGPROB,
        f"40 greedy tokens {'identical' if same else 'differ'}; log-probabilities within "
        f"{worst:.2e} (limit {MAX_ABS_LOGPROB})",
    )


def profile(args, path, label):
    """Decode steps at batch 1 timed op by op (SHARDSERVE_PROFILE=1): each op's host
    time (call to return: launches) against its device time (to the end of its work).
    Where the host's share is most of the device's, CUDA graphs would pay."""
    out, secs = run(
        [args.bin, "bench", "--model", path, "--device", args.device, "--prompt-tokens", "16",
         "--gen-tokens", "32", "--batch", "1", "--repetitions", "1", "--json"],
        timeout=args.bench_timeout, env={"SHARDSERVE_PROFILE": "1"},
    )
    ops = json.loads(out).get("profile", [])
    steps = next((t["calls"] for t in ops if t["op"] == "upload (begin)"), 0)
    if not steps:
        log(f"profile of {label}: none reported")
        return
    log(f"profile of {label}, {steps} steps at batch 1, each op synchronised "
        f"(us per step; {secs:.0f} s):")
    log(f"  {'op':<26} {'calls':>6} {'host':>9} {'device':>9}")
    for t in sorted(ops, key=lambda t: -t["total_us"]):
        log(f"  {t['op']:<26} {t['calls'] / steps:>6.1f} {t['host_us'] / steps:>9.1f} "
            f"{t['total_us'] / steps:>9.1f}")
    host = sum(t["host_us"] for t in ops) / steps
    total = sum(t["total_us"] for t in ops) / steps
    log(f"  {'all':<26} {'':>6} {host:>9.1f} {total:>9.1f}")


# -- 2. throughput on Llama-3.1-8B's shape, bf16 --------------------------------------


def hbm_bandwidth():
    """The GPU's memory bandwidth bound, bytes/s, from its clock and bus width, and the
    name of the GPU."""
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8, props.name
    known = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
             "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12, "L40S": 0.864e12}
    for key, bw in known.items():
        if key in props.name:
            return bw, props.name
    return None, props.name


def measured_copy_bandwidth():
    """What a device-to-device copy reaches (read + write), bytes/s."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    started = time.time()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    rate = 2 * 10 * x.numel() / (time.time() - started)
    del x, y
    torch.cuda.empty_cache()
    return rate


def write_random_checkpoint(path, config, device, dtype):
    """Llama weights, N(0, 0.02), written straight as safetensors shards (building a
    transformers model of 8B parameters on the host would take minutes)."""
    from safetensors.torch import save_file

    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = h // config.num_attention_heads
    kv = config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "lm_head.weight": (v, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    write_tokenizer(path, v)
    generator = torch.Generator(device=device).manual_seed(2)
    shard, shard_bytes, index, n = {}, 0, {}, 0
    total = 0

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=dtype, device=device).normal_(
                0.0, 0.02, generator=generator).cpu()
        shard[name] = t
        shard_bytes += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if shard_bytes >= 4 << 30:
            flush()
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    if device == "cuda":
        torch.cuda.empty_cache()
    return total


def throughput_check(args, work, device):
    if args.dry_run:
        config = llama_config(256, 2, 8, 2, 512, 4096, "bfloat16")
        label = "a 2-layer stand-in for Llama-3.1-8B's shape"
    else:
        config = llama_config(4096, 32, 32, 8, 14336, 128256, "bfloat16")
        label = "Llama-3.1-8B's shape"
    path = os.path.join(work, "llama-8b-shape-bf16")
    started = time.time()
    weight_bytes = write_random_checkpoint(path, config, device, torch.bfloat16)
    log(f"made {label} in bf16: {weight_bytes / 1e9:.2f} GB of random weights in "
        f"{time.time() - started:.0f} s")
    prompt, gen = (512, 64) if not args.dry_run else (64, 8)
    # Medians of 3 repetitions, as the run with CUDA graphs below takes them.
    out, secs = run(
        [args.bin, "bench", "--model", path, "--device", args.device,
         "--prompt-tokens", str(prompt), "--gen-tokens", str(gen),
         "--batch", "1,16,64", "--repetitions", "3", "--json"],
        timeout=args.bench_timeout,
    )
    report = json.loads(out)
    bound = None
    if device == "cuda":
        bandwidth, name = hbm_bandwidth()
        copy = measured_copy_bandwidth()
        log(f"GPU: {name}; HBM bound {bandwidth / 1e12 if bandwidth else float('nan'):.2f} TB/s"
            f" (clock x bus width), a device copy reaches {copy / 1e12:.2f} TB/s")
        if bandwidth:
            # Batch-1 decode reads every weight once per token (the KV cache of 576
            # positions is ~0.1% of that).
            bound = bandwidth / weight_bytes
    log(f"bench on {label}, {prompt}-token prompts, {gen} generated ({secs:.0f} s in all):")
    log("  batch  prefill tok/s  decode tok/s  engine us/step")
    for row in report["results"]:
        extra = ""
        if row["batch"] == 1 and bound:
            extra = (f"   HBM bound {bound:.0f} tok/s: {100 * row['decode_tok_s'] / bound:.0f}% "
                     "of it (goal >= 80%)")
        log(f"  {row['batch']:>5}  {row['prefill_tok_s']:>13.0f}  {row['decode_tok_s']:>12.1f}"
            f"  {row['decode_engine_us_per_step']:>14.1f}{extra}")
    check("bf16 bench ran at batch 1, 16 and 64", len(report["results"]) == 3,
          f"{len(report['results'])} rows")
    # What picking tokens on the device costs: the same decode sampled (penalty, draw
    # with top-p and top-k) against greedy.
    out, secs = run(
        [args.bin, "bench", "--model", path, "--device", args.device,
         "--prompt-tokens", str(prompt), "--gen-tokens", str(gen),
         "--batch", "64", "--repetitions", "3", "--json", "--temperature", "0.8",
         "--top-p", "0.9", "--top-k", "50", "--repetition-penalty", "1.1"],
        timeout=args.bench_timeout,
    )
    sampled = json.loads(out)["results"][0]["decode_tok_s"]
    greedy = report["results"][-1]["decode_tok_s"]
    log(f"  batch 64 sampled (temperature 0.8, top-p 0.9, top-k 50, repetition penalty 1.1): "
        f"decode {sampled:.1f} tok/s, {100 * (sampled / greedy - 1):+.1f}% against greedy "
        f"({secs:.0f} s)")
    if time.time() - STARTED < PROFILE_BEFORE_S:
        # Decode steps recorded as CUDA graphs and replayed (SHARDSERVE_CUDA_GRAPHS=1);
        # the median of 3 repetitions, so that the recording of each batch's shape (in
        # the first) does not count.
        out, secs = run(
            [args.bin, "bench", "--model", path, "--device", args.device,
             "--prompt-tokens", str(prompt), "--gen-tokens", str(gen),
             "--batch", "1,16,64", "--repetitions", "3", "--json"],
            timeout=args.bench_timeout, env=GRAPHS,
        )
        for row, eager in zip(json.loads(out)["results"], report["results"]):
            log(f"  batch {row['batch']:>3} with CUDA graphs: decode {row['decode_tok_s']:.1f} "
                f"tok/s ({100 * (row['decode_tok_s'] / eager['decode_tok_s'] - 1):+.1f}% "
                f"against eager; {secs:.0f} s)")
    else:
        log(f"CUDA graphs on {label}: skipped, past {PROFILE_BEFORE_S} s of the budget")
    if time.time() - STARTED < PROFILE_BEFORE_S:
        profile(args, path, label)
    else:
        log(f"profile of {label}: skipped, past {PROFILE_BEFORE_S} s of the budget")


# -- 3. the GGUF demo model ------------------------------------------------------------


def demo_check(args):
    if not (args.demo and os.path.exists(args.demo)):
        check("GGUF demo model through --device " + args.device, False,
              f"the demo model is not at {args.demo} (carry it: see scripts/gpu-check.sh)")
        return
    if not (args.golden and os.path.exists(args.golden)):
        check("GGUF demo model through --device " + args.device, False,
              f"the golden answers are not at {args.golden}")
        return
    agree = total = 0
    worst_gap = 0.0
    started = time.time()
    with open(args.golden) as f:
        cases = [json.loads(line) for line in f if line.strip()]
    for case in cases:
        prompt = case["chat_prompt_ids"]
        ids = prompt + case["greedy_ids"]
        out, _ = run(
            [args.bin, "generate", "--model", args.demo, "--device", args.device,
             "--prompt-ids", ",".join(map(str, ids)), "--max-tokens", "0",
             "--prompt-logprobs", "1", "--json"],
            timeout=60,
        )
        scores = json.loads(out)["prompt_logprobs"]
        for pos in range(len(prompt), len(ids)):
            entry = scores[pos]
            best = entry["top"][0]
            total += 1
            if best["id"] == ids[pos]:
                agree += 1
            else:
                worst_gap = max(worst_gap, best["logprob"] - entry["logprob"])
    rate = agree / max(total, 1)
    check(
        "GGUF demo model through --device " + args.device,
        total > 0 and rate >= DEMO_AGREEMENT,
        f"best token equals the golden answer at {agree}/{total} teacher-forced positions "
        f"({100 * rate:.1f}%, limit {100 * DEMO_AGREEMENT:.0f}%), the golden token at most "
        f"{worst_gap:.2f} nats below the best; {len(cases)} prompts in {time.time() - started:.0f} s",
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--demo")
    parser.add_argument("--golden")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--bench-timeout", type=int, default=240)
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu-check: torch sees no GPU")
    started = time.time()
    with tempfile.TemporaryDirectory(dir=os.environ.get("GPU_CHECK_WORK")) as work:
        steps = [("f32 logits vs transformers", lambda: small_model_check(args, work, device)),
                 ("GGUF demo model", lambda: demo_check(args)),
                 ("bf16 throughput", lambda: throughput_check(args, work, device))]
        for name, step in steps:
            try:
                step()
            except Exception as e:  # one check's failure must not hide the others
                check(name, False, f"{type(e).__name__}: {e}")
    log(f"gpu-check: {len(FAILURES)} failed ({', '.join(FAILURES) or 'none'}) in "
        f"{time.time() - started:.0f} s")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
