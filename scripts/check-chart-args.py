#!/usr/bin/env python3
"""The rendered chart's shardserve command lines parse with the real binary.

Every container of a workload (Deployment, StatefulSet, DaemonSet, Job) in the
given manifests that runs a `shardserve` subcommand has its arguments handed to
the binary with `--help` appended: clap reads the arguments in order, so an
unknown flag or a bad value fails (exit 2) before `--help` would print the help
(exit 0). Kubernetes' `$(VAR)` references are passed as they are (they expand
to strings). A deliberately unknown flag is checked first to fail, so that this
check can fail at all.

The images agree with the flags: the operator and the router run the CPU image
(a CUDA build links libcuda and would not start on a node without the NVIDIA
driver), and the operator hands workers the `-cuda` image exactly when it runs
them with `--worker-device=cuda`.

Usage: check-chart-args.py SHARDSERVE_BIN MANIFEST...
"""
import subprocess
import sys

import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
SUBCOMMANDS = {"operator", "router", "worker", "up"}


def command_lines(paths):
    """(where, args) of every shardserve container in the manifests."""
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or doc.get("kind") not in WORKLOADS:
                    continue
                spec = doc["spec"]["template"]["spec"]
                for c in spec.get("initContainers", []) + spec.get("containers", []):
                    args = c.get("command", [])[1:] + c.get("args", [])
                    if args and args[0] in SUBCOMMANDS:
                        where = f"{path}: {doc['kind']}/{doc['metadata']['name']} {c['name']}"
                        yield where, c.get("image", ""), args


def image_problem(image, args):
    """What is wrong with a control-plane container's images, or None."""
    if image.endswith("-cuda"):
        return f"runs the CUDA image {image}; the control plane must run the CPU image"
    if args[0] != "operator":
        return None
    worker_image = next((a.split("=", 1)[1] for a in args if a.startswith("--worker-image=")), "")
    gpu_workers = "--worker-device=cuda" in args
    if gpu_workers != worker_image.endswith("-cuda"):
        return (f"--worker-image={worker_image} does not match "
                f"--worker-device={'cuda' if gpu_workers else 'cpu'}")
    return None


def parses(binary, args):
    run = subprocess.run([binary, *args, "--help"], capture_output=True, text=True)
    return run.returncode == 0, run.stderr.strip()


def main():
    binary, paths = sys.argv[1], sys.argv[2:]
    ok, _ = parses(binary, ["operator", "--no-such-flag"])
    if ok:
        sys.exit(f"check-chart-args: {binary} accepted an unknown flag; this check cannot work")
    lines = list(command_lines(paths))
    if not lines:
        sys.exit("check-chart-args: no shardserve container found in " + " ".join(paths))
    failed = False
    for where, image, args in lines:
        ok, err = parses(binary, args)
        if not ok:
            failed = True
            print(f"check-chart-args: {where}: `shardserve {' '.join(args)}` does not parse:\n{err}",
                  file=sys.stderr)
        problem = image_problem(image, args)
        if problem:
            failed = True
            print(f"check-chart-args: {where}: {problem}", file=sys.stderr)
    if failed:
        sys.exit(1)
    print(f"check-chart-args: {len(lines)} command lines parse, images match")


if __name__ == "__main__":
    main()
