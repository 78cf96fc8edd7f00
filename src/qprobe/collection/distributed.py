"""Collect over Ray (`qprobe collect ... --ray [ADDRESS]`): prompts spread over actors, one run.

Each actor owns one back-end (llama.cpp on a CPU node, vLLM on a GPU node: the config's back-end)
and runs `collect()` of one chunk of prompts at a time into its own run, OUT/.workers/chunk-NNNNN,
which starts as a copy of the main run's manifest and of its rows for those prompts
(`copy_run(prompts=...)`), so a chunk resumes like any run. The driver is the main run's only
writer: it merges each finished chunk as one shard (atomic), skipping the (prompt, sample) keys the
run already holds, then removes the chunk's run. Hence the store's promises hold across workers:

- a killed actor's chunk goes to another actor (a fresh one replaces it), which resumes the chunk's
  committed shards: none is lost, none is made twice;
- a re-merge never duplicates, and a rerun of the same command first merges the chunks an
  interrupted driver left, then collects what is still missing;
- rows equal a single-process run's: a sample's seed depends only on (run seed, prompt id, index)
  (`generation.base.sample_seed`), and each prompt keeps its index in the split. Storage order
  differs (chunk by chunk); `Run.sorted_order` gives the same order for both.

The main run is first opened by one actor with no prompts: that is a single-process `collect()`, so
it writes the manifest a single-process run writes (or refuses a resume whose settings differ, with
collect's own error), and a later run without --ray resumes it. OUT must be on a filesystem that the
driver and every node see (one machine, or a shared filesystem); a worker that cannot see it says so.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.collection.collect import CollectConfig, collect, fingerprint
from qprobe.errors import ConfigError, QProbeError, StoreError, require
from qprobe.store.run import ROW_COLUMNS, Run, RunWriter

WORKERS_DIR = ".workers"
# Environment the CLI's opt-ins set; actors are other processes, maybe on other machines.
FORWARDED_ENV = ("QPROBE_ALLOW_CODE_EXECUTION", "QPROBE_ALLOW_UNCONFINED", "QPROBE_VERBOSE")


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """How a collection is spread over Ray. Not part of the run: the same collection, any cluster."""

    address: str | None = None  # None: ray.init() (a local Ray, or RAY_ADDRESS); else the cluster's address
    workers: int | None = None  # actors; None: as many as the cluster's CPUs (GPUs for vllm) hold
    chunk_prompts: int | None = None  # prompts per chunk; None: about 4 chunks per actor
    max_attempts: int = 3  # tries of one chunk whose actor dies, before the run stops

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"expected --ray-workers >= 1, got {self.workers}")
        if self.chunk_prompts is not None and self.chunk_prompts < 1:
            raise ConfigError(f"expected >= 1 prompts per chunk, got {self.chunk_prompts}")
        if self.max_attempts < 1:
            raise ConfigError(f"expected max_attempts >= 1, got {self.max_attempts}")


@dataclass
class RayStats:
    """What the driver did (for the CLI line and the tests)."""

    workers: int = 0
    chunks: int = 0
    lost_actors: int = 0  # actors that died; their chunks were handed to fresh ones
    reused: int = 0  # samples a dead actor committed in its chunk's run, resumed (not made again) by the next
    merged: int = 0  # samples added to the main run
    leftovers: int = 0  # chunk runs of an interrupted driver, merged first
    init_seconds: float = 0.0  # ray.init
    start_seconds: float = 0.0  # actors up, back-ends loaded (measured at the probe and first chunks)


@dataclass
class RayCollection:
    run: Run
    stats: RayStats


class CollectWorker:
    """A Ray actor: one back-end, kept across chunks; `run` collects one chunk into its own run."""

    def __init__(self, cfg: dict[str, Any], env: dict[str, str]) -> None:
        from qprobe.catalog import BACKENDS

        os.environ.update(env)
        c = CollectConfig.from_dict(cfg)
        opts = dict(c.backend_options)
        if c.model is not None:
            opts["model"] = c.model
        self.backend = BACKENDS.create(c.backend, **opts)

    def run(self, cfg: dict[str, Any], main: str) -> dict[str, Any]:
        c = CollectConfig.from_dict(cfg)
        if Path(c.out) != Path(main) and not (Path(main) / "manifest.json").is_file():
            raise StoreError(
                f"expected the run {main} on a filesystem this Ray worker ({socket.gethostname()}) sees, got no "
                "manifest.json there; put --out on a filesystem shared by every node, or run on one machine"
            )
        run = collect(c, progress=False, backend=self.backend)
        return {"rows": len(run), "pid": os.getpid()}


def collect_ray(cfg: CollectConfig, ray_cfg: RayConfig | None = None, progress: bool = True,
                on_dispatch: Callable[[Any, int, Path], None] | None = None) -> RayCollection:
    """Run (or resume) the collection `cfg` on Ray actors; the finished run equals `collect(cfg)`'s.

    Uses the caller's Ray session when one is initialized, else starts or joins one (and shuts it
    down at the end). `on_dispatch(actor, chunk, chunk_dir)` is called as each chunk is handed out."""
    ray = require("ray", "ray")
    rc = ray_cfg or RayConfig()
    stats = RayStats()
    started = not ray.is_initialized()
    if started:
        _check_reachable(rc.address)
        t0 = time.perf_counter()
        ray.init(address=rc.address, log_to_driver=False)
        stats.init_seconds = time.perf_counter() - t0
    try:
        return RayCollection(_drive(ray, cfg, rc, stats, progress, on_dispatch), stats)
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str | None) -> None:
    """A clear error now for a HOST:PORT nobody listens on (ray.init would retry for minutes)."""
    if address is None or address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"expected --ray HOST:PORT (the head's address), ray://HOST:PORT or auto, got '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(
            f"expected a Ray cluster listening at {address}, got {exc.__class__.__name__}: {exc}; start one with "
            "`ray start --head` (it prints the address), or give --ray with no address for a local Ray"
        ) from None


def _selected(cfg: CollectConfig) -> list[str]:
    """The prompt ids collect(cfg) collects, in its order (the same --limit and --prompt-id rules)."""
    from qprobe.catalog import TASKS

    task = TASKS.create(cfg.task, **cfg.task_options)
    task.check_split(cfg.split)
    ids = [p.id for p in task.prompts(cfg.split)]  # few-shot prompts keep their inner ids
    if cfg.limit is not None:
        ids = ids[: cfg.limit]
    if cfg.prompt_ids is not None:
        wanted = set(cfg.prompt_ids)
        ids = [i for i in ids if i in wanted]
    return ids


def _resources(cfg: CollectConfig) -> dict[str, float]:
    """One actor's share: its back-end's threads (llama.cpp's n_threads), one GPU for vLLM."""
    cpus = float(cfg.backend_options.get("n_threads", 1) or 1)
    return {"num_cpus": cpus, "num_gpus": 1.0 if cfg.backend == "vllm" else 0.0}


def _n_workers(ray: Any, rc: RayConfig, res: dict[str, float]) -> int:
    if rc.workers is not None:
        return rc.workers
    total = ray.cluster_resources()
    kind, need = ("GPU", res["num_gpus"]) if res["num_gpus"] else ("CPU", res["num_cpus"])
    n = int(total.get(kind, 0) // need)
    if n < 1:
        raise ConfigError(f"expected a Ray cluster with at least {need:g} {kind} for one worker, got "
                          f"{total.get(kind, 0):g}; add nodes, or lower --backend-option n_threads")
    return n


def _drive(ray: Any, cfg: CollectConfig, rc: RayConfig, stats: RayStats, progress: bool,
           on_dispatch: Callable[[Any, int, Path], None] | None) -> Run:
    from qprobe.collection.progress import CollectProgress
    from qprobe.store.summary import verdict_counts

    out = Path(cfg.out)
    ids = _selected(cfg)
    res = _resources(cfg)
    if cfg.backend == "llamacpp" and "n_threads" not in cfg.backend_options:
        import sys

        print("qprobe: warning: each llama.cpp actor uses every CPU of its node; pass --backend-option "
              "n_threads=T (each actor then reserves T CPUs)", file=sys.stderr)
    n_workers = _n_workers(ray, rc, res)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    worker_cls = ray.remote(CollectWorker).options(**res, max_restarts=0)

    def spawn() -> Any:
        return worker_cls.remote(cfg.to_dict(), env)

    t0 = time.perf_counter()
    actors = [spawn() for _ in range(n_workers)]
    stats.workers = n_workers
    try:
        # The main run, opened by a single-process collect of no prompts: its manifest, or its checks.
        _get(ray, actors[0].run.remote(dataclasses.replace(cfg, prompt_ids=()).to_dict(), str(out)))
        stats.start_seconds = time.perf_counter() - t0
        if not (out / "manifest.json").is_file():
            raise StoreError(f"expected the run a Ray worker made at {out} to be visible here, got no manifest.json; "
                             "put --out on a filesystem shared by every node")
        with RunWriter(out) as writer:
            writer.update_manifest(complete=False, n_prompts=len(ids), config=cfg.to_dict())
            done = writer.pairs()
            workdir = out / WORKERS_DIR
            for leftover in sorted(workdir.iterdir()) if workdir.is_dir() else []:
                if leftover.name.startswith("chunk-") and (leftover / "manifest.json").is_file():
                    stats.merged += _merge(writer, leftover, done)
                    stats.leftovers += 1
                _discard(leftover)  # merged, or a copy that a crash left half-made
            todo = [i for i in ids if any((i, j) not in done for j in range(cfg.n))]
            size = rc.chunk_prompts or max(1, math.ceil(len(todo) / (4 * n_workers)))
            chunks = [todo[k : k + size] for k in range(0, len(todo), size)]
            stats.chunks = len(chunks)
            total = len(ids) * cfg.n
            bar = CollectProgress(total=total, done=sum(1 for i in ids for j in range(cfg.n) if (i, j) in done),
                                  enabled=progress)
            with bar:
                _schedule(ray, writer, cfg, chunks, actors, spawn, rc, stats, done, bar, on_dispatch)
            if workdir.is_dir() and not any(workdir.iterdir()):
                workdir.rmdir()
            writer.update_manifest(complete=len(writer) >= len(ids) * cfg.n, n_prompts=len(ids),
                                   verdicts=verdict_counts(writer), config=cfg.to_dict())
        return Run.open(out)
    finally:
        for a in actors:
            ray.kill(a)


def _schedule(ray: Any, writer: RunWriter, cfg: CollectConfig, chunks: list[list[str]], actors: list[Any],
              spawn: Callable[[], Any], rc: RayConfig, stats: RayStats, done: set[tuple[str, int]],
              bar: Any, on_dispatch: Callable[[Any, int, Path], None] | None) -> None:
    """Hand chunks to idle actors; merge each finished one; give a dead actor's chunk to a fresh one."""
    from qprobe.store.copy import copy_run

    queue = deque(range(len(chunks)))
    idle = deque(actors)
    running: dict[Any, tuple[Any, int]] = {}  # ObjectRef -> (actor, chunk)
    attempts = [0] * len(chunks)
    workdir = writer.path / WORKERS_DIR
    while queue or running:
        while queue and idle:
            k, actor = queue.popleft(), idle.popleft()
            chunk_dir = workdir / f"chunk-{k:05d}"
            if not (chunk_dir / "manifest.json").is_file():
                workdir.mkdir(exist_ok=True)
                held = [i for i in chunks[k] if any((i, j) in done for j in range(cfg.n))]
                copy_run(writer.path, chunk_dir, writer.feature_keys, prompts=held)
            attempts[k] += 1
            sub = dataclasses.replace(cfg, out=chunk_dir, prompt_ids=tuple(chunks[k]))
            running[actor.run.remote(sub.to_dict(), str(writer.path))] = (actor, k)
            if on_dispatch is not None:
                on_dispatch(actor, k, chunk_dir)
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            actor, k = running.pop(ref)
            chunk_dir = workdir / f"chunk-{k:05d}"
            try:
                _get(ray, ref)
            except ray.exceptions.RayActorError as exc:
                # The actor died (or was lost with its node), perhaps after committing part of the chunk,
                # perhaps after finishing it: the chunk's run keeps what it committed; a fresh actor resumes it.
                stats.lost_actors += 1
                ray.kill(actor)
                actors.remove(actor)
                if attempts[k] >= rc.max_attempts:
                    raise StoreError(
                        f"expected chunk {k} ({len(chunks[k])} prompts, e.g. {chunks[k][0]}) to finish, but its "
                        f"worker died {attempts[k]} times (last: {exc.__class__.__name__}); its committed samples "
                        f"stay in {chunk_dir} and the same command resumes them"
                    ) from None
                if (chunk_dir / "manifest.json").is_file():
                    stats.reused += len(Run.open(chunk_dir).pairs() - done)
                queue.appendleft(k)
                fresh = spawn()
                actors.append(fresh)
                idle.append(fresh)
                continue
            merged = _merge(writer, chunk_dir, done)
            stats.merged += merged
            bar.advance(merged, 0, 0.0)
            _discard(chunk_dir)
            idle.append(actor)


def _get(ray: Any, ref: Any) -> Any:
    """ray.get, with a worker's QProbeError raised as itself (the CLI prints it as one line)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, QProbeError):
            raise cause from None
        raise


def _merge(writer: RunWriter, chunk_dir: Path, done: set[tuple[str, int]]) -> int:
    """Append a chunk run's samples that `writer`'s run lacks as one shard (atomic); return how many."""
    with RunWriter(chunk_dir) as src:  # the lock: no worker still writes it
        if fingerprint(src.manifest) != fingerprint(writer.manifest):
            raise StoreError(f"expected the chunk run {chunk_dir} to have the settings of {writer.path}, got other "
                             f"{[k for k, v in fingerprint(src.manifest).items() if v != writer.manifest.get(k)]}; "
                             "remove it and run the command again")
        table = src.table()
        keys = list(zip(table.column("prompt_id").to_pylist(), table.column("sample_index").to_pylist(), strict=True))
        rows = np.array([i for i, key in enumerate(keys) if key not in done], dtype=np.int64)
        if not len(rows):
            return 0
        specs = {k: src.feature_spec(k) for k in src.feature_keys}
        writer.set_features(specs)  # the first chunk of a new run names them; later ones must match
        feats: dict[str, Any] = {}
        for key, spec in specs.items():
            if spec.pooling == "tokens":
                states = list(src.token_features(key))
                feats[key] = [np.asarray(states[i]) for i in rows]
            else:
                feats[key] = src.features(key, rows, dtype=np.dtype(spec.dtype))
        taken = table.take(rows)
        writer.append({c: taken.column(c).to_pylist() for c in ROW_COLUMNS}, feats)
        done.update(keys[i] for i in rows)
        return len(rows)


def _discard(chunk_dir: Path) -> None:
    if chunk_dir.is_dir():
        shutil.rmtree(chunk_dir)
    else:
        chunk_dir.unlink()
