"""Preference pairs (prompt, chosen, rejected) from files or Hugging Face datasets (paper section 7).

`load_pairs(source, format="auto")` reads, in the common layouts:

- ``hh``: Anthropic HH-RLHF rows ``{chosen, rejected}``, each a whole "\\n\\nHuman: ...\\n\\nAssistant:
  ..." transcript. The prompt is the two transcripts' shared prefix up to its last
  "\\n\\nAssistant:"; the responses are what follows (a leading space removed).
- ``columns``: ``prompt``/``chosen``/``rejected`` columns (also ``question``/``input``, and
  ``response_chosen``/``chosen_response``...). Each may be a string or a chat message list; chosen
  and rejected message lists without a prompt column share every message but the last.
- ``qrm``: the Q-RM pairwise files, ``{instruction, chosen, rejected[, label]}``.

Sources: a .jsonl / .jsonl.gz / .json file, a Hugging Face ``save_to_disk`` folder (read with
pyarrow, no ``datasets`` needed; pick a split with ``split=``), a single .arrow or .parquet file,
or a hub dataset name (``hf:NAME``; needs the ``datasets`` extra and a network). Extra scalar
columns (label, orig_index, ...) go to ``Pair.meta``. A malformed row raises `DataError` naming it.

`PairsTask` ("pairs") serves the pairs' prompts to `qprobe collect`, unscored: samples of the
model for the same prompts are what the judge (`qprobe.evaluation.judge`) compares with the
dataset's chosen responses.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qprobe.core.types import Prompt, RewardResult
from qprobe.errors import ConfigError, DataError, require
from qprobe.rewards.base import Reward
from qprobe.tasks.base import Task

FORMATS = ("auto", "hh", "columns", "qrm")
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
PROMPT_KEYS = ("prompt", "instruction", "question", "input", "context")
CHOSEN_KEYS = ("chosen", "response_chosen", "chosen_response")
REJECTED_KEYS = ("rejected", "response_rejected", "rejected_response")
ROLES = {"prompt": PROMPT_KEYS, "chosen": CHOSEN_KEYS, "rejected": REJECTED_KEYS}
META_CHARS = 200  # longer string columns (e.g. the original responses of a rewrite) stay out of meta


@dataclass(frozen=True)
class Pair:
    """One preference: `prompt` (text + chat messages) and two responses, chosen preferred.

    `sep` goes between the completion-style `prompt.text` and a response (HH: " " after
    "Assistant:"); a chat-rendered prompt takes the responses as they are."""

    id: str
    prompt: Prompt
    chosen: str
    rejected: str
    sep: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


# ----------------------------------------------------------------------------------- sources
def read_rows(source: str | os.PathLike[str], split: str | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL/JSON/Arrow/Parquet file, a `save_to_disk` folder, or `hf:NAME[:split]`."""
    text = str(source)
    if text.startswith("hf:"):
        return _read_hub(text[3:], split)
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_saved(path, split)
    if not path.is_file():
        raise DataError(f"expected a pairs file or folder, got '{path}' which does not exist; "
                        "pass a .jsonl/.json/.arrow/.parquet file, a save_to_disk folder or hf:NAME")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        from qprobe.tasks._data import read_jsonl

        return read_jsonl(path)
    if name.endswith(".json"):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"expected a JSON list of pair objects in '{path}', got bad JSON: {exc}") from None
        if not isinstance(obj, list):
            raise DataError(f"expected a JSON list of pair objects in '{path}', got {type(obj).__name__}")
        return obj
    if name.endswith(".arrow"):
        return _read_arrow(path)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()  # type: ignore[no-any-return]
    raise DataError(f"expected a .jsonl, .jsonl.gz, .json, .arrow or .parquet file, got '{path.name}'")


def _read_arrow(path: Path) -> list[dict[str, Any]]:
    """An Arrow file as `datasets` writes it (IPC stream), or an IPC file."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        with pa.memory_map(str(path)) as src:
            return ipc.open_stream(src).read_all().to_pylist()  # type: ignore[no-any-return]
    except pa.ArrowInvalid:
        try:
            with pa.memory_map(str(path)) as src:
                return ipc.open_file(src).read_all().to_pylist()  # type: ignore[no-any-return]
        except pa.ArrowInvalid as exc:
            raise DataError(f"expected an Arrow stream or file in '{path}', got: {exc}") from None


def _read_saved(path: Path, split: str | None) -> list[dict[str, Any]]:
    """A `Dataset.save_to_disk` folder (state.json + .arrow) or a `DatasetDict` one (dataset_dict.json)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split is None:
            if len(splits) != 1:
                raise ConfigError(f"expected split=NAME for '{path}', which holds splits {splits}; pass --split")
            split = splits[0]
        if split not in splits:
            raise ConfigError(f"expected a split among {splits} in '{path}', got '{split}'")
        path = path / split
    state = path / "state.json"
    if not state.is_file():
        raise DataError(f"expected a save_to_disk folder (state.json or dataset_dict.json) at '{path}', got neither")
    files = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    missing = [f for f in files if not (path / f).is_file()]
    if not files or missing:
        raise DataError(f"expected the data files {files} listed in {state}, missing {missing or files}")
    return [row for f in files for row in _read_arrow(path / f)]


