"""A byte-level tokenizer that needs no download: ids 0-255 are UTF-8 bytes, then pad/bos/eos."""

from __future__ import annotations

from typing import Any


class ByteTokenizer:
    """Text ↔ UTF-8 byte ids. `vocab_size` = 259 (256 bytes + pad 256, bos 257, eos 258).

    Implements the small part of the Hugging Face tokenizer interface spft uses: `encode`,
    `decode`, `pad_token_id`, `bos_token_id`, `eos_token_id`, `vocab_size`, `save_pretrained`.
    """

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int] | Any, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        data = bytes(i for i in ids if i < 256)
        return data.decode("utf-8", errors="replace")

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def save_pretrained(self, path: str) -> None:
        import json
        import os
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "spft_byte_tokenizer.json"), "w") as f:
            json.dump({"type": "ByteTokenizer", "vocab_size": self.vocab_size}, f)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens, for a `ByteTokenizer` or an HF tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
