"""Text -> token ids exactly as the reference feeds the model (no BOS/EOS, CJK words split to characters).

Built on the ``tokenizers`` library from ``tokenizer.json`` plus the added tokens that only
``tokenizer_config.json`` declares (ids 101..112 among them). The pre-tokenizer is the one the
reference's transformers 5.x installs: no normalizer, Metaspace("▁", prepend "always", no split).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from tokenizers.pre_tokenizers import Metaspace

from voxcpm_core.errors import VoxCPMError

SPACE = "\u2581"
AUDIO_START = 101
AUDIO_END = 102
REF_AUDIO_START = 103  # VoxCPM2: a reference clip sits between these two tokens
REF_AUDIO_END = 104


def sequence_length(text_tokens: int, audio_patches: int) -> int:
    """Positions of one training sequence: the text, AUDIO_START, the audio patches, AUDIO_END."""
    return text_tokens + 1 + audio_patches + 1


def _is_cjk(text: str) -> bool:
    return all("\u4e00" <= ch <= "\u9fff" for ch in text)


class TextTokenizer:
    """Encodes text to the reference ids; ``encode`` is all the model needs."""

    def __init__(self, tokenizer: Tokenizer, added_tokens: list[AddedToken] | None = None):
        tokenizer.normalizer = None
        tokenizer.pre_tokenizer = Metaspace(replacement=SPACE, prepend_scheme="always", split=False)
        if added_tokens:
            tokenizer.add_special_tokens(added_tokens)
        self._tk = tokenizer
        self._vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Multi-character CJK vocab entries -> ids of their characters (the reference's masking).
        self._split_cjk: dict[str, list[int]] = {}
        for token in self._vocab:
            chars = token.replace(SPACE, "")
            if len(chars) >= 2 and _is_cjk(chars) and chars in self._vocab and all(c in self._vocab for c in chars):
                self._split_cjk[chars] = [self._vocab[c] for c in chars]

    @classmethod
    def from_files(cls, tokenizer_json: Path, tokenizer_config_json: Path | None = None) -> TextTokenizer:
        try:
            tk = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises plain Exceptions for unreadable files
            raise VoxCPMError(f"{tokenizer_json}: cannot read tokenizer ({exc}); copy tokenizer.json from the model") from None
        added: list[AddedToken] = []
        if tokenizer_config_json is not None and tokenizer_config_json.is_file():
            try:
                decl = json.loads(tokenizer_config_json.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
            except json.JSONDecodeError as exc:
                raise VoxCPMError(f"{tokenizer_config_json}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
            for _, spec in sorted(decl.items(), key=lambda kv: int(kv[0])):
                added.append(
                    AddedToken(
                        spec["content"],
                        single_word=spec.get("single_word", False),
                        lstrip=spec.get("lstrip", False),
                        rstrip=spec.get("rstrip", False),
                        normalized=spec.get("normalized", False),
                        special=spec.get("special", True),
                    )
                )
        return cls(tk, added)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def token_id(self, token: str) -> int:
        return self._vocab[token]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; callers append 101 (audio start) themselves."""
        ids: list[int] = []
        for token, token_id in zip(*self._tokens_and_ids(text), strict=True):
            split = self._split_cjk.get(token.replace(SPACE, ""))
            ids.extend(split if split is not None else [token_id])
        return ids

    def _tokens_and_ids(self, text: str) -> tuple[list[str], list[int]]:
        enc = self._tk.encode(text, add_special_tokens=False)
        return enc.tokens, enc.ids
