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

from tokenizers_vq.spectral import multires_stft_distance, multiscale_mel_distance


class LPIPS(nn.Module):
    """LPIPS through the ``lpips`` package (Zhang et al. 2018), frozen.

    The backbone's ImageNet weights are not downloaded here: pass ``weights`` (a
    torchvision ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth`` file) or put
    that file in the torch hub cache (``$TORCH_HOME/hub/checkpoints``). The linear
    heads ship inside the ``lpips`` wheel. ``random_backbone=True`` skips the
    ImageNet weights (for testing the plumbing only: the distance is meaningless).

    Raises:
        RuntimeError: ``lpips``/``torchvision`` missing or the backbone weights absent.
    """

    FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}

    def __init__(self, net: str = "vgg", weights: str | os.PathLike | None = None, random_backbone: bool = False):
        super().__init__()
        if net not in self.FILES:
            raise ValueError(f"LPIPS net must be one of {sorted(self.FILES)}, got {net!r}")
        try:
            import lpips  # noqa: PLC0415
        except ImportError as e:
            raise RuntimeError("LPIPS needs the vision extra: pip install 'tokenizers_vq[vision]'") from e
        # Built with a random backbone (no download), then the ImageNet weights are
        # loaded from the file, so nothing is fetched at run time.
        self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if not random_backbone:
            path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / self.FILES[net]
            if not path.is_file():
                raise RuntimeError(
                    f"LPIPS-{net} backbone weights not found at {path}; download {self.FILES[net]} "
                    "elsewhere and pass its path (loss.lpips_weights) or place it in the torch hub cache"
                )
            load_backbone(self.model.net, torch.load(path, map_location="cpu", weights_only=True))
        self.model.eval().requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean LPIPS of images ``(B, 3, H, W)`` in [-1, 1]."""
        return self.model(x.float(), y.float()).mean()


def load_backbone(net: nn.Module, state: dict[str, Tensor]) -> None:
    """Load torchvision ``features.{i}.*`` weights into lpips' sliced backbone, whose
    layers keep their torchvision index inside ``slice{k}``."""
    slots = {name.split(".", 1)[1]: name for name, _ in net.named_parameters()}
    mapped = {slots[k.split(".", 1)[1]]: v for k, v in state.items() if k.startswith("features.") and k.split(".", 1)[1] in slots}
    if len(mapped) != len(slots):
        raise RuntimeError(f"LPIPS backbone weights fit {len(mapped)} of {len(slots)} layers: wrong file?")
    net.load_state_dict(mapped, strict=True)


def reconstruction_terms(rec: Tensor, target: Tensor, modality: str, sample_rate: int | None) -> dict[str, Tensor]:
    """Weight-free reconstruction terms: ``l1``, ``l2``, and for audio ``mel``, ``stft``."""
    terms = {"l1": (rec - target).abs().mean(), "l2": F.mse_loss(rec, target)}
    if modality == "audio":
        terms["mel"] = multiscale_mel_distance(rec, target, sample_rate)
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
        with torch.no_grad():
            self.real_ema.lerp_(r.detach(), 1 - self.decay)
            self.fake_ema.lerp_(f.detach(), 1 - self.decay)
        reg = [F.relu(t - self.fake_ema).pow(2).mean() for t in real]
        reg += [F.relu(self.real_ema - t).pow(2).mean() for t in fake]
        return sum(reg)


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance (Esser et al. 2021): ``|grad_L rec| / (|grad_L gan| + 1e-4)``
    at the decoder's last layer ``L``, detached and clamped to ``[0, max_weight]``."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, max_weight).detach()
