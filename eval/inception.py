"""The FID Inception-v3 in plain torch: 2048-d pool features for rFID.

FID (Heusel et al. 2017) is defined with the 2015 TensorFlow Inception-v3 graph
(``inception-2015-12-05``). pytorch-fid ports it to torch and publishes its weights as
``pt_inception-2015-12-05-6726825d.pth``; this module builds the same network without
torchvision, with the same parameter names, so that file loads with ``strict=True``.
The TF graph differs from torchvision's Inception-v3 in its pooling: the average pools
inside the mixed blocks leave padding out of the mean, and the last block max-pools.

Inputs are resized to 299x299 (bilinear, no antialiasing) and mapped from [0, 1] to
[-1, 1], as in pytorch-fid; features are the global average pool of ``Mixed_7c``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.weights import load_weights

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class _ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _row(cin: int, cout: int) -> _ConvBN:  # 1x7
    return _ConvBN(cin, cout, (1, 7), padding=(0, 3))


def _col(cin: int, cout: int) -> _ConvBN:  # 7x1
    return _ConvBN(cin, cout, (7, 1), padding=(3, 0))


def _avg_pool(x: Tensor) -> Tensor:
    # TF's SAME average pool divides by the number of real pixels under the window
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _chain(x: Tensor, *layers: nn.Module) -> Tensor:
    for layer in layers:
        x = layer(x)
    return x


class _Mixed35(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1; out 224 + ``pool``."""

    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _ConvBN(cin, 48, 1), _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _ConvBN(64, 96, 3, padding=1), _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            _chain(x, self.branch5x5_1, self.branch5x5_2),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _Reduce35(nn.Module):
    """35 -> 17 grid reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2; out 768."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _ConvBN(64, 96, 3, padding=1), _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        deep = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)
        return torch.cat([self.branch3x3(x), deep, F.max_pool2d(x, 3, 2)], 1)


class _Mixed17(nn.Module):
    """17x17 block with factorised 7x7 convolutions of width ``c``; out 768."""

    def __init__(self, cin: int, c: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = _ConvBN(cin, c, 1), _row(c, c), _col(c, 192)
        self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3 = _ConvBN(cin, c, 1), _col(c, c), _row(c, c)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _col(c, c), _row(c, 192)
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                   self.branch7x7dbl_5),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _Reduce17(nn.Module):
    """17 -> 8 grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2; out 1280."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _ConvBN(cin, 192, 1), _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3 = _ConvBN(cin, 192, 1), _row(192, 192), _col(192, 192)
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            _chain(x, self.branch3x3_1, self.branch3x3_2),
            _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
            F.max_pool2d(x, 3, 2),
        ], 1)


class _Mixed8(nn.Module):
    """8x8 block with split 1x3 / 3x1 heads; out 2048. ``max_pool``: the last block of
    the TF graph max-pools its pool branch where the others average."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _ConvBN(cin, 448, 1), _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], 1)


class FIDInception(nn.Module):
    """FID Inception-v3 feature extractor, frozen, in eval mode.

    Built with random weights; use :func:`load_inception` for the real ones. ``fc``
    (1008 ImageNet-2012 + background classes of the TF graph) is unused here and kept so
    that the published file loads strictly.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _Mixed35(192, 32), _Mixed35(256, 64), _Mixed35(288, 64)
        self.Mixed_6a = _Reduce35(288)
        self.Mixed_6b, self.Mixed_6c = _Mixed17(768, 128), _Mixed17(768, 160)
        self.Mixed_6d, self.Mixed_6e = _Mixed17(768, 160), _Mixed17(768, 192)
        self.Mixed_7a = _Reduce17(768)
        self.Mixed_7b, self.Mixed_7c = _Mixed8(1280, max_pool=False), _Mixed8(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """Pool features.

        Args:
            x: images ``(B, 3, H, W)`` in [0, 1], any size.

        Returns:
            ``(B, 2048)`` features.
        """
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = _chain(F.max_pool2d(x, 3, 2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = _chain(F.max_pool2d(x, 3, 2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                   self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        return x.mean((2, 3))


def load_inception(weights: str | os.PathLike | None = None) -> FIDInception:
    """The FID Inception with pytorch-fid's weights from ``weights`` (default:
    ``FID_WEIGHTS_FILE`` in the torch hub cache, where pytorch-fid downloads it).

    Raises:
        FileNotFoundError: the file is absent; the message names the path.
        ValueError: the file's tensors do not match the network.
    """
    path = Path(weights) if weights is not None else Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found at {path}")
    model = FIDInception()
    try:
        # files without BatchNorm's num_batches_tracked load too (torch fills it in)
        model.load_state_dict(load_weights(path, "pytorch-fid's Inception weights"), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not the FID Inception ({FID_WEIGHTS_FILE}): {e}") from e
    return model


def inception_features(model: FIDInception, images: Tensor) -> Tensor:
    """Features ``(B, 2048)`` (float64, CPU) of images ``(B, 3, H, W)`` or one image
    ``(3, H, W)`` in [0, 1], computed on the model's device."""
    images = images if images.ndim == 4 else images.unsqueeze(0)
    with torch.inference_mode():
        return model(images.to(model.fc.weight.device)).double().cpu()
