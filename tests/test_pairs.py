"""Preference pairs: loaders on small literal files, the pairs run layout, accuracy and Figure-6 maths,
and the CLI (fake back-end and embedder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qprobe.cli.main import cli
from qprobe.collection.collect import CollectConfig, collect
from qprobe.collection.pairs import PairsConfig, embed_pairs
from qprobe.core.types import Completion
from qprobe.errors import ConfigError, DataError, StoreError
from qprobe.evaluation.preferences import (
    accuracy,
    accuracy_difference,
    learning_curve,
    pairwise_outcomes,
    plot_learning_curve,
    split_indices,
)
from qprobe.features.fake import FakeEmbedder
from qprobe.features.spec import FeatureRequest
from qprobe.generation.fake import FakeBackend
from qprobe.probes import LinearProbe, TrainConfig
from qprobe.store import Run
from qprobe.store.pairs import pairs_from_run, read_pairs
from qprobe.tasks.pairs import PairsTask, hh_messages, load_pairs, split_hh

DATA = Path(__file__).parent / "data" / "pairs"


def cli_run(args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(cli, args, catch_exceptions=True)
    return r.exit_code, r.stdout + (str(r.exception) if r.exception and r.exit_code != 0 else "")


# ------------------------------------------------------------------------------------ loaders
def test_hh_transcripts_split_at_the_shared_last_assistant_turn() -> None:
    pairs = load_pairs(DATA / "hh.jsonl")
    assert [p.id for p in pairs] == ["0", "1", "2"]  # row 3 has identical responses: dropped
    p = pairs[1]
    assert p.prompt.text == ("\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
                             "\n\nAssistant:")
    assert p.prompt.messages == ({"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello! How can I help?"},
                                 {"role": "user", "content": "Tell me a joke."})
    assert (p.chosen, p.rejected, p.sep) == ("Why did the chicken cross the road? To get to the other side.", "No.", " ")
    assert len(load_pairs(DATA / "hh.jsonl", drop_identical=False)) == 4


def test_hh_split_when_transcripts_differ_before_the_last_turn() -> None:
    c = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    r = "\n\nHuman: a\n\nAssistant: x"
    assert split_hh(c, r) == ("\n\nHuman: a\n\nAssistant:", " b\n\nHuman: c\n\nAssistant: d", " x")
    with pytest.raises(DataError, match="Assistant"):
        split_hh("\n\nHuman: a", "\n\nHuman: b")
    assert hh_messages("\n\nHuman: q\n\nAssistant:") == ({"role": "user", "content": "q"},)


def test_columns_with_strings_and_message_lists() -> None:
    a, b, c = load_pairs(DATA / "columns.jsonl")
    assert (a.id, a.prompt.text, a.prompt.messages, a.chosen, a.rejected, a.meta) == (
        "a", "What is 2+2?", ({"role": "user", "content": "What is 2+2?"},), "4", "5", {"source": "toy"})
    assert b.prompt.messages[0] == {"role": "system", "content": "Be brief."}
    assert b.prompt.text.endswith("\n\nHuman: Capital of France?\n\nAssistant:")
    assert (c.prompt.messages, c.chosen, c.rejected) == (({"role": "user", "content": "Say hi"},), "Hi!", "Go away.")


def test_qrm_layout_is_detected_and_keeps_the_label() -> None:
    pairs = load_pairs(DATA / "qrm.jsonl")
    assert pairs[0].prompt.text.startswith("Tom has 3 apples")
    assert pairs[0].chosen == " 3 + 2 = 5. The answer is 5." and pairs[0].meta == {"label": "5"}
    assert load_pairs(DATA / "qrm.jsonl", format="qrm")[1].rejected == " 10 + 4 = 14. The answer is 14."


def _save_to_disk(folder: Path, splits: dict[str, list[dict]]) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    folder.mkdir()
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, rows in splits.items():
        (folder / name).mkdir()
        table = pa.Table.from_pylist(rows)
        with ipc.new_stream(str(folder / name / "data-00000-of-00001.arrow"), table.schema) as w:
            w.write_table(table)
        (folder / name / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))


def test_save_to_disk_folders_read_with_pyarrow(tmp_path: Path) -> None:
    rows = [{"orig_index": 7, "prompt": "p", "chosen": "c2", "rejected": "r2", "orig_chosen": "c", "orig_rejected": "r"}]
    _save_to_disk(tmp_path / "ds", {"train": rows, "test": rows})
    with pytest.raises(ConfigError, match="split"):
        load_pairs(tmp_path / "ds")
    (p,) = load_pairs(tmp_path / "ds", split="test")
    assert (p.prompt.text, p.chosen, p.rejected, p.meta) == ("p", "c2", "r2", {"orig_index": 7, "orig_chosen": "c",
                                                                                "orig_rejected": "r"})
    (q,) = load_pairs(tmp_path / "ds" / "train", fields={"chosen": "orig_chosen", "rejected": "orig_rejected"})
    assert (q.chosen, q.rejected) == ("c", "r")
    (a,) = load_pairs(tmp_path / "ds" / "train" / "data-00000-of-00001.arrow")
    assert a.chosen == "c2"


def test_parquet_json_limit_and_max_chars(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "x" * n, "chosen": "a", "rejected": "b"} for n in (1, 50, 2, 3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.json").write_text(json.dumps(rows))
    for name in ("p.parquet", "p.json"):
        assert [p.id for p in load_pairs(tmp_path / name, max_chars=10)] == ["0", "2", "3"]
        assert [p.id for p in load_pairs(tmp_path / name, max_chars=10, limit=2)] == ["0", "2"]


@pytest.mark.parametrize("row, match", [
    ({"prompt": "p", "chosen": "a"}, "'rejected' as a string"),
    ({"chosen": "no transcript", "rejected": "x"}, "chosen/rejected"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "r"}, "assistant message"),
    ({"prompt": "p", "chosen": [{"role": "user"}], "rejected": "r"}, "chat messages"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "list of chat messages"),
])
def test_malformed_rows_name_the_row(tmp_path: Path, row: dict, match: str) -> None:
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    first = row if "prompt" not in row else good  # a first row without a layout fails detection
    if first is row:
        f.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=match) as err:
        load_pairs(f, format="auto")
    if first is not row:
        assert "row 1" in str(err.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "x.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{bad\n')
    with pytest.raises(DataError, match="line 2"):
        load_pairs(tmp_path / "x.jsonl")
    (tmp_path / "d.jsonl").write_text('{"id": 1, "prompt": "p", "chosen": "a", "rejected": "b"}\n' * 2)
    with pytest.raises(DataError, match="unique"):
        load_pairs(tmp_path / "d.jsonl")
    with pytest.raises(ConfigError, match="format"):
        load_pairs(DATA / "hh.jsonl", format="csv")
    with pytest.raises(DataError, match="columns"):
        load_pairs(DATA / "qrm.jsonl", fields={"chosen": "nope"})


def test_real_layouts_on_shared_data(shared_data: Path) -> None:
    hh = load_pairs(shared_data / "hh_rlhf" / "harmless-base_test.jsonl.gz", limit=5)
    assert all(p.prompt.text.endswith("\n\nAssistant:") and p.prompt.messages[-1]["role"] == "user" for p in hh)
    g = load_pairs(shared_data / "qrm" / "gsm8k" / "test_pairwise.jsonl", limit=3)
    assert g[0].prompt.text.startswith("Janet")
    uf = sorted((shared_data / "exrm_vs_imrm" / "data_files").glob("ultrafeedback_*"))[0]
    assert len(load_pairs(uf, split="test")) == 200


# -------------------------------------------------------------------------------- pairs runs
def test_embed_pairs_layout_features_and_resume(tmp_path: Path) -> None:
    pairs = load_pairs(DATA / "columns.jsonl")
    cfg = PairsConfig(out=tmp_path / "run", backend="fake", shard_pairs=2, source={"data": "columns.jsonl"})
    run = embed_pairs(pairs[:2], cfg, progress=False)
    assert len(run) == 4 and len(run.shards) == 1
    run = embed_pairs(pairs, cfg, progress=False)  # resumes: only pair c is new
    assert len(run) == 6 and len(run.shards) == 2
    t = run.table().to_pylist()
    assert [(r["prompt_id"], r["sample_index"], r["reward"], r["completion"]) for r in t] == [
        ("a", 0, 1.0, "4"), ("a", 1, 0.0, "5"), ("b", 0, 1.0, "Paris."), ("b", 1, 0.0, "Lyon."),
        ("c", 0, 1.0, "Hi!"), ("c", 1, 0.0, "Go away.")]
    assert json.loads(t[1]["details"]) == {"status": "rejected", "source": "toy"}
    assert run.manifest["kind"] == "pairs" and run.manifest["task"]["data"] == "columns.jsonl"
    want = FakeEmbedder(FakeBackend()).embed(t[2]["prompt"], [Completion("Paris.", 1, "stop", 0)],
                                             [FeatureRequest()])["L-1_last"][0]
    np.testing.assert_allclose(run.features("L-1_last")[2], want)
    rows = read_pairs(run)
    assert rows.ids == ["a", "b", "c"] and rows.chosen.tolist() == [0, 2, 4] and rows.rejected.tolist() == [1, 3, 5]
    with pytest.raises(StoreError, match="features"):
        embed_pairs(pairs, PairsConfig(out=tmp_path / "run", backend="fake", features=("-2:last",)), progress=False)


def test_hh_sep_is_used_for_completion_style_prompts(tmp_path: Path) -> None:
    run = embed_pairs(load_pairs(DATA / "hh.jsonl"), PairsConfig(out=tmp_path / "r"), progress=False)
    t = run.table(["prompt", "completion"]).to_pylist()
    assert t[0]["prompt"].endswith("\n\nAssistant:") and t[0]["completion"].startswith(" Mix flour")


def test_read_pairs_refuses_a_sampled_run(tmp_path: Path) -> None:
    run = collect(CollectConfig(task="fake", backend="fake", split="train", out=tmp_path / "s", n=3, task_options={"size": 4}),
                  progress=False)
    with pytest.raises(StoreError, match="pairs run"):
        read_pairs(run)


def test_pairs_from_run_are_within_prompt_better_worse(tmp_path: Path) -> None:
    run = collect(CollectConfig(task="fake", backend="fake", split="train", out=tmp_path / "s", n=6, task_options={"size": 8}),
                  progress=False)
    t = run.table(["prompt_id", "reward"]).to_pylist()
    rows = pairs_from_run(run)
    for c, r in zip(rows.chosen, rows.rejected, strict=True):
        assert t[c]["prompt_id"] == t[r]["prompt_id"] and t[c]["reward"] > t[r]["reward"]
    expected = 0
    for pid in {x["prompt_id"] for x in t}:
        rs = [x["reward"] for x in t if x["prompt_id"] == pid]
        expected += sum(a > b for a in rs for b in rs)
    assert len(rows) == expected > 0
    capped = pairs_from_run(run, max_per_prompt=1)
    assert len({t[c]["prompt_id"] for c in capped.chosen}) == len(capped)


def test_pairs_task_serves_prompts_unscored(tmp_path: Path) -> None:
    task = PairsTask(data=str(DATA / "hh.jsonl"))
    assert [p.id for p in task.prompts("all")] == ["0", "1", "2"]
    assert [p.id for p in PairsTask(data=str(DATA / "hh.jsonl"), offset="1", limit="1").prompts("all")] == ["1"]
    assert [p.id for p in load_pairs(DATA / "columns.jsonl", ids={"c", "a"})] == ["a", "c"]
    run = collect(CollectConfig(task="pairs", backend="fake", split="all", out=tmp_path / "s", n=2,
                                task_options={"data": str(DATA / "hh.jsonl")}), progress=False)
    assert run.table(["reward"]).column("reward").null_count == 6


# ------------------------------------------------------------------------------ accuracy maths
def test_pairwise_outcomes_and_accuracy_count_ties_half() -> None:
    out = pairwise_outcomes(np.array([2.0, 1.0, 0.5, 3.0]), np.array([1.0, 1.0, 0.7, 0.0]))
    assert out.tolist() == [1.0, 0.5, 0.0, 1.0]
    acc = accuracy(out)
    assert acc.mean == 0.625 and acc.ties == 1 and acc.n_pairs == 4 and acc.low <= 0.625 <= acc.high
    assert accuracy(np.ones(5)).to_dict() == {"accuracy": 1.0, "low": 1.0, "high": 1.0, "pairs": 5, "ties": 0}
    assert accuracy_difference(np.ones(3), np.zeros(3)) == (1.0, 1.0, 1.0)
    with pytest.raises(ConfigError):
        pairwise_outcomes(np.zeros(2), np.zeros(3))
    train, test = split_indices(10, 0.3, np.random.default_rng(0))
    assert len(test) == 3 and sorted([*train, *test]) == list(range(10))


def _synthetic_pairs(n: int, d: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Chosen = rejected + a step along a fixed direction plus noise: linearly learnable."""
    w = np.zeros(d)
    w[0] = 1.0
    rejected = rng.standard_normal((n, d))
    chosen = rng.standard_normal((n, d)) + 1.5 * w
    return chosen.astype(np.float32), rejected.astype(np.float32)


