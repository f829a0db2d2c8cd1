"""LPIPS v0.1 (Zhang et al. 2018) in plain torch, for evaluation without torchvision.

The network is the ``lpips`` package's: an ImageNet VGG16 (or AlexNet) trunk, channel-
normalised activations at five ReLUs, squared differences weighted per channel by the
learned linear heads and averaged over space, summed over layers. Weights come from
files, never from the network:

* the trunk: torchvision's ``vgg16-397923af.pth`` or ``alexnet-owt-7be5be79.pth``
  (its ``features.*`` tensors; the trunk keeps torchvision's layer indices, so they
  load by name), from a path or the torch hub cache;
* the heads: the ``lpips`` wheel's ``weights/v0.1/{vgg,alex}.pth`` (keys
  ``lin{k}.model.1.weight``), from a path or the installed ``lpips`` package (located,
  not imported: importing it imports torchvision).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from tokenizers_vq.weights import load_weights

BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}

# torchvision ``features`` layers: a conv as (in, out, kernel, stride, padding), "M" a
# 3x3/2 max-pool for AlexNet and a 2x2/2 one for VGG; each conv is followed by a ReLU.
_VGG16 = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
          (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]
_ALEX = [(3, 64, 11, 4, 2), "M", (64, 192, 5, 1, 2), "M", (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)]
# LPIPS taps the trunk after these ``features`` indices (relu1_2 ... relu5_3 for VGG).
_TAPS = {"vgg": (3, 8, 15, 22, 29), "alex": (1, 4, 7, 9, 11)}
_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}


def _trunk(net: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for spec in _VGG16 if net == "vgg" else _ALEX:
        if spec == "M":
            layers.append(nn.MaxPool2d(2, 2) if net == "vgg" else nn.MaxPool2d(3, 2))
        else:
            cin, cout, k, s, p = spec if len(spec) == 5 else (*spec, 3, 1, 1)
            layers += [nn.Conv2d(cin, cout, k, s, p), nn.ReLU()]
    return nn.Sequential(*layers)


class LPIPSNet(nn.Module):
    """LPIPS distance network, frozen, in eval mode.

    Args:
        net: ``"vgg"`` or ``"alex"``.

    Built with random weights (meaningful only for testing the plumbing); fill it with
    :meth:`load_files` or use :func:`load_lpips`.
    """

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in _TAPS:
            raise ValueError(f"LPIPS net must be one of {sorted(_TAPS)}, got {net!r}")
        self.net = net
        self.features = _trunk(net)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS[net])
        for head in self.heads:  # non-negative like the learned heads, so a random network is a distance too
            nn.init.uniform_(head.weight, 0, 1 / head.in_channels)
        # lpips v0.1 maps [-1, 1] inputs to ImageNet statistics with these constants
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def min_side(self) -> int:
        """The smallest image side (pixels) the trunk's strides and pools leave a feature at every tap."""
        if not hasattr(self, "_min_side"):
            with torch.inference_mode():
                for side in range(1, 257):
                    try:
                        x = torch.zeros(1, 3, side, side, device=self.shift.device)
                        self(x, x)
                        break
                    except RuntimeError:  # a pooling left nothing
                        continue
            self._min_side = side
        return self._min_side

    def load_files(self, backbone: dict[str, Tensor], heads: dict[str, Tensor]) -> None:
        """Load a torchvision state dict (only ``features.*`` is used) and an lpips
        v0.1 heads state dict (``lin{k}.model.1.weight``).

        Raises:
            ValueError: a tensor is missing or has the wrong shape.
        """
        trunk = {k.split(".", 1)[1]: v for k, v in backbone.items() if k.startswith("features.")}
        lins = {f"{k}.weight": heads.get(f"lin{k}.model.1.weight") for k in range(len(self.heads))}
        for name, module, state in (("backbone", self.features, trunk), ("heads", self.heads, lins)):
            if any(v is None for v in state.values()):
                raise ValueError(f"LPIPS-{self.net} {name} file lacks {[k for k, v in state.items() if v is None]}")
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ValueError(f"LPIPS-{self.net} {name} weights do not fit: {e}") from e

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS per image.

        Args:
            x, y: images ``(B, 3, H, W)`` in [-1, 1].

        Returns:
            ``(B,)`` distances.
        """
        h = (torch.cat([x, y]).float() - self.shift) / self.scale
        taps, total = _TAPS[self.net], 0
        for i, layer in enumerate(self.features[: taps[-1] + 1]):
            h = layer(h)
            if i in taps:
                fx, fy = h.chunk(2)
                # unit length along channels; eps as in lpips
                fx = fx / (fx.square().sum(1, keepdim=True).sqrt() + 1e-10)
                fy = fy / (fy.square().sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.heads[taps.index(i)]((fx - fy).square()).mean((1, 2, 3))
        return total


def _default_heads(net: str) -> Path | None:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / f"{net}.pth"


def load_lpips(weights: str | os.PathLike | None = None, heads: str | os.PathLike | None = None,
               net: str | None = None) -> LPIPSNet:
    """LPIPS from weight files.

    Args:
        weights: a torchvision VGG16 or AlexNet file; the trunk is read from its shapes.
            Default: ``BACKBONE_FILES[net]`` (without ``net``, the first of them found)
            in the torch hub cache.
        heads: the lpips v0.1 heads for that trunk. Default: inside the installed
            ``lpips`` package.
        net: ``"vgg"`` or ``"alex"`` to require that trunk; ``None`` takes the file's.

    Raises:
        FileNotFoundError: a file is absent; the message names where it was looked for.
        ValueError: a file does not fit the network, or holds another trunk than ``net``.
    """
    if net is not None and net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
    if weights is None:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        names = [BACKBONE_FILES[net]] if net else list(BACKBONE_FILES.values())
        found = [cache / f for f in names if (cache / f).is_file()]
        if not found:
            raise FileNotFoundError(f"LPIPS backbone weights ({' or '.join(names)}) not found in {cache}")
        weights = found[0]
    if not Path(weights).is_file():
        raise FileNotFoundError(f"LPIPS backbone weights not found at {weights}")
    backbone = load_weights(weights, "torchvision VGG16 or AlexNet weights")
    first = backbone.get("features.0.weight")
    if first is None or first.shape[-1] not in (3, 11):
        raise ValueError(f"{weights} is not a torchvision VGG16 or AlexNet state dict")
    found_net = "alex" if first.shape[-1] == 11 else "vgg"
    if net is not None and found_net != net:
        raise ValueError(f"{weights} holds LPIPS-{found_net} backbone weights, not the {net} asked for")
    net = found_net
    heads = heads if heads is not None else _default_heads(net)
    if heads is None:
        raise FileNotFoundError(f"LPIPS-{net} linear heads (lpips weights/v0.1/{net}.pth) not given, "
                                "and the lpips package that ships them is not installed")
    if not Path(heads).is_file():
        raise FileNotFoundError(f"LPIPS-{net} linear heads not found at {heads}")
    model = LPIPSNet(net)
    model.load_files(backbone, load_weights(heads, "LPIPS v0.1 linear heads"))
    return model


def lpips_distance(model: LPIPSNet, rec: Tensor, ref: Tensor, chunk: int = 8) -> float:
    """Mean LPIPS of an image ``(3, H, W)`` or of video frames ``(T, 3, H, W)`` (per
    frame, then averaged), inputs in [0, 1], on the model's device."""
    dev = model.shift.device
    rec, ref = (t.reshape(-1, *t.shape[-3:]) for t in (rec, ref))
    with torch.inference_mode():
        d = [model(a.to(dev) * 2 - 1, b.to(dev) * 2 - 1).cpu() for a, b in zip(rec.split(chunk), ref.split(chunk))]
    return torch.cat(d).double().mean().item()