def _read_hub(name: str, split: str | None) -> list[dict[str, Any]]:
    datasets = require("datasets", "datasets")
    name, _, tail = name.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or tail or None)
    except Exception as exc:  # noqa: BLE001  network, name or cache errors all mean the same here
        raise DataError(f"expected a loadable Hugging Face dataset, got '{name}' ({exc}); pass a local file") from exc
    if isinstance(ds, dict) or hasattr(ds, "keys"):
        raise ConfigError(f"expected split=NAME for hf:{name}, which holds splits {list(ds.keys())}")
    return [dict(row) for row in ds]


# ----------------------------------------------------------------------------------- layouts
def detect_format(row: dict[str, Any]) -> str:
    """The layout of a row: 'qrm', 'columns' or 'hh' (DataError if none fits)."""
    if not isinstance(row, dict):
        raise DataError(f"expected each pair row to be an object, got {type(row).__name__}")
    keys = set(row)
    has_pair = bool(keys & set(CHOSEN_KEYS)) and bool(keys & set(REJECTED_KEYS))
    if has_pair and "instruction" in keys and "prompt" not in keys:
        return "qrm"
    if has_pair and keys & set(PROMPT_KEYS):
        return "columns"
    if has_pair and isinstance(row.get("chosen"), list):
        return "columns"
    if "chosen" in keys and "rejected" in keys and HH_ASSISTANT in str(row["chosen"]):
        return "hh"
    raise DataError(f"expected pair rows with chosen/rejected (and prompt or instruction) fields or HH "
                    f"transcripts, got keys {sorted(keys)}; pass format= and check the file")


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two HH transcripts: the prompt is the shared
    prefix up to its last "\\n\\nAssistant:" (kept in the prompt)."""
    prefix = os.path.commonprefix([chosen, rejected])
    cut = prefix.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError("expected two transcripts sharing a prefix that ends in an '\\n\\nAssistant:' turn, got none")
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def hh_messages(transcript: str) -> tuple[dict[str, str], ...]:
    """Chat messages of an HH prompt transcript (the final empty Assistant turn dropped)."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise DataError(f"expected an HH transcript starting with '\\n\\nHuman:', got {transcript[:40]!r}")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return tuple(messages)


def _messages(value: Any, what: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"expected {what} as a string or a non-empty list of chat messages, got {type(value).__name__}")
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"expected chat messages {{'role': str, 'content': str}} in {what}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def transcript(messages: tuple[dict[str, str], ...]) -> str:
    """A completion-style text of chat messages (HH's layout), ending in the assistant's turn."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in messages) + HH_ASSISTANT


def _first(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((row[k] for k in keys if k in row), None)


def _response(value: Any, what: str) -> tuple[str, tuple[dict[str, str], ...] | None]:
    """A response's text, and the messages before it when it came as a message list."""
    if isinstance(value, str):
        return value, None
    msgs = _messages(value, what)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"expected {what} to end with an assistant message, got role '{msgs[-1]['role']}'")
    return msgs[-1]["content"], msgs[:-1]


def parse_row(row: dict[str, Any], fmt: str, index: int) -> Pair:
    """One `Pair` of a row in layout `fmt` ('hh', 'columns', 'qrm')."""
    meta = {k: v for k, v in row.items() if k not in ("id", *PROMPT_KEYS, *CHOSEN_KEYS, *REJECTED_KEYS)
            and (isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= META_CHARS))}
    pid = str(row.get("id", index))
    if fmt == "hh":
        c, r = row.get("chosen"), row.get("rejected")
        if not (isinstance(c, str) and isinstance(r, str)):
            raise DataError("expected 'chosen' and 'rejected' transcripts as strings")
        text, chosen, rejected = split_hh(c, r)
        sep = " " if chosen.startswith(" ") and rejected.startswith(" ") else ""
        prompt = Prompt(id=pid, text=text, messages=hh_messages(text), meta=meta)
        return Pair(pid, prompt, chosen[len(sep):], rejected[len(sep):], sep, meta)
    keys = PROMPT_KEYS  # 'qrm' is the 'columns' layout with the prompt in 'instruction'
    chosen, before_c = _response(_first(row, CHOSEN_KEYS), "'chosen'")
    rejected, before_r = _response(_first(row, REJECTED_KEYS), "'rejected'")
    raw = _first(row, keys)
    if raw is None:
        if before_c is None or not before_c:
            raise DataError(f"expected a prompt column among {list(keys)} (or chosen/rejected message lists "
                            f"holding the conversation), got keys {sorted(row)}")
        if before_c != before_r:
            raise DataError("expected chosen and rejected conversations that differ only in the last message")
        messages = before_c
    elif isinstance(raw, str):
        messages = ({"role": "user", "content": raw},)
    else:
        messages = _messages(raw, "the prompt")
    text = raw if isinstance(raw, str) else transcript(messages)
    return Pair(pid, Prompt(id=pid, text=text, messages=messages, meta=meta), chosen, rejected, "", meta)


