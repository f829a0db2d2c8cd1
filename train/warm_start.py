"""Warm starts: a fresh model takes the weights of an earlier one (``tvq train --init_from``)."""

from __future__ import annotations

from pathlib import Path

import torch

from tokenizers_vq.tokenizer import PRETRAINED, Tokenizer
from tokenizers_vq.tokenizer_config import filled_config, saved_config


def warm_start(model: Tokenizer, source: str, init_quantizer: str = "all") -> None:
    """Weights of ``source`` (an embedded model's name, a tokenizer folder, or a
    checkpoint folder's ``model``) into the fresh model, before the EMA copy and
    ``prepare``; ``init_quantizer`` says what its quantizer gives (see the config).

    A video model whose decoder has more residual blocks per level than the source's
    (``decoder_res_blocks``, all else equal) takes the source's decoder with the added
    blocks starting as the identity: it reconstructs exactly as the source at step 0."""
    directory = Path(source)
    # a checkpoint folder, or a run's out_dir (whose save cut short left the last one as checkpoint.old)
    for inner in ("model", "checkpoint/model", "checkpoint.old/model"):
        if not (directory / "config.json").is_file() and (directory / inner / "config.json").is_file():
            directory = directory / inner
    src = Tokenizer.from_pretrained(source if source in PRETRAINED else directory)
    mode = init_quantizer
    # as saved (a projected codebook's features compare by shape: the weights hold them), defaults written out
    mine, theirs = (filled_config(saved_config(m.config, m.quantizer)) for m in (model, src))
    for d in (mine, theirs):  # none of these changes a weight: the name, how long audio is coded, and
        for key in ("name", "chunk_frames", "chunk_context"):  # an audio backbone's causal padding
            d.pop(key)
        if mode != "all":
            d["quantizer_"] = d.pop("quantizer")
        d["backbone"] = {k: v for k, v in d["backbone"].items() if k != "causal"}
    mine_blocks, their_blocks = (getattr(m.backbone_config, "decoder_blocks", 0) for m in (model, src))
    grow = their_blocks if mine_blocks > their_blocks > 0 else 0
    if their_blocks:  # a video backbone: compared by the decoder's depth as built, however it is spelled
        for d, blocks in ((mine, mine_blocks), (theirs, their_blocks)):
            d["backbone"]["decoder_res_blocks"] = their_blocks if grow else blocks
    diff = sorted(k for k in mine if k != "quantizer_" and mine[k] != theirs.get(k))
    if diff:
        detail = "; ".join(_differences(mine[k], theirs.get(k), k) for k in diff)
        raise ValueError(f"init_from={directory}: its model config differs from this run's ({detail}); "
                         "train with the same model section, or start without init_from"
                         + ("" if diff != ["quantizer"] else " (init_quantizer=none takes the encoder and "
                            "decoder only; first_level puts a single-level quantizer under a residual one)"))
    state = src.state_dict()
    if grow:
        model.decoder.load_shallower({k[len("decoder."):]: state.pop(k) for k in list(state) if k.startswith("decoder.")}, grow)
    own = state if mode == "all" else {k: v for k, v in state.items() if not k.startswith("quantizer.")}
    if mode == "first_level":
        theirs_q, mine_q = theirs["quantizer_"], mine["quantizer_"]
        same = ({k: v for k, v in theirs_q.items() if k not in ("levels", "dropout", "beam_size")}
                == {k: v for k, v in mine_q.items() if k not in ("levels", "dropout", "beam_size")})
        if (theirs_q["levels"] != 1 or mine_q["levels"] < 2 or not same or mine_q.get("shared_codebook")
                or not hasattr(model.quantizer, "levels")):
            raise ValueError(f"init_quantizer=first_level needs a single-level source quantizer and a residual "
                             f"one here (not a shared codebook) with the same kind and options; got {theirs_q} and {mine_q}")
        own.update({k.replace("quantizer.", "quantizer.levels.0.", 1): v for k, v in state.items()
                    if k.startswith("quantizer.")})
        with torch.no_grad():
            for level in list(model.quantizer.levels)[1:]:
                out = getattr(level, "project_out", None)
                if not isinstance(out, torch.nn.Linear):
                    raise ValueError("init_quantizer=first_level needs levels with an output projection "
                                     "(a codebook_dim below the latent dim), to start the new levels at zero")
                out.weight.zero_()
                if out.bias is not None:
                    out.bias.zero_()
    allowed = (("decoder.",) if grow else ()) + (("quantizer.",) if mode != "all" else ())
    missing, unexpected = model.load_state_dict(own, strict=False)
    if unexpected or any(not k.startswith(allowed) for k in missing):
        raise ValueError(f"init_from={directory}: weights do not fit this model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")


def _differences(mine, theirs, key: str) -> str:
    """``key.sub: <this run's> here, <the source's> there`` for the values that differ."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        return "; ".join(_differences(mine.get(k), theirs.get(k), f"{key}.{k}")
                         for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))
    return f"model.{key} {mine!r} here, {theirs!r} in init_from"
