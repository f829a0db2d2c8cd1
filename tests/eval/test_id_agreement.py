"""The CPU/CUDA id comparison's parts that need no GPU: the captured quantizer inputs are
what the tokenizer searches, and the near-tie check tells rounding from real misses."""

from __future__ import annotations

import torch
from testdata import shared_path

from tokenizers_vq.eval.id_agreement import compare_ids, exact_distance, markdown, quantizer_inputs
from tokenizers_vq.media import load_input
from tokenizers_vq.quantizers._functional import nearest_codes_reference
from tokenizers_vq.tokenizer import Tokenizer


def test_captured_inputs_give_the_tokenizers_own_ids():
    tok = Tokenizer.from_pretrained("speech").eval()
    x, _, _ = load_input(shared_path("audio", "librispeech_train-clean-100", "103-1240-0000.flac"), "audio", 16000)
    x = x[:, :32000].unsqueeze(0)
    queries, cb, metric = quantizer_inputs(tok, x)
    assert metric == "cosine" and cb.shape == (tok.codebook_size, 16) and tok.codebook_size > 1
    _, ids = nearest_codes_reference(queries, cb, metric)
    assert torch.equal(ids, tok.encode(x).flatten())


def test_video_fsq_has_no_search_to_compare():
    tok = Tokenizer.from_pretrained("video").eval()
    assert quantizer_inputs(tok, torch.zeros(1, 3, 5, 16, 16)) is None


def test_near_ties_within_rounding_pass_and_real_misses_do_not():
    torch.manual_seed(0)
    cb = torch.randn(64, 16)
    x = cb[:8] + 0.01 * torch.randn(8, 16)
    cb[40] = cb[3] * (1 + 2**-12)  # a near-twin of code 3: within bf16 rounding, not fp32's
    ref = nearest_codes_reference(x, cb, "l2")[1]
    assert ref[3] == 3
    got = ref.clone()
    got[3] = 40
    bf16 = compare_ids(x, cb, "l2", ref, got, "bf16")
    assert bf16["differing"] == 1 and bf16["within_bound"] == 1 and bf16["equal"] == 7 / 8
    assert compare_ids(x, cb, "l2", ref, got, "ieee")["within_bound"] == 0
    got[5] = 6  # a different code altogether is a miss in any precision
    assert compare_ids(x, cb, "l2", ref, got, "bf16")["within_bound"] == 1
    gap = exact_distance(x[5:6], cb[6:7], "l2") - exact_distance(x[5:6], cb[5:6], "l2")
    assert gap.item() > 1.0


def test_markdown_lists_every_precision_and_model():
    res = [{"model": "speech", "metric": "cosine", "end_to_end": {"ids": 10, "fp32": 1.0, "bf16_autocast": 0.9},
            "search": [{"precision": p, "n": 10, "equal": 1.0, "differing": 0, "within_bound": 0,
                        "max_gap_over_bound": 0.0} for p in ("tf32", "ieee", "bf16")]},
           {"model": "video", "end_to_end": {"ids": 4, "fp32": 0.75, "bf16_autocast": 0.5}}]
    md = markdown(res, "test")
    assert md.count("| speech | 10 | cosine |") == 3 and "| video | 4 | 75.00% | 50.00% |" in md