def test_learning_curve_linear_learns_and_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, test = _synthetic_pairs(80, 6, rng), _synthetic_pairs(60, 6, rng)
    cfg = TrainConfig(k=2, max_iter=15)
    res = learning_curve(train, test, [0.25, 1.0], {"linear": lambda s: LinearProbe(loss="bt", train=cfg, seed=s)},
                         seeds=2, rng=np.random.default_rng(1))
    assert res["n_train"] == [20, 80] and len(res["per_seed"]["linear"][1]) == 2
    assert res["curves"]["linear"][1] > 0.75 and res["test"]["linear"]["pairs"] == 60
    pytest.importorskip("matplotlib")
    assert plot_learning_curve(res, tmp_path / "fig.png", "t") and (tmp_path / "fig.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------- the CLI
def test_cli_embed_train_eval_curve(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out = cli_run(["pairs", "embed", "--pairs", str(DATA / "hh.jsonl"), "--backend", "fake", "--offset", "1",
                         "--out", str(run), "--no-progress"])
    assert code == 0 and "2 pairs" in out, out
    code, out = cli_run(["train", "--pairs", str(run), "--out", str(tmp_path / "p"), "--holdout", "0"])
    assert code == 0 and "loss bt" in out and "expected return@2" in out, out
    code, out = cli_run(["pairs", "eval", "--run", str(run), "--probe", str(tmp_path / "p"), "--json",
                         str(tmp_path / "e.json"), "--allow-overlap"])  # the training pairs themselves: wiring only
    assert code == 0 and json.loads((tmp_path / "e.json").read_text())["probes"][str(tmp_path / "p")]["pairs"] == 2
    code, out = cli_run(["pairs", "curve", "--train", str(run), "--test", str(run), "--fractions", "1.0",
                         "--seeds", "1", "--width", "4", "--out", str(tmp_path / "c.png")])
    assert code == 0 and "MLP 3-layer" in out, out
    assert set(json.loads((tmp_path / "c.json").read_text())["curves"]) == {"linear", "MLP 2-layer", "MLP 3-layer"}


def test_cli_train_needs_run_or_pairs(tmp_path: Path) -> None:
    code, out = cli_run(["train", "--out", str(tmp_path / "p")])
    assert code != 0 and "exactly one of --run" in out
    sampled = collect(CollectConfig(task="fake", backend="fake", split="train", out=tmp_path / "s", n=2, task_options={"size": 3}),
                      progress=False)
    code, out = cli_run(["train", "--pairs", str(sampled.path), "--out", str(tmp_path / "p")])
    assert code != 0 and "pairs run" in out
    assert isinstance(Run.open(sampled.path), Run)


@pytest.mark.slow
def test_llamacpp_pairs_use_the_chat_template_and_last_token(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    run = embed_pairs(load_pairs(DATA / "hh.jsonl"), PairsConfig(out=tmp_path / "r", backend="llamacpp",
                      backend_options={"n_threads": 1, "n_ctx": 1024}), progress=False)
    t = run.table(["prompt", "completion"]).to_pylist()
    assert t[0]["prompt"].endswith("<|im_start|>assistant\n") and t[0]["completion"].startswith("Mix flour")
    x = run.features("L-1_last")
    assert x.shape == (6, 896) and not np.allclose(x[0], x[1])


def test_pairs_eval_refuses_a_probe_trained_on_the_same_pairs(tmp_path: Path) -> None:
    run = embed_pairs(load_pairs(DATA / "hh.jsonl"), PairsConfig(out=tmp_path / "r"), progress=False)
    probe = tmp_path / "bt"
    code, out = cli_run(["train", "--pairs", str(run.path), "--out", str(probe), "--cv-folds", "1"])
    assert code == 0, out
    code, out = cli_run(["pairs", "eval", "--run", str(run.path), "--probe", str(probe)])
    assert code != 0 and "evaluated prompts" in out and "was trained on" in out and "--allow-overlap" in out
    res = CliRunner().invoke(cli, ["pairs", "eval", "--run", str(run.path), "--probe", str(probe), "--allow-overlap"])
    assert res.exit_code == 0 and "not held-out" in res.stderr
