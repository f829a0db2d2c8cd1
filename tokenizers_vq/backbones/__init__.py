"""Encoder / decoder backbones per modality; any quantizer plugs between them.

Each family is a config dataclass, an encoder and a decoder, registered in
:data:`BACKBONES` by modality name. Latents are channels-first, ``(B, D, ...)``,
as convs produce them; move ``D`` last before handing them to a quantizer.
"""

from tokenizers_vq.backbones._blocks import count_parameters
from tokenizers_vq.backbones.audio import AudioBackboneConfig, AudioDecoder, AudioEncoder
from tokenizers_vq.backbones.image import ImageBackboneConfig, ImageDecoder, ImageEncoder
from tokenizers_vq.backbones.video import VideoBackboneConfig, VideoDecoder, VideoEncoder

BACKBONES: dict[str, tuple[type, type, type]] = {
    "image": (ImageBackboneConfig, ImageEncoder, ImageDecoder),
    "audio": (AudioBackboneConfig, AudioEncoder, AudioDecoder),
    "video": (VideoBackboneConfig, VideoEncoder, VideoDecoder),
}

__all__ = [
    "BACKBONES",
    "AudioBackboneConfig",
    "AudioDecoder",
    "AudioEncoder",
    "ImageBackboneConfig",
    "ImageDecoder",
    "ImageEncoder",
    "VideoBackboneConfig",
    "VideoDecoder",
    "VideoEncoder",
    "count_parameters",
]
