"""spft.models — tiny LLaMA-style models, a download-free tokenizer and generated tasks.

Everything here works offline: `tiny_llama_config()` builds a `transformers.LlamaConfig`,
`ByteTokenizer` maps text to UTF-8 bytes, and `spft.models.tasks` generates toy tasks for the demo
and the tests.
"""

from spft.models.configs import (
    MODEL_PRESETS,
    build_model,
    llama2_7b_config,
    load_model_and_tokenizer,
    tiny_llama_config,
)
from spft.models.tokenizer import ByteTokenizer, encode_text

__all__ = [
    "MODEL_PRESETS",
    "ByteTokenizer",
    "build_model",
    "encode_text",
    "llama2_7b_config",
    "load_model_and_tokenizer",
    "tiny_llama_config",
]
