"""The transformers back-end: k samples of one prompt, decoded together, one seed per sample.

`TransformersBackend(model="", gguf_file=None, dtype="bfloat16", device=None, chat=True)`;
`model` is a local folder, a hub id, a `.gguf` file or ""/"default" (the packaged GGUF,
dequantised once and cached, see `qprobe.generation.hf_load`).

Sampling: the prompt is evaluated once, its key/value cache repeated for the k samples, and
the k sequences decode as one batch. They all share the prompt, so there is no padding at all;
a sequence that finishes (EOS or a stop string) leaves the batch (its cache rows are dropped),
so the batch never carries padding either. Each sample draws its tokens from its own
`torch.Generator` seeded with its sample seed, so a sample depends on its seed and the model's
logits only, not on the other samples' draws. Reproducible bit for bit for the same k, device
and dtype; with a different k the batched matmuls can round differently, which in rare cases
flips a draw.

Stop strings are checked on the decoded tail of each sequence as it grows; the text is cut at
the first stop string and `token_ids` keeps the generated tokens that decode to exactly that
text (None when a stop string began inside a token: the embedder then re-tokenises the text).

Features: `qprobe.features.hf.TransformersEmbedder(backend)` reuses this model and runs one
batched second pass (the prompt's cache shared). benchmarks/bench_hf_features.py measures it
against capturing states during generation; see benchmarks/results/hf.md.
"""

from __future__ import annotations

from typing import Any

from qprobe.core.types import Completion, Prompt
from qprobe.errors import ConfigError
from qprobe.generation.base import Backend, SamplingConfig
from qprobe.generation.hf_load import LoadedLM, encode_prompt, kv_cache, load_causal_lm

TOP_K = 512  # candidates sorted for nucleus sampling before any full sort
END_TOKENS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "</s>",
    "<end_of_turn>",
)


