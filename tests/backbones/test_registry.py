"""The backbone registry, the parameter counts the docstrings state, and the
docstring examples."""

from __future__ import annotations

import doctest
import re
from dataclasses import asdict

import pytest

from tokenizers_vq.backbones import BACKBONES, count_parameters
from tokenizers_vq.backbones import audio, image, video


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


@pytest.mark.parametrize("module", [image, audio, video], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0
