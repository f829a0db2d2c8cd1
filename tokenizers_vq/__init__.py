"""tokenizers_vq: discrete tokenizers for images, audio and video.

Importing the package loads torch only: torchvision, torchaudio, lpips and triton
are imported lazily by the parts that need them.
"""

from tokenizers_vq.quantizers import (
    FSQ,
    LFQ,
    GroupedQuantizer,
    Quantizer,
    QuantizerOutput,
    ResidualQuantizer,
    SimVQ,
    VectorQuantizer,
    nearest_codes,
)
from tokenizers_vq.tokenizer import QuantizerConfig, Tokenizer, TokenizerConfig

__version__ = "0.1.0"

_LAZY = {"TokenDataset": "tokenizers_vq.token_dataset", "load_tokens": "tokenizers_vq.tokens",
         "export_dataset": "tokenizers_vq.export"}
"""Names importable from the package that load their module on first use (import stays cheap)."""


def __getattr__(name: str):
    if name in _LAZY:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokenizers_vq' has no attribute {name!r}")

__all__ = [
    "FSQ",
    "LFQ",
    "GroupedQuantizer",
    "Quantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "ResidualQuantizer",
    "SimVQ",
    "TokenDataset",
    "Tokenizer",
    "TokenizerConfig",
    "VectorQuantizer",
    "export_dataset",
    "load_tokens",
    "nearest_codes",
]
