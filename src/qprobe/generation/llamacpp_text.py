"""Text <-> tokens of a llama.cpp model (llama-cpp-python's low-level API), as a mixin of
`LlamaCppBackend`: tokenising, token pieces, the GGUF's own chat template, and where a completion
is cut at a stop sequence (its kept text and the tokens that spell it)."""

from __future__ import annotations

import ctypes
from typing import Any

from qprobe.core.types import Prompt
from qprobe.errors import BackendError


class LlamaText:
    """Needs `_lib` (llama_cpp), `_vocab`, `_model`, `chat` and `path` from the class it is mixed into."""

    _lib: Any
    _vocab: Any
    _model: Any
    _formatter: Any = None
    chat: bool
    path: Any

    # ----------------------------------------------------------------- text <-> tokens
    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self._lib.llama_token * cap)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def prompt_tokens(self, text: str) -> list[int]:
        """Tokens of a rendered prompt; BOS is added unless the text already starts with it."""
        bos = self._token_text(self._lib.llama_vocab_bos(self._vocab))
        return self.tokenize(text, add_special=not (bos and text.startswith(bos)), parse_special=True)

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int] | tuple[int, ...]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = self._lib.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    # ----------------------------------------------------------------- prompts
    def render(self, prompt: Prompt) -> str:
        """The GGUF's own chat template (generation prompt added) for chat prompts, else the text."""
        if not (self.chat and prompt.messages):
            return prompt.text
        if self._formatter is None:
            template = self._lib.llama_model_chat_template(self._model, None)
            if not template:
                raise BackendError(
                    f"expected a chat template in '{self.path.name}', found none; "
                    "use chat=False (completion prompts) or a GGUF with a template"
                )
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(
                template=template.decode("utf-8"),
                eos_token=self._token_text(self._lib.llama_vocab_eos(self._vocab)),
                bos_token=self._token_text(self._lib.llama_vocab_bos(self._vocab)),
                add_generation_prompt=True,
            )
        return str(self._formatter(messages=[dict(m) for m in prompt.messages]).prompt)

    def _kept(self, gen: list[int], raw: bytearray, cut: int | None) -> tuple[str, tuple[int, ...]]:
        """The completion's text (stop sequence removed) and its tokens."""
        body = raw.decode("utf-8", errors="replace")
        if cut is None:
            return body, tuple(gen)
        body = body[:cut]
        ids = prefix_tokens(gen, body, self.piece)
        if ids is None:  # the stop sequence began inside a token: re-tokenise the kept text
            ids = self.tokenize(body, add_special=False, parse_special=True)
        return body, tuple(ids)


def find_stop(raw: bytes | bytearray, stops: tuple[str, ...]) -> int | None:
    """Character index of the earliest stop sequence in the decoded text, or None."""
    text = raw.decode("utf-8", errors="replace")  # as the kept text is decoded
    hits = [i for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def prefix_tokens(tokens: list[int], kept: str, piece: Any) -> list[int] | None:
    """The shortest prefix of `tokens` that decodes to exactly `kept`, or None."""
    target = kept.encode("utf-8")
    acc = b""
    for i, t in enumerate(tokens):
        if acc == target:
            return tokens[:i]
        acc += piece(t)
        if len(acc) > len(target):
            return None
    return list(tokens) if acc == target else None
