"""The backbone registry and the parameter counts the docstrings state (their examples
run in tests/test_docs.py)."""

from __future__ import annotations

import re
from dataclasses import asdict

import pytest

from tokenizers_vq.backbones import BACKBONES, count_parameters


def test_registry_lists_each_modality():
    assert set(BACKBONES) == {"image", "audio", "video"}
    for cfg_cls, enc_cls, dec_cls in BACKBONES.values():
        assert enc_cls.__module__ == dec_cls.__module__ == cfg_cls.__module__


@pytest.mark.parametrize("modality", sorted(BACKBONES))
def test_config_round_trips_through_a_dict(modality):
    """Configs come back from JSON with lists for tuples; they must compare equal."""
    cfg_cls = BACKBONES[modality][0]
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg_cls()).items()}
    assert cfg_cls(**as_json) == cfg_cls()


@pytest.mark.parametrize("modality", sorted(BACKBONES))
def test_docstrings_state_the_default_parameter_counts(modality):
    cfg_cls, enc_cls, dec_cls = BACKBONES[modality]
    cfg = cfg_cls()
    for cls in (enc_cls, dec_cls):
        stated = re.search(r"default config .*?has\s+([\d,]+) parameters", cls.__doc__, re.S)
        assert stated, f"{cls.__name__}'s docstring does not state its parameter count"
        assert count_parameters(cls(cfg)) == int(stated.group(1).replace(",", ""))
