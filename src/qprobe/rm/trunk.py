"""The trunk of a reward model: a causal LM with LoRA adapters (peft) on its top blocks only.

The blocks below the first adapted one are frozen and see no adapter, so the hidden state that
enters block `start` depends on the token ids alone: it is computed once per sequence
(`bottom_states`, a forward hook that stops there) and every training step runs only the top
blocks, the final norm and, for heads that need them, the LM head (`top_states`, `logprobs`).
That is exact, not an approximation: the top blocks see the same input as in a full forward
(tests/test_rm.py checks loss and gradients against one).

`top_states` runs the decoder's own `forward` on `inputs_embeds` = the cached states with its
block list cut to the top blocks for the call, so rotary positions, the causal mask and the
final norm come from the model's code, not from a copy of it.

Tokens (`encode_pair`): with a chat template (the default model has one), the prompt is the
template of the prompt's messages with the generation prompt, and the response is what the
template of messages + the assistant's reply adds after it: for Qwen "yes<|im_end|>\\n", so the
template's end tokens are response tokens (exrm-vs-imrm's convention). Without a template: the
prompt text as generation encodes it, then sep + response + the EOS token. Responses are cut to
`max_response_tokens` (their first tokens kept), prompts to `max_prompt_tokens` (their last
tokens kept); both cuts are counted.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from qprobe.errors import BackendError, ConfigError, DataError, require
from qprobe.features.hf import HookCapture
from qprobe.generation.hf_load import LoadedLM, decoder_blocks, encode_prompt
from qprobe.tasks.pairs import Pair


@dataclass(frozen=True)
class Encoded:
    """Token ids of one pair: the shared prompt and the two responses (cut to the budgets)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    cuts: int  # how many of prompt / chosen / rejected were cut to their budget

    def sequence(self, side: str) -> list[int]:
        return self.prompt + (self.chosen if side == "chosen" else self.rejected)


def _template_parts(tokenizer: Any, pair: Pair, response: str) -> tuple[str, str]:
    messages = [dict(m) for m in pair.prompt.messages or ()] or [{"role": "user", "content": pair.prompt.text}]
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise DataError(f"expected the chat template of prompt + response to start with the prompt's template "
                        f"(pair '{pair.id}'), got a template that rewrites earlier turns; use a tokenizer whose "
                        "template appends the reply")
    return head, full[len(head):]


def encode_pair(tokenizer: Any, pair: Pair, max_prompt_tokens: int, max_response_tokens: int) -> Encoded:
    """The pair's token ids (see the module docstring)."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    if getattr(tokenizer, "chat_template", None):
        head, chosen_text = _template_parts(tokenizer, pair, pair.chosen)
        _, rejected_text = _template_parts(tokenizer, pair, pair.rejected)
        prompt, chosen, rejected = ids(head), ids(chosen_text), ids(rejected_text)
    else:
        eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
        prompt = encode_prompt(tokenizer, pair.prompt.text)
        chosen, rejected = ids(pair.sep + pair.chosen) + eos, ids(pair.sep + pair.rejected) + eos
    if not prompt or not chosen or not rejected:
        raise DataError(f"expected a non-empty prompt and responses in pair '{pair.id}', got an empty one")
    cuts = int(len(prompt) > max_prompt_tokens) + int(len(chosen) > max_response_tokens)
    cuts += int(len(rejected) > max_response_tokens)
    return Encoded(prompt[-max_prompt_tokens:], chosen[:max_response_tokens], rejected[:max_response_tokens], cuts)


@dataclass(frozen=True)
class LoraSettings:
    """The adapter configuration shared by every head."""

    top_blocks: int = 4
    r: int = 16
    alpha: float = 32.0

    def __post_init__(self) -> None:
        if self.top_blocks < 1:
            raise ConfigError(f"expected top_blocks >= 1, got {self.top_blocks}")
        if self.r < 1:
            raise ConfigError(f"expected a LoRA rank r >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"expected LoRA alpha > 0, got {self.alpha}")

    @classmethod
    def of(cls, config: Any) -> LoraSettings:
        """From a run's config with the flat fields `top_blocks`, `lora_r`, `lora_alpha` (a
        `TrunkConfig`: the CLI's --top-blocks, --lora-r, --lora-alpha)."""
        return cls(config.top_blocks, config.lora_r, config.lora_alpha)



