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

__all__ = [
    "FSQ",
    "LFQ",
    "GroupedQuantizer",
    "Quantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "ResidualQuantizer",
    "SimVQ",
    "Tokenizer",
    "TokenizerConfig",
    "VectorQuantizer",
    "nearest_codes",
]
