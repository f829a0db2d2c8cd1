"""Training losses: reconstruction, perceptual (LPIPS), spectral, adversarial terms.

Every term is a named scalar; the trainer multiplies each by its named weight and
sums once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.distributed import all_reduce_sum_, rank_and_world
from tokenizers_vq.lpips import BACKBONE_FILES, LPIPSNet, load_lpips
from tokenizers_vq.spectral import multires_stft_distance, multiscale_mel_distance


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) as a loss: :class:`~tokenizers_vq.lpips.LPIPSNet`,
    frozen, averaged over the batch. Plain torch, no torchvision.

    Args:
        net: ``"vgg"`` or ``"alex"``.
        weights: torchvision ``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth``
            (config ``loss.lpips_weights``; default: the torch hub cache,
            ``$TORCH_HOME/hub/checkpoints``). Nothing is downloaded.
        heads: the lpips v0.1 linear heads (config ``loss.lpips_heads``; default: the
            ``weights/v0.1/{net}.pth`` inside the installed ``lpips`` package).
        random_backbone: random trunk and heads, no file needed; for testing the
            plumbing only (the distance is meaningless).

    Raises:
        FileNotFoundError: a weight file is absent; the message names the path looked at.
        ValueError: a file does not fit ``net``.
    """

    def __init__(self, net: str = "vgg", weights: str | os.PathLike | None = None,
                 heads: str | os.PathLike | None = None, random_backbone: bool = False):
        super().__init__()
        try:
            self.model = LPIPSNet(net) if random_backbone else load_lpips(weights, heads, net)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}. Training LPIPS-{net} reads the torchvision {BACKBONE_FILES[net]} from loss.lpips_weights "
                f"(default: the torch hub cache {Path(torch.hub.get_dir()) / 'checkpoints'}) and its linear heads "
                f"from loss.lpips_heads (default: the lpips package's weights/v0.1/{net}.pth; pip install lpips)"
            ) from e
        self.eval().requires_grad_(False)

    def min_side(self) -> int:
        """The smallest image side (pixels) the network takes (:meth:`LPIPSNet.min_side`)."""
        return self.model.min_side()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean LPIPS of images ``(B, 3, H, W)`` in [-1, 1]; differentiable in both."""
        return self.model(x, y).mean()


def reconstruction_terms(rec: Tensor, target: Tensor, modality: str, sample_rate: int | None,
                         skip: frozenset[str] = frozenset()) -> dict[str, Tensor]:
    """Weight-free reconstruction terms: ``l1``, ``l2``, and for audio ``mel``, ``stft``; the
    spectral ones named in ``skip`` (weighted 0) are not computed, as they cost a step's
    worth of STFTs."""
    terms = {"l1": (rec - target).abs().mean(), "l2": F.mse_loss(rec, target)}
    if modality == "audio":
        if "mel" not in skip:
            terms["mel"] = multiscale_mel_distance(rec, target, sample_rate)
        if "stft" not in skip:
            terms["stft"] = multires_stft_distance(rec, target)
    return terms


def hinge_d_loss(real: list[Tensor], fake: list[Tensor]) -> Tensor:
    """Hinge loss of the discriminator summed over its heads."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake))


def hinge_g_loss(fake: list[Tensor]) -> Tensor:
    return sum(-f.mean() for f in fake)


def feature_matching(real_feats: list[Tensor], fake_feats: list[Tensor]) -> Tensor:
    """Mean L1 between the discriminator's intermediate features (MelGAN)."""
    terms = [(r.detach() - f).abs().mean() for r, f in zip(real_feats, fake_feats)]
    return sum(terms) / max(len(terms), 1)


class LeCam(nn.Module):
    """LeCam regulariser (Tseng et al. 2021): ``|D(x) - a_f|^2 + |D(G(z)) - a_r|^2``
    with ``a_r``, ``a_f`` EMAs of the discriminator's mean outputs on real/fake."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("real_ema", torch.zeros(()))
        self.register_buffer("fake_ema", torch.zeros(()))

    def forward(self, real: list[Tensor], fake: list[Tensor]) -> Tensor:
        r = torch.stack([t.float().mean() for t in real]).mean()
        f = torch.stack([t.float().mean() for t in fake]).mean()
        with torch.no_grad():  # the mean over ranks: every rank's averages, and the checkpoint's, agree
            means = all_reduce_sum_(torch.stack([r, f]).detach()) / rank_and_world()[1]
            self.real_ema.lerp_(means[0], 1 - self.decay)
            self.fake_ema.lerp_(means[1], 1 - self.decay)
        reg = [F.relu(t - self.fake_ema).pow(2).mean() for t in real]
        reg += [F.relu(self.real_ema - t).pow(2).mean() for t in fake]
        return sum(reg)


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance (Esser et al. 2021): ``|grad_L rec| / (|grad_L gan| + 1e-4)``
    at the decoder's last layer ``L``, detached and clamped to ``[0, max_weight]``."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, max_weight).detach()
