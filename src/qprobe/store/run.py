"""A run on disk: manifest.json, sample rows in Parquet shards, features as .npy shards.

Layout (format version 1):

    RUN/manifest.json              config, provenance and the list of committed shards
    RUN/rows/shard-00000.parquet   sample rows
    RUN/features/KEY/shard-00000.npy           [rows, d]  (pooling 'last' / 'mean')
    RUN/features/KEY/shard-00000.offsets.npy   [rows + 1] (pooling 'tokens': the .npy is [tokens, d])

A shard exists only once the manifest lists it. Its files are written under temp names,
fsynced and renamed before the manifest is atomically rewritten, so a process killed at any
moment leaves a run that opens cleanly and lacks at most the shard in flight. Files that no
committed shard names are leftovers of such a crash; the next writer removes them.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.core.files import fsync_dir, write_atomic, write_json_atomic
from qprobe.errors import StoreError
from qprobe.features.spec import FeatureSpec

FORMAT_VERSION = 1
ROW_COLUMNS = (
    "prompt_id", "prompt_index", "sample_index", "prompt", "completion",
    "n_tokens", "finish_reason", "reward", "details", "seed",
)


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("prompt_id", pa.string()), ("prompt_index", pa.int64()), ("sample_index", pa.int64()),
        ("prompt", pa.string()), ("completion", pa.string()), ("n_tokens", pa.int64()),
        ("finish_reason", pa.string()), ("reward", pa.float64()), ("details", pa.string()),
        ("seed", pa.int64()),
    ])


def prompt_hash(text: str) -> str:
    """A short stable digest of a prompt's text (as stored in the run's `prompt` column): two runs of
    the same prompts give the same hashes, whatever their paths or prompt ids."""
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Shard:
    """One committed batch of rows, with its feature arrays."""

    id: int
    rows: int

    @property
    def name(self) -> str:
        return f"shard-{self.id:05d}"


class Run:
    """A run directory opened for reading. Nothing but the manifest is read at open."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.shards = [Shard(int(s["id"]), int(s["rows"])) for s in manifest.get("shards", [])]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Run:
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise StoreError(
                f"expected a run directory containing manifest.json, got '{path}'; "
                "pass the --out directory of a `qprobe collect`"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"expected valid JSON in {mpath}, got a parse error ({exc}); the run is corrupt") from None
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"expected run format version {FORMAT_VERSION}, got {version!r} in {mpath}; "
                "upgrade qprobe or re-collect the run"
            )
        return cls(path, manifest)

    def __len__(self) -> int:
        return sum(s.rows for s in self.shards)

    # -- rows ------------------------------------------------------------------------------
    def table(self, columns: list[str] | None = None) -> Any:
        """All sample rows (pyarrow.Table) in storage order, aligned with `features()`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = [pq.read_table(self.path / "rows" / f"{s.name}.parquet", columns=columns) for s in self.shards]
        if not parts:
            schema = _schema()
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(parts)

    def pairs(self) -> set[tuple[str, int]]:
        """The (prompt id, sample index) pairs already stored."""
        t = self.table(["prompt_id", "sample_index"])
        return set(zip(t.column("prompt_id").to_pylist(), t.column("sample_index").to_pylist(), strict=False))

    def sorted_order(self) -> np.ndarray:
        """Row indices that put the rows in (prompt index, sample index) order."""
        t = self.table(["prompt_index", "sample_index"])
        return np.lexsort((t.column("sample_index").to_numpy(), t.column("prompt_index").to_numpy()))

    # -- features --------------------------------------------------------------------------
    @property
    def feature_keys(self) -> list[str]:
        return list(self.manifest.get("features", {}))

    def feature_spec(self, key: str) -> FeatureSpec:
        specs = self.manifest.get("features", {})
        if key not in specs:
            raise StoreError(f"expected a feature key among {list(specs)}, got '{key}' in run {self.path}")
        return FeatureSpec.from_dict(specs[key])

    def feature_shards(self, key: str) -> Iterator[np.ndarray]:
        """Each shard's feature array, memory-mapped (no copy)."""
        spec = self.feature_spec(key)
        for s in self.shards:
            arr = np.load(self.path / "features" / key / f"{s.name}.npy", mmap_mode="r")
            if spec.pooling != "tokens" and arr.shape != (s.rows, spec.dim):
                raise StoreError(
                    f"expected features of shape {(s.rows, spec.dim)} in {key}/{s.name}, got {arr.shape}; the run is corrupt"
                )
            yield arr

    def features(self, key: str, rows: np.ndarray | None = None, dtype: Any = np.float32) -> np.ndarray:
        """Features [N, d] (or of the selected `rows`, in that order), read shard by shard."""
        spec = self.feature_spec(key)
        if spec.pooling == "tokens":
            raise StoreError(f"'{key}' holds per-token states; read them with token_features()")
        if rows is None:
            out = np.empty((len(self), spec.dim), dtype=dtype)
            start = 0
            for arr in self.feature_shards(key):
                out[start : start + len(arr)] = arr
                start += len(arr)
            return out
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise StoreError(f"expected a 1-D array of row numbers, got shape {rows.shape}")
        bad = rows[(rows < 0) | (rows >= len(self))]
        if bad.size:
            raise StoreError(
                f"expected row numbers in [0, {len(self)}) for run {self.path}, got {bad.size} outside "
                f"(e.g. {int(bad[0])}); take row numbers from this run's own table"
            )
        out = np.empty((len(rows), spec.dim), dtype=dtype)
        bounds = np.cumsum([0] + [s.rows for s in self.shards])
        shard_of = np.searchsorted(bounds, rows, side="right") - 1
        for i, arr in enumerate(self.feature_shards(key)):
            sel = np.nonzero(shard_of == i)[0]
            if len(sel):
                out[sel] = arr[rows[sel] - bounds[i]]
        return out

    def token_features(self, key: str) -> Iterator[np.ndarray]:
        """Per-row token states [t, d] (pooling 'tokens'), in storage order."""
        for s, arr in zip(self.shards, self.feature_shards(key), strict=False):
            offsets = np.load(self.path / "features" / key / f"{s.name}.offsets.npy")
            for a, b in zip(offsets[:-1], offsets[1:], strict=False):
                yield arr[a:b]


