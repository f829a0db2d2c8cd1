"""Quantizer bottlenecks; all follow :class:`~tokenizers_vq.quantizers.base.Quantizer`."""

from tokenizers_vq.quantizers._functional import nearest_codes
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput
from tokenizers_vq.quantizers.fsq import FSQ
from tokenizers_vq.quantizers.grouped import GroupedQuantizer
from tokenizers_vq.quantizers.lfq import LFQ
from tokenizers_vq.quantizers.residual import ResidualQuantizer
from tokenizers_vq.quantizers.vq import VectorQuantizer

__all__ = [
    "FSQ",
    "LFQ",
    "GroupedQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "ResidualQuantizer",
    "VectorQuantizer",
    "nearest_codes",
]
