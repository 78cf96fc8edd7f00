"""Add feature arrays to an existing run (another layer, pooling or an external embedder).

The samples are not regenerated: each stored prompt+completion is embedded again, shard by
shard. Each shard's array is written atomically, so an interrupted `qprobe embed` resumes where it
stopped; the manifest lists the new features only once every shard has them. Completions are
re-tokenised from their text (token ids are not stored), which can differ from the generated
tokens at a stop-sequence cut.

`backend=` picks another back-end than the run's for the generator's own hidden states, e.g.
`llamacpp` for a run collected through `--backend openai --backend-option serve=...`: the weights'
sha256 stored by the served run must match (a run through a remote API stores none: pass the
weights with `model=` to vouch for them). A stored chat prompt (`{"messages": [...]}`, as the
openai back-end sends it) is then re-rendered by that back-end (`render`: the GGUF's chat template
with the generation prompt, as llama-cpp-python's server applies it), so prompt+completion are the
tokens the model saw when it generated the sample.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from qprobe.catalog import BACKENDS
from qprobe.core.files import write_atomic
from qprobe.core.types import Completion, Prompt
from qprobe.errors import StoreError
from qprobe.features import make_embedder
from qprobe.features.spec import FeatureRequest
from qprobe.generation.openai_api import parse_chat
from qprobe.store.run import Run, RunWriter


def backend_for(run: Run, model: str | None = None, backend: str | None = None, **options: Any) -> Any:
    """The run's back-end (or `backend` on the run's weights), rebuilt from its manifest; the
    weights' sha256 must be the run's."""
    m = run.manifest
    ident = m.get("model", {})
    run_name = m.get("backend", {}).get("name")
    name = backend or run_name
    same = name == run_name
    # The run's options belong to its own back-end; another one gets only the options passed.
    opts = {**m.get("backend", {}).get("options", {}), **options} if same else dict(options)
    want = ident.get("sha256")
    api = bool(want) and str(want).startswith("api:")  # a remote API: no weights hash to check
    if model:
        opts["model"] = model
    elif same and ident.get("alias") and opts.get("serve"):
        opts["model"] = ident["alias"]  # a served run: the server's alias, the weights from `serve`
    elif ident.get("path"):
        opts["model"] = ident["path"]
    elif same and api:
        opts["model"] = ident.get("model")
    elif api:
        raise StoreError(
            f"expected --model PATH of the weights behind the API to embed with '{name}', got none "
            f"(the run was collected through {ident.get('base_url', 'an API')}, which names no weights)"
        )
    made = BACKENDS.create(name, **opts)
    got = made.identity().get("sha256")
    if want and got and want != got and not (api and model and not same):
        made.close()
        raise StoreError(
            f"expected the weights the run was collected with (sha256 {want[:16]}), got {got[:16]}; "
            "pass --model with the same file"
        )
    return made


def prompt_for(text: str, backend: Any, run_backend: str | None) -> str:
    """The prompt `backend` embeds for the stored `text`: a chat prompt stored as JSON by another
    back-end (openai) is rendered by `backend` itself (its chat template); anything else as stored."""
    messages = parse_chat(text)
    if messages is None or backend is None or backend.name == run_backend:
        return text
    plain = "\n".join(str(m.get("content", "")) for m in messages)
    rendered = str(backend.render(Prompt(id="", text=plain, messages=tuple(messages))))
    if rendered == plain:
        raise StoreError(
            f"expected the '{backend.name}' back-end to render the run's chat prompts with its chat "
            "template, got the plain text; drop chat=false from --backend-option"
        )
    return rendered


def add_features(path: str, features: list[str], model: str | None = None, dtype: str = "float32",
                 progress: bool = True, backend_options: dict[str, Any] | None = None,
                 backend_name: str | None = None) -> Run:
    requests = [FeatureRequest.parse(f) for f in features]
    Run.open(path)  # a clear error when it is not a run
    with RunWriter.create_or_open(Path(path), {}) as writer:
        existing = set(writer.feature_keys)
        todo = [r for r in requests if r.key not in existing]
        if not todo:
            return Run.open(path)
        backend = None
        if any(not r.embedder for r in todo):
            backend = backend_for(writer, model, backend_name, **(backend_options or {}))
        try:
            embedders: dict[str, Any] = {}
            for r in todo:
                if r.embedder not in embedders:
                    embedders[r.embedder] = make_embedder(backend, r.embedder)
            run_backend = writer.manifest.get("backend", {}).get("name")
            specs = _embed_shards(writer, todo, embedders, dtype, progress,
                                  lambda text: prompt_for(text, backend, run_backend))
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
                  progress: bool, own_prompt: Callable[[str], str]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from qprobe.collection.progress import CollectProgress

    specs: dict[str, Any] = {}
    with CollectProgress(total=len(writer), done=0, enabled=progress) as bar:
        for shard in writer.shards:
            # The .npy is written last: its presence marks a shard done (a tokens feature's
            # offsets are written just before it).
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
                own = own_prompt(text) if "" in embedders else text  # what the back-end's model embeds
                for name, emb in embedders.items():
                    reqs = [r for r in requests if r.embedder == name]
                    out = emb.embed(own if name == "" else text, comps, reqs)
                    for r in reqs:
                        for j, i in enumerate(idx):
                            rows[r.key][i] = np.asarray(out[r.key][j], dtype=np.float32)
                bar.advance(len(idx), 0, 0.0)
            for r in requests:
                files[r.key].parent.mkdir(exist_ok=True)
                if r.pooling == "tokens":  # ragged: [sum t_i, d] and offsets [rows + 1]
                    lengths = [len(a) for a in rows[r.key]]
                    arr = np.concatenate(rows[r.key]).astype(dtype)
                    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                    write_atomic(files[r.key].with_suffix(".offsets.npy"), _npy_writer(offsets))
                else:
                    arr = np.stack(rows[r.key]).astype(dtype)  # [rows, d]
                if r.key not in specs:
                    specs[r.key] = embedders[r.embedder].spec(r, int(arr.shape[1]), dtype)
                write_atomic(files[r.key], _npy_writer(arr))
    return specs


def _npy_writer(arr: np.ndarray) -> Callable[[BinaryIO], None]:
    def write(f: BinaryIO) -> None:
        np.save(f, arr)

    return write
