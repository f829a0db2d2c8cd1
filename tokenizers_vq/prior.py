"""A small GPT-style autoregressive prior over token ids, with sampling.

Decoder-only transformer (Radford et al. 2019) with pre-norm blocks, learned position
embeddings and an optional class token; sampling with temperature, top-k and top-p
(Holtzman et al. 2020).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.errors import named_path
from tokenizers_vq.quantizers.base import evaluating


@dataclass
class PriorConfig:
    vocab_size: int = 1024  # code ids; the model adds one <bos> id per class (or one)
    block_size: int = 256  # longest sequence (tokens after the <bos>)
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 256
    dropout: float = 0.0
    num_classes: int = 0  # 0: unconditional
    tokens_of: str = ""  # the model whose tokens it learned (its name), and that model's weights_sha256
    tokens_weights_sha256: str = ""  # (tokenizers_vq.export_record.weights_sha256): TokenPrior.check_tokenizer


class Block(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))
        self.n_head, self.dropout = cfg.n_head, cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class TokenPrior(nn.Module):
    """``p(tokens | class)``: the sequence starts with a ``<bos>`` id per class
    (``vocab_size + class``) and predicts each code id from those before it.

    Example:
        >>> prior = TokenPrior(PriorConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))
        >>> prior.generate(torch.zeros(3, dtype=torch.long), 8).shape
        torch.Size([3, 8])
    """

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size + max(1, cfg.num_classes), cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size + 1, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``prior_config.json`` and ``prior.safetensors`` into ``directory`` (together)."""
        from tokenizers_vq.io import atomic_write_all, save_safetensors  # noqa: PLC0415

        directory = named_path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        text = json.dumps(asdict(self.cfg), indent=1)
        atomic_write_all({directory / "prior.safetensors": lambda tmp: save_safetensors(state, tmp),
                          directory / "prior_config.json": lambda tmp: Path(tmp).write_text(text)})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str = "cpu") -> TokenPrior:
        """The prior :meth:`save` wrote into ``directory`` (``tvq prior --out``)."""
        from safetensors import SafetensorError  # noqa: PLC0415
        from safetensors.torch import load_file  # noqa: PLC0415

        directory = named_path(directory)
        for name in ("prior_config.json", "prior.safetensors"):
            if not (directory / name).is_file():
                raise ValueError(f"not a saved prior: {directory / name} is missing (tvq prior --out writes both)")
        try:
            prior = cls(PriorConfig(**json.loads((directory / "prior_config.json").read_text())))
        except (ValueError, TypeError, AttributeError, OSError) as e:  # (json's errors are ValueErrors)
            raise ValueError(f"corrupt {directory / 'prior_config.json'}: {e}") from e
        try:
            prior.load_state_dict(load_file(directory / "prior.safetensors"))
        except (SafetensorError, OSError, RuntimeError) as e:  # damaged, or weights of another shape
            raise ValueError(f"corrupt weights file {directory / 'prior.safetensors'} (or not its config's): "
                             f"{' '.join(str(e).split())[:300]}") from e
        return prior.to(map_location).eval()

    def check_tokenizer(self, tok) -> None:
        """Refuse a tokenizer other than the one whose tokens this prior learned (its weights
        differ from those recorded): its decoder would read the sampled codes as other content.
        A prior that recorded none (built by hand) passes."""
        from tokenizers_vq.export_record import same_weights  # noqa: PLC0415

        if self.cfg.tokens_weights_sha256 and not same_weights(self.cfg.tokens_weights_sha256, tok):
            raise ValueError(f"this prior learned the tokens of model {self.cfg.tokens_of!r} (weights "
                             f"{self.cfg.tokens_weights_sha256[:12]}), and {tok.config.name!r} here has other weights, "
                             "which decode its samples as other content: decode with the model that wrote its tokens")

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits ``(B, L, vocab)`` of each next code and the mean cross-entropy
        (nats/token) of ``tokens`` ``(B, L)`` given ``labels`` ``(B,)`` (or class 0)."""
        if tokens.ndim != 2 or tokens.shape[1] == 0 or tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be (B, L) integer ids with L >= 1, got {tokens.dtype} {tuple(tokens.shape)}")
        b, length = tokens.shape
        if length > self.cfg.block_size:
            raise ValueError(f"sequence of {length} tokens exceeds block_size={self.cfg.block_size}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
        labels = torch.zeros(b, dtype=torch.long, device=tokens.device) if labels is None else self._check_labels(labels)
        bos = (self.cfg.vocab_size + labels).unsqueeze(1)
        inp = torch.cat([bos, tokens[:, :-1]], dim=1)
        logits = self._logits(inp)
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))

    def _check_labels(self, labels: Tensor) -> Tensor:
        n = max(1, self.cfg.num_classes)  # an unconditional prior has the one class 0
        if (labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool
                or (labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n))):
            raise ValueError(f"labels must be (B,) class ids in [0, {n}) (the prior's num_classes is "
                             f"{self.cfg.num_classes}), got {labels.tolist() if labels.numel() <= 8 else tuple(labels.shape)}")
        return labels

    def _logits(self, inp: Tensor) -> Tensor:
        x = self.tok(inp) + self.pos(torch.arange(inp.shape[1], device=inp.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))

    @torch.no_grad()
    def generate(
        self, labels: Tensor, length: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``(B, length)`` code ids for class ``labels`` ``(B,)``: ``temperature`` 0 takes
        the most likely id (the lowest of equals), ``top_k`` 0 and ``top_p`` 1 keep every id. In
        eval mode (no dropout: the same ``generator`` gives the same ids), the mode restored after."""
        if length > self.cfg.block_size:
            raise ValueError(f"length {length} exceeds block_size={self.cfg.block_size}")
        if not (length >= 0 and temperature >= 0 and top_k >= 0 and 0 <= top_p <= 1):
            raise ValueError(f"generate needs length >= 0, temperature >= 0, top_k >= 0 and top_p in [0, 1]; got "
                             f"length={length}, temperature={temperature}, top_k={top_k}, top_p={top_p}")
        seq = (self.cfg.vocab_size + self._check_labels(labels)).unsqueeze(1)
        with evaluating(self):
            for _ in range(length):
                logits = self._logits(seq)[:, -1].float()
                if temperature == 0:  # greedy: the argmax, not a draw from a sharpened distribution
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    nxt = _draw(logits / max(temperature, 1e-5), top_k, top_p, generator)
                seq = torch.cat([seq, nxt], dim=1)
        return seq[:, 1:]


def _draw(logits: Tensor, top_k: int, top_p: float, generator: torch.Generator | None) -> Tensor:
    """One id per row of ``logits (B, V)``, drawn from the ``top_k`` likeliest (0: all) within
    the smallest set reaching probability ``top_p``; ``(B, 1)``."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        srt, idx = logits.sort(descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(1, idx, srt.masked_fill(drop, -math.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
