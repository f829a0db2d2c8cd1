"""Quantizer bottlenecks; all follow :class:`~tokenizers_vq.quantizers.base.Quantizer`."""

from tokenizers_vq.quantizers._functional import code_statistics, nearest_codes
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput
from tokenizers_vq.quantizers.binary_mapper import BinaryMapper
from tokenizers_vq.quantizers.dynamic import DynamicOutput, DynamicQuantizer, PackedCodes
from tokenizers_vq.quantizers.fsp import FSP
from tokenizers_vq.quantizers.fsq import FSQ
from tokenizers_vq.quantizers.grouped import GroupedQuantizer
from tokenizers_vq.quantizers.hierarchical import HierarchicalOutput, HierarchicalQuantizer
from tokenizers_vq.quantizers.ibq import IBQ
from tokenizers_vq.quantizers.latent import LatentQuantizer, latent_quantization_param_groups
from tokenizers_vq.quantizers.lfq import LFQ
from tokenizers_vq.quantizers.multiscale import MultiScaleResidualQuantizer
from tokenizers_vq.quantizers.projected import ProjectedCodebookVQ
from tokenizers_vq.quantizers.random_projection import RandomProjectionQuantizer
from tokenizers_vq.quantizers.residual import ResidualQuantizer
from tokenizers_vq.quantizers.shrink import shrink_codebook, shrink_family
from tokenizers_vq.quantizers.simvq import SimVQ
from tokenizers_vq.quantizers.vq import VectorQuantizer

__all__ = [
    "FSP",
    "FSQ",
    "IBQ",
    "LFQ",
    "BinaryMapper",
    "DynamicOutput",
    "DynamicQuantizer",
    "GroupedQuantizer",
    "HierarchicalOutput",
    "HierarchicalQuantizer",
    "LatentQuantizer",
    "MultiScaleResidualQuantizer",
    "PackedCodes",
    "ProjectedCodebookVQ",
    "Quantizer",
    "QuantizerOutput",
    "RandomProjectionQuantizer",
    "ResidualQuantizer",
    "SimVQ",
    "VectorQuantizer",
    "code_statistics",
    "latent_quantization_param_groups",
    "nearest_codes",
    "shrink_codebook",
    "shrink_family",
]