class RunWriter(Run):
    """A run opened for appending shards. Holds an exclusive lock while open."""

    def __init__(self, path: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> None:
        """Take the run's lock, then read its manifest (`manifest`: only for a run that has none yet).

        The order matters: a manifest read before the lock may be older than the shards another
        writer committed meanwhile, and `_remove_leftovers` would then delete them."""
        path = Path(path)
        self._lock_fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise StoreError(
                f"expected no other writer on run {path}, but another qprobe process holds it; "
                "wait for it to finish or write to another --out"
            ) from None
        try:
            if (path / "manifest.json").is_file():
                manifest = Run.open(path).manifest  # read under the lock
            elif manifest is None:
                raise StoreError(f"expected a run directory containing manifest.json, got '{path}'")
            else:
                manifest = {"format_version": FORMAT_VERSION, **manifest, "shards": [],
                            "created": now(), "updated": now()}
                write_json_atomic(path / "manifest.json", manifest)
                fsync_dir(path.parent)
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise
        super().__init__(path, manifest)
        self._remove_leftovers()

    @classmethod
    def create_or_open(cls, path: str | os.PathLike[str], manifest: dict[str, Any]) -> RunWriter:
        """Open an existing run for appending, or create it with `manifest` (no shards)."""
        path = Path(path)
        if (path / "manifest.json").is_file():
            Run.open(path)  # a clear error for a corrupt run, before the lock file is made
            return cls(path)
        if path.exists() and any(p.name != ".lock" for p in path.iterdir()):
            raise StoreError(
                f"expected --out to be a new or empty directory or an existing run, got '{path}' which holds "
                "other files; choose another --out"
            )
        path.mkdir(parents=True, exist_ok=True)
        (path / "rows").mkdir(exist_ok=True)
        (path / "features").mkdir(exist_ok=True)
        return cls(path, manifest)

    def _remove_leftovers(self) -> None:
        keep = {s.name for s in self.shards}
        for folder in [self.path / "rows", *[p for p in (self.path / "features").glob("*") if p.is_dir()]]:
            for f in folder.glob("*"):
                stem = f.name.split(".")[0]
                if f.name.startswith(".tmp-") or stem not in keep:
                    f.unlink()

    def set_features(self, specs: dict[str, FeatureSpec]) -> None:
        """Record the feature specs (first shard of a new run); later shards must match them."""
        known = self.manifest.get("features", {})
        wanted = {k: s.to_dict() for k, s in specs.items()}
        if known and known != wanted:
            raise StoreError(
                f"expected the run's feature specs {sorted(known)}, got {sorted(wanted)}; "
                "collect other features into a new --out"
            )
        self.manifest["features"] = wanted

    def append(self, rows: dict[str, list[Any]], features: dict[str, Any]) -> Shard:
        """Commit one shard: rows (column -> values) and, per feature key, [rows, d] (or a list
        of [t, d] for pooling 'tokens'). Durable and visible once this returns."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = len(rows["prompt_id"])
        shard = Shard(self.shards[-1].id + 1 if self.shards else 0, n)
        table = pa.table({c: rows[c] for c in ROW_COLUMNS}, schema=_schema())
        final: list[tuple[Path, Any]] = [(self.path / "rows" / f"{shard.name}.parquet",
                                          lambda f: pq.write_table(table, f))]
        for key, value in features.items():
            spec = self.feature_spec(key)
            folder = self.path / "features" / key
            folder.mkdir(exist_ok=True)
            if spec.pooling == "tokens":
                lengths = [len(v) for v in value]
                arr = np.concatenate(value).astype(spec.dtype) if value else np.zeros((0, spec.dim), spec.dtype)
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                final.append((folder / f"{shard.name}.offsets.npy", lambda f, o=offsets: np.save(f, o)))
            else:
                arr = np.asarray(value, dtype=spec.dtype)
                if arr.shape != (n, spec.dim):
                    raise StoreError(f"expected features {key} of shape {(n, spec.dim)}, got {arr.shape}")
            final.append((folder / f"{shard.name}.npy", lambda f, a=arr: np.save(f, a)))
        for path, write in final:
            write_atomic(path, write)
        self.shards.append(shard)
        self.manifest["shards"] = [*self.manifest.get("shards", []), {"id": shard.id, "rows": n}]
        self.manifest["updated"] = now()
        write_json_atomic(self.path / "manifest.json", self.manifest)
        return shard

    def replace_rewards(self, shard: Shard, updates: dict[int, tuple[float | None, str]]) -> None:
        """Rewrite the reward and details of some rows of a committed shard (row within the shard ->
        (reward, details JSON)), e.g. rows that came back unscored and were scored again. The
        shard's rows file is replaced atomically, as every write: readers see old or new rows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.path / "rows" / f"{shard.name}.parquet"
        table = pq.read_table(path)
        rewards, details = table.column("reward").to_pylist(), table.column("details").to_pylist()
        for i, (reward, detail) in updates.items():
            rewards[i], details[i] = reward, detail
        table = table.set_column(table.schema.get_field_index("reward"), "reward", pa.array(rewards, pa.float64()))
        table = table.set_column(table.schema.get_field_index("details"), "details", pa.array(details, pa.string()))
        write_atomic(path, lambda f: pq.write_table(table, f))
        self.update_manifest()

    def update_manifest(self, **fields: Any) -> None:
        self.manifest.update(fields)
        self.manifest["updated"] = now()
        write_json_atomic(self.path / "manifest.json", self.manifest)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
