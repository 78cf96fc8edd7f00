"""Load test of `qprobe serve` on loopback: concurrent openai clients against a server subprocess.

    python benchmarks/bench_serve.py [--clients 32] [--fake-requests 480] [--fake-delay 0.001]
        [--real-requests 32] [--real-k 4] [--real-max-tokens 64] [--n-threads 2] [--skip-real]

Part 1 serves a literal-weights probe on the fake back-end (`--backend-option delay=D`: D seconds per
sample) and sends `--fake-requests` requests from `--clients` concurrent clients: a mix of chat and
completions, n = 1 or 2, k = 4 or 8, one in four streamed. Part 2 serves the shipped probe
`default-code` on the default model (llama.cpp, `n_threads`) and sends `--real-requests` chat
requests (k = `--real-k`, `--real-max-tokens`) from the same number of clients. Each part starts
`qprobe serve` as a child process (the clients' own CPU time stays out of the server's), waits for
/health, runs, reads the server's counters, stops it.

Reported per part: requests, errors (by HTTP status or exception), latency p50 / p95 / max (seconds,
request sent to last byte), wall time, requests/s and sampled tokens/s (usage.completion_tokens, every
token of every sample, over the wall time). Prints a table, writes benchmarks/results/serve.json.
Bounded: every request has a timeout, every part a deadline (`--deadline` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a Python function that adds two numbers.",
    "Write a Python function that reverses a string.",
    "Write a Python function that returns the largest element of a list.",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that returns the factorial of n.",
    "Write a Python function that removes duplicates from a list, keeping the order.",
    "Write a Python function that returns the n-th Fibonacci number.",
]


def fake_probe(folder: Path) -> Path:
    """A linear probe with literal weights on the fake back-end's features (no training)."""
    from qprobe.features.spec import FeatureSpec
    from qprobe.probes.models import LinearProbe

    probe = LinearProbe()
    probe._set_learned({"layers.0.weight": np.linspace(-1, 1, 16)[None, :], "layers.0.bias": np.zeros(1)}, None, None, {})
    probe.feature_spec_ = FeatureSpec(backend="fake", model="fake", sha256="fake-16", layer=-1, pooling="mean", dim=16)
    probe.source_ = {}
    probe.save_pretrained(folder)
    return folder


def start_server(args: list[str], port: int, log: Path, timeout: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-c", "from qprobe.cli.main import main; main()", "serve", *args,
                             "--port", str(port), "--queue", "256"], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not answer /health within {timeout:g} s; see {log}")
        time.sleep(0.2)


def health(port: int) -> dict[str, Any]:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())


def request_plan(count: int, real: bool, k: int, max_tokens: int) -> list[dict[str, Any]]:
    """The requests, fixed by their index (seed i): what each client sends, in order."""
    plan = []
    for i in range(count):
        prompt = PROMPTS[i % len(PROMPTS)]
        if real:
            plan.append({"chat": True, "n": 1, "k": k, "stream": i % 4 == 3, "prompt": prompt, "max_tokens": max_tokens})
        else:
            plan.append({"chat": i % 2 == 0, "n": 1 + (i % 3 == 0), "k": 4 if i % 5 else 8, "stream": i % 4 == 3,
                         "prompt": f"{prompt} ({i})", "max_tokens": max_tokens})
    for i, p in enumerate(plan):
        p["seed"] = i
    return plan


async def one(client: Any, model: str, p: dict[str, Any]) -> tuple[float, int, str | None]:
    """(latency, sampled tokens, error or None) of one request."""
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"model": model, "n": p["n"], "seed": p["seed"], "max_tokens": p["max_tokens"],
                          "extra_body": {"qprobe": {"k": p["k"]}}}
    try:
        if p["stream"]:
            kw["stream"], kw["stream_options"] = True, {"include_usage": True}
        if p["chat"]:
            r = await client.chat.completions.create(messages=[{"role": "user", "content": p["prompt"]}], **kw)
        else:
            r = await client.completions.create(prompt=p["prompt"], **kw)
        tokens = 0
        if p["stream"]:
            texts = 0
            async for chunk in r:
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                texts += len(chunk.choices)
            if not texts:
                return time.perf_counter() - t0, 0, "empty stream"
        else:
            tokens = r.usage.completion_tokens
            if len(r.choices) != p["n"]:
                return time.perf_counter() - t0, tokens, f"{len(r.choices)} choices"
        return time.perf_counter() - t0, tokens, None
    except Exception as exc:  # counted, not raised: the table says what failed
        status = getattr(exc, "status_code", None)
        return time.perf_counter() - t0, 0, f"HTTP {status}" if status else type(exc).__name__