class TransformersBackend(Backend):
    """Any transformers causal LM (see the module docstring)."""

    name = "transformers"

    def __init__(
        self,
        model: str = "",
        gguf_file: str | None = None,
        dtype: str = "bfloat16",
        device: str | None = None,
        chat: bool = True,
        batch_size: int = 32,
        lm: LoadedLM | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"expected batch_size >= 1, got {batch_size}")
        self.lm = lm or load_causal_lm(model, gguf_file=gguf_file, dtype=dtype, device=device)
        self.tokenizer = self.lm.tokenizer
        self.chat = bool(chat)
        self.batch_size = int(batch_size)
        gen_cfg = getattr(self.lm.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        eos_ids = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(e) for e in [*eos_ids, self.tokenizer.eos_token_id] if e is not None}
        vocab = self.tokenizer.get_vocab()  # end-of-text markers a completion prompt can also end on
        self.eos_ids |= {
            vocab[t] for t in END_TOKENS if t in vocab and vocab[t] in self.tokenizer.all_special_ids
        }

    def identity(self) -> dict[str, Any]:
        return self.lm.identity()

    def render(self, prompt: Prompt) -> str:
        """The chat template with a generation prompt when the prompt has messages, else its text."""
        if self.chat and prompt.messages and getattr(self.tokenizer, "chat_template", None):
            return str(
                self.tokenizer.apply_chat_template(
                    [dict(m) for m in prompt.messages], tokenize=False, add_generation_prompt=True
                )
            )
        return prompt.text

    def generate(self, text: str, sampling: SamplingConfig, seeds: list[int]) -> list[Completion]:
        prompt = encode_prompt(self.tokenizer, text)
        out: list[Completion] = []
        for start in range(0, len(seeds), self.batch_size):
            out.extend(self._sample(prompt, sampling, seeds[start : start + self.batch_size]))
        return out

    def _sample(self, prompt: list[int], sampling: SamplingConfig, seeds: list[int]) -> list[Completion]:
        import torch
        from transformers import DynamicCache

        model, dev, k = self.lm.model, self.lm.device, len(seeds)
        gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
        tokens: list[list[int]] = [[] for _ in range(k)]
        finish = ["length"] * k
        window = max((len(s) for s in sampling.stop), default=0) + 8  # tokens decoded to find a stop
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            ids = torch.tensor([prompt], device=dev)  # [1, P]
            logits = model(input_ids=ids, **kv_cache(model, cache), use_cache=True, logits_to_keep=1).logits
            logits = logits[:, -1].float().expand(k, -1)  # [k, V]
            cache.batch_repeat_interleave(k)
            alive = list(range(k))  # sample index of each batch row
            pos = len(prompt)
            for _step in range(sampling.max_new_tokens):
                nxt = self._draw(logits, sampling, [gens[i] for i in alive])  # [b]
                keep_rows = []
                for row, i in enumerate(alive):
                    t = int(nxt[row])
                    if t in self.eos_ids:
                        finish[i] = "stop"
                        continue
                    tokens[i].append(t)
                    if sampling.stop:
                        tail = self.tokenizer.decode(tokens[i][-window:], skip_special_tokens=True)
                        if any(s in tail for s in sampling.stop):
                            finish[i] = "stop"
                            continue
                    keep_rows.append(row)
                if not keep_rows or _step == sampling.max_new_tokens - 1:
                    break
                if len(keep_rows) < len(alive):
                    cache.batch_select_indices(torch.tensor(keep_rows, device=dev))
                    nxt = nxt[keep_rows]
                    alive = [alive[r] for r in keep_rows]
                step_ids = nxt.view(-1, 1).to(dev)  # [b, 1]
                positions = torch.full_like(step_ids, pos)
                logits = (
                    model(input_ids=step_ids, position_ids=positions, **kv_cache(model, cache), use_cache=True)
                    .logits[:, -1]
                    .float()
                )  # [b, V]
                pos += 1
        return [self._finish(tokens[i], finish[i], seeds[i], sampling.stop) for i in range(k)]

    def sampler(self, sampling: SamplingConfig) -> dict[str, Any]:
        """The sampling configuration applied (stored in the run's manifest): nothing but these."""
        if sampling.temperature == 0:
            return {"server": None, "chain": "greedy", "stop": list(sampling.stop), "max_tokens": sampling.max_new_tokens}
        return {"server": None, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0,
                "repetition_penalty": 1.0, "chain": "temperature, top_p, multinomial(seed) (torch)",
                "stop": list(sampling.stop), "max_tokens": sampling.max_new_tokens}

    @staticmethod
    def _draw(logits: Any, sampling: SamplingConfig, gens: list[Any]) -> Any:
        """One token per row: greedy at temperature 0, else nucleus sampling with the row's generator."""
        import torch

        if sampling.temperature == 0:
            return logits.argmax(-1)  # [b]
        probs = torch.softmax(logits / sampling.temperature, dim=-1)  # [b, V]
        if sampling.top_p >= 1:
            draws = [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(gens)]
            return torch.cat(draws)  # [b]
        # The nucleus almost always lies within the top TOP_K tokens: sort those only, and fall
        # back to a full sort for a row whose top TOP_K hold less than top_p of the mass (exact).
        top_p, order = probs.topk(min(TOP_K, probs.shape[-1]), dim=-1)  # [b, K], descending
        draws = []
        for r, g in enumerate(gens):
            p_r, o_r = top_p[r], order[r]
            if float(p_r.sum()) < sampling.top_p:
                p_r, o_r = probs[r].sort(descending=True)
            cum = p_r.cumsum(-1)
            keep = p_r.masked_fill((cum - p_r) > sampling.top_p, 0)  # the smallest set with mass >= top_p
            draws.append(o_r[torch.multinomial(keep, 1, generator=g)])
        return torch.cat(draws)  # [b]

    def _finish(self, ids: list[int], finish: str, seed: int, stop: tuple[str, ...]) -> Completion:
        dec = self.tokenizer.decode
        text = dec(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        hits = [i for s in stop if s and (i := text.find(s)) >= 0]
        if not hits:
            return Completion(
                text=text, n_tokens=len(ids), finish_reason=finish, seed=seed, token_ids=tuple(ids)
            )
        text = text[: min(hits)]
        kept: tuple[int, ...] | None = None
        for n in range(len(ids) + 1):  # the shortest prefix that decodes to exactly the kept text
            got = dec(ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            if got == text:
                kept = tuple(ids[:n])
                break
            if len(got) > len(text):
                break
        n_tokens = (
            len(kept)
            if kept is not None
            else len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        )
        return Completion(text=text, n_tokens=n_tokens, finish_reason="stop", seed=seed, token_ids=kept)

    def close(self) -> None:
        self.lm = None  # type: ignore[assignment]
