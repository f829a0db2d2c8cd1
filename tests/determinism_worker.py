"""One process of the CPU-determinism tests (run by tests/test_determinism.py), under the
CPU settings (``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``, ``OMP_NUM_THREADS``) its parent put
in the environment.

Usage:
    python determinism_worker.py search IN OUT   nearest codes of each case in IN (torch.save)
    python determinism_worker.py encode THREADS OUT   the image tokenizer's token file of the bundled photo
"""

from __future__ import annotations

import sys

import torch


def search(path_in: str, path_out: str) -> None:
    from tokenizers_vq.quantizers._functional import nearest_codes_reference  # noqa: PLC0415

    out = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    for name, case in torch.load(path_in, weights_only=True).items():
        for metric in case["metrics"]:
            for block in case["blocks"]:
                out[name, metric, block] = nearest_codes_reference(case["x"], case["codebook"], metric, block)
    torch.save(out, path_out)


def encode(threads: int, path_out: str) -> None:
    torch.set_num_threads(threads)
    from tokenizers_vq import Tokenizer  # noqa: PLC0415
    from tokenizers_vq.media import bundled_photo  # noqa: PLC0415
    from tokenizers_vq.tokens import encode_files  # noqa: PLC0415

    encode_files(Tokenizer.from_pretrained("image").eval(), [bundled_photo()], path_out)


if __name__ == "__main__":
    if sys.argv[1] == "search":
        search(sys.argv[2], sys.argv[3])
    else:
        encode(int(sys.argv[2]), sys.argv[3])