async def load(port: int, model: str, plan: list[dict[str, Any]], clients: int, timeout: float) -> dict[str, Any]:
    import openai

    todo = list(reversed(plan))
    results: list[tuple[float, int, str | None]] = []

    async def client_loop() -> None:
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0,
                                      timeout=timeout) as client:
            while todo:
                results.append(await one(client, model, todo.pop()))

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    errors: dict[str, int] = {}
    for _, _, e in results:
        if e:
            errors[e] = errors.get(e, 0) + 1
    tokens = sum(r[1] for r in results)
    return {"requests": len(results), "errors": sum(errors.values()), "error_kinds": errors,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)), "max_s": float(lat.max()),
            "wall_s": wall, "requests_per_s": len(results) / wall, "sampled_tokens": tokens,
            "sampled_tokens_per_s": tokens / wall, "clients": clients}


def run_part(name: str, server_args: list[str], plan: list[dict[str, Any]], clients: int, model: str,
             start_timeout: float, request_timeout: float, deadline: float, logdir: Path) -> dict[str, Any]:
    from qprobe.generation.server import free_port

    port = free_port()
    proc = start_server(server_args, port, logdir / f"{name}.log", start_timeout)
    try:
        row = asyncio.run(asyncio.wait_for(load(port, model, plan, clients, request_timeout), deadline))
        row["server"] = health(port)["stats"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    row["part"], row["server_args"] = name, server_args
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--fake-requests", type=int, default=480)
    ap.add_argument("--fake-delay", type=float, default=0.001, help="seconds per sample of the fake back-end")
    ap.add_argument("--real-requests", type=int, default=32)
    ap.add_argument("--real-k", type=int, default=4)
    ap.add_argument("--real-max-tokens", type=int, default=64)
    ap.add_argument("--n-threads", type=int, default=2)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--deadline", type=float, default=1200.0, help="seconds per part before it is abandoned")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        probe = fake_probe(logdir / "probe")
        rows.append(run_part("fake", ["--probe", str(probe), "--backend", "fake", "--backend-option",
                                      f"delay={args.fake_delay}", "--served-name", "fake"],
                             request_plan(args.fake_requests, False, 0, 300), args.clients, "fake", 60, 120,
                             args.deadline, logdir))
        if not args.skip_real:
            rows.append(run_part("default model", ["--probe", "default-code", "--backend-option",
                                                   f"n_threads={args.n_threads}", "--served-name", "default-code"],
                                 request_plan(args.real_requests, True, args.real_k, args.real_max_tokens),
                                 args.clients, "default-code", 300, args.deadline, args.deadline, logdir))
    head = f"{'part':<14} {'requests':>8} {'errors':>6} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'wall s':>7} {'req/s':>7} {'tok/s':>8}"
    print(head)
    for r in rows:
        print(f"{r['part']:<14} {r['requests']:>8} {r['errors']:>6} {r['p50_s']:>7.3f} {r['p95_s']:>7.3f} {r['max_s']:>7.3f} "
              f"{r['wall_s']:>7.1f} {r['requests_per_s']:>7.1f} {r['sampled_tokens_per_s']:>8.1f}")
        if r["error_kinds"]:
            print(f"  errors: {r['error_kinds']}")
    out = {"command": " ".join(["python", "benchmarks/bench_serve.py", *sys.argv[1:]]), "machine": platform.platform(),
           "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "parts": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