def pick_fields(row: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """The row with the columns named in `fields` ({"chosen": "orig_chosen", ...}) as those roles."""
    unknown = sorted(set(fields) - set(ROLES))
    if unknown:
        raise ConfigError(f"expected fields for roles among {sorted(ROLES)}, got {unknown}")
    missing = [col for col in fields.values() if col not in row]
    if missing:
        raise DataError(f"expected the columns {missing} (from fields=), got keys {sorted(row)}")
    drop = {k for role in fields for k in ROLES[role]} | set(fields.values())
    return {**{k: v for k, v in row.items() if k not in drop}, **{ROLES[r][0]: row[c] for r, c in fields.items()}}


def load_pairs(source: str | os.PathLike[str], format: str = "auto", split: str | None = None,
               limit: int | None = None, max_chars: int | None = None, drop_identical: bool = True,
               fields: dict[str, str] | None = None, ids: set[str] | None = None) -> list[Pair]:
    """Preference pairs of `source` (see the module docstring). `fields` maps roles to other
    columns ({"chosen": "orig_chosen", "rejected": "orig_rejected"}). `max_chars` keeps only pairs
    whose prompt + both responses are at most that long (a cost cap: it selects short pairs);
    identical chosen and rejected responses are dropped unless `drop_identical=False`; `ids` keeps
    only those pair ids (e.g. the same pairs of a rewritten copy). `limit` counts kept pairs."""
    if format not in FORMATS:
        raise ConfigError(f"expected a pairs format in {list(FORMATS)}, got '{format}'")
    if limit is not None and limit < 1:
        raise ConfigError(f"expected limit >= 1 pairs, got {limit}")
    rows = read_rows(source, split)
    if not rows:
        raise DataError(f"expected some pair rows in '{source}', got none")
    if fields:
        rows = [pick_fields(r, fields) if isinstance(r, dict) else r for r in rows]
    fmt = detect_format(rows[0]) if format == "auto" else format
    out: list[Pair] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"expected an object in row {i} of '{source}', got {type(row).__name__}")
        try:
            pair = parse_row(row, fmt, i)
        except DataError as exc:
            raise DataError(f"row {i} of '{source}' ({fmt} layout): {exc}") from None
        if pair.id in seen:
            raise DataError(f"expected unique pair ids in '{source}', got '{pair.id}' twice (row {i})")
        seen.add(pair.id)
        if (drop_identical and pair.chosen == pair.rejected) or (ids is not None and pair.id not in ids):
            continue
        if max_chars is not None and len(pair.prompt.text) + len(pair.chosen) + len(pair.rejected) > max_chars:
            continue
        out.append(pair)
        if limit is not None and len(out) >= limit:
            break
    return out


# ------------------------------------------------------------------------------------- task
class _NoReward(Reward):
    """Pairs' prompts have no verifiable reward: samples are stored unscored (reward null)."""

    def score(self, prompt: Prompt, completions: list[str]) -> list[RewardResult]:
        return [RewardResult(None, {"status": "unscored"}) for _ in completions]

    def manifest(self) -> dict[str, Any]:
        return {"reward": "none", "note": "preference prompts: judge the samples with `qprobe pairs judge`"}


class PairsTask(Task):
    """The prompts of a pairs file as a task (single split "all"); samples are unscored. Options as
    `load_pairs`, plus `offset` (skip the first pairs, as `qprobe pairs embed --offset`)."""

    name = "pairs"
    splits = ("all",)

    def __init__(self, data: str | None = None, format: str = "auto", split: str | None = None,
                 limit: int | str | None = None, max_chars: int | str | None = None, offset: int | str = 0) -> None:
        if not data:
            raise ConfigError("expected a pairs file, got none; pass --task-option data=PATH")
        self.data, self.format, self.split, self.offset = str(data), format, split, int(offset)
        self.pairs = load_pairs(self.data, format, split, None if limit is None else self.offset + int(limit),
                                None if max_chars is None else int(max_chars))[self.offset:]

    def prompts(self, split: str) -> list[Prompt]:
        self.check_split(split)
        return [p.prompt for p in self.pairs]

    def reward(self) -> Reward:
        return _NoReward()

    def manifest(self) -> dict[str, Any]:
        return {"task": self.name, "data": self.data, "format": self.format, "data_split": self.split, "offset": self.offset}