class Trunk:
    """`lm` with LoRA adapters on its top `settings.top_blocks` blocks; everything else frozen.

    peft's random initialisation of the adapters (A; B starts at zero) draws from torch's
    global generator, so it runs under `torch.random.fork_rng` seeded with `seed`: the same
    seed gives the same adapters and the caller's generator state is left as it was."""

    def __init__(self, lm: LoadedLM, settings: LoraSettings, seed: int = 0) -> None:
        peft = require("peft", "rm")
        self.lm, self.settings = lm, settings
        model = lm.model
        blocks = decoder_blocks(model)
        n = len(blocks)
        if settings.top_blocks > n:
            raise ConfigError(f"expected top_blocks <= {n} (the model's blocks), got {settings.top_blocks}")
        if getattr(self.decoder, "has_sliding_layers", False):
            raise BackendError("expected a model without sliding-window layers (the cut block list would "
                               "read the wrong layer types), got one; use a full-attention model")
        if any("lora_" in name for name, _ in model.named_parameters()):
            raise ConfigError("expected a base model without adapters, got one a Trunk already adapted; "
                              "load the model again for each reward model")
        self.n_blocks, self.start = n, n - settings.top_blocks
        for p in model.parameters():
            p.requires_grad_(False)
        names = {id(m): name for name, m in model.named_modules()}
        self.targets = sorted(names[id(m)] for b in list(blocks)[self.start:] for m in b.modules()
                              if isinstance(m, torch.nn.Linear))
        config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0,
                                 target_modules=self.targets, bias="none")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft 0.21 asks transformers 5 a deprecated question: noise to a user, nothing to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(seed)
            self.peft = peft.get_peft_model(model, config)
        self.model = model  # the same modules, adapters injected in place
        self.model.eval()  # no dropout anywhere: a step is a pure function of the parameters

    @property
    def decoder(self) -> Any:
        m = self.lm.model
        return m.get_decoder() if hasattr(m, "get_decoder") else m

    @property
    def hidden_size(self) -> int:
        return int(self.lm.model.config.hidden_size)

    def adapter_config(self) -> dict[str, Any]:
        s = self.settings
        return {"library": "peft", "r": s.r, "alpha": s.alpha, "dropout": 0.0, "top_blocks": s.top_blocks,
                "first_block": self.start, "n_blocks": self.n_blocks, "target_modules": self.targets}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft).items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        mine = set(self.adapter_state())
        if set(state) != mine:
            raise ConfigError(f"expected adapter tensors {sorted(mine)[:2]}..., got {sorted(state)[:2]}...; "
                              "the file was saved with another adapter configuration")
        set_peft_model_state_dict(self.peft, state)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """pi_ref: the same model with the adapters switched off (peft's `disable_adapter`)."""
        with self.peft.disable_adapter():
            yield

    # ------------------------------------------------------------------------------ forward
    def bottom_states(self, ids: list[int]) -> torch.Tensor:
        """The hidden state entering block `start` at every position, [T, d] (no gradient)."""
        x = torch.tensor([ids], device=self.lm.device)  # [1, T]
        with torch.no_grad():
            if self.start == 0:
                return self.decoder.get_input_embeddings()(x)[0]  # [T, d]
            with HookCapture(self.model, [self.start]) as cap:
                got = cap.run(lambda: self.decoder(input_ids=x, use_cache=False))
        return got[self.start][0].detach()  # [T, d]

    @contextlib.contextmanager
    def _top_only(self) -> Iterator[None]:
        dec = self.decoder
        blocks = dec.layers
        dec.layers = torch.nn.ModuleList(list(blocks)[self.start:])
        try:
            yield
        finally:
            dec.layers = blocks

    def top_states(self, h_in: torch.Tensor) -> torch.Tensor:
        """Final-norm states [T, d] from the states entering block `start` (h_in [T, d])."""
        with self._top_only():
            out = self.decoder(inputs_embeds=h_in[None], use_cache=False)
        return out.last_hidden_state[0]  # [T, d]

    def full_states(self, ids: list[int]) -> torch.Tensor:
        """Final-norm states [T, d] of a plain full forward (the check on `top_states`)."""
        out = self.decoder(input_ids=torch.tensor([ids], device=self.lm.device), use_cache=False)
        return out.last_hidden_state[0]  # [T, d]

    def logprobs(self, final: torch.Tensor, ids: list[int], prompt_len: int) -> torch.Tensor:
        """log pi(y_t | x, y_<t) of the response tokens ids[prompt_len:], [t]: the LM head and a
        full-vocabulary log-softmax at the t positions that predict them."""
        logits = self.lm.model.get_output_embeddings()(final[prompt_len - 1 : len(ids) - 1]).float()  # [t, V]
        target = torch.tensor(ids[prompt_len:], device=logits.device)  # [t]
        return torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]  # [t]
