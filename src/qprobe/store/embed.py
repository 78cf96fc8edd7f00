"""Add feature arrays to an existing run (another layer, pooling or an external embedder).

The samples are not regenerated: each stored prompt+completion is embedded again, shard by
shard. Each shard's array is written atomically, so an interrupted `qprobe embed` resumes where it
stopped; the manifest lists the new features only once every shard has them. Completions are
re-tokenised from their text (token ids are not stored), which can differ from the generated
tokens at a stop-sequence cut.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qprobe.errors import StoreError
from qprobe.features import make_embedder
from qprobe.features.spec import FeatureRequest
from qprobe.generation.base import Completion
from qprobe.registry import BACKENDS
from qprobe.store.files import write_atomic
from qprobe.store.run import Run, RunWriter


def backend_for(run: Run, model: str | None = None, **options: Any) -> Any:
    """The run's back-end, rebuilt from its manifest (the weights' hash is checked by the spec)."""
    m = run.manifest
    name = m.get("backend", {}).get("name")
    opts = {**m.get("backend", {}).get("options", {}), **options}
    path = model or m.get("model", {}).get("path")
    if path:
        opts["model"] = path
    backend = BACKENDS.create(name, **opts)
    want, got = m.get("model", {}).get("sha256"), backend.identity().get("sha256")
    if want and got and want != got:
        backend.close()
        raise StoreError(
            f"expected the weights the run was collected with (sha256 {want[:16]}), got {got[:16]}; "
            "pass --model with the same file"
        )
    return backend


def add_features(path: str, features: list[str], model: str | None = None, dtype: str = "float32",
                 progress: bool = True, backend_options: dict[str, Any] | None = None) -> Run:
    requests = [FeatureRequest.parse(f) for f in features]
    Run.open(path)  # a clear error when it is not a run
    with RunWriter.create_or_open(path, {}) as writer:
        existing = set(writer.feature_keys)
        todo = [r for r in requests if r.key not in existing]
        if not todo:
            return Run.open(path)
        backend = None
        if any(not r.embedder for r in todo):
            backend = backend_for(writer, model, **(backend_options or {}))
        try:
            embedders: dict[str, Any] = {}
            for r in todo:
                if r.embedder not in embedders:
                    embedders[r.embedder] = make_embedder(backend, r.embedder)
            specs = _embed_shards(writer, todo, embedders, dtype, progress)
        finally:
            for e in locals().get("embedders", {}).values():
                e.close()
            if backend is not None:
                backend.close()
        writer.manifest["features"] = {**writer.manifest.get("features", {}),
                                       **{k: s.to_dict() for k, s in specs.items()}}
        writer.update_manifest()
    return Run.open(path)


def _embed_shards(writer: RunWriter, requests: list[FeatureRequest], embedders: dict[str, Any], dtype: str,
                  progress: bool) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from qprobe.store.progress import CollectProgress

    specs: dict[str, Any] = {}
    with CollectProgress(total=len(writer), done=0, enabled=progress) as bar:
        for shard in writer.shards:
            files = {r.key: writer.path / "features" / r.key / f"{shard.name}.npy" for r in requests}
            if all(f.exists() for f in files.values()) and len(specs) == len(requests):
                bar.advance(shard.rows, 0, 0.0)
                continue
            t = pq.read_table(writer.path / "rows" / f"{shard.name}.parquet").to_pylist()
            rows: dict[str, list[np.ndarray]] = {r.key: [None] * len(t) for r in requests}  # type: ignore[list-item]
            by_prompt: dict[str, list[int]] = {}
            for i, row in enumerate(t):
                by_prompt.setdefault(row["prompt"], []).append(i)
            for text, idx in by_prompt.items():
                comps = [Completion(t[i]["completion"], int(t[i]["n_tokens"]), t[i]["finish_reason"], int(t[i]["seed"]))
                         for i in idx]
                for name, emb in embedders.items():
                    reqs = [r for r in requests if r.embedder == name]
                    out = emb.embed(text, comps, reqs)
                    for r in reqs:
                        for j, i in enumerate(idx):
                            rows[r.key][i] = np.asarray(out[r.key][j], dtype=np.float32)
                bar.advance(len(idx), 0, 0.0)
            for r in requests:
                if r.pooling == "tokens":
                    raise StoreError("expected pooling last or mean for `qprobe embed`, got tokens; collect token states with `qprobe collect`")
                arr = np.stack(rows[r.key]).astype(dtype)  # [rows, d]
                if r.key not in specs:
                    specs[r.key] = embedders[r.embedder].spec(r, int(arr.shape[1]), dtype)
                files[r.key].parent.mkdir(exist_ok=True)
                write_atomic(files[r.key], lambda f, a=arr: np.save(f, a))
    return specs
