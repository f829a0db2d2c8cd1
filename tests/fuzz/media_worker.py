"""The media readers in a process of their own, for tests/fuzz/test_fuzz_media.py: a
reader that hangs or allocates without bound is stopped there (by the caller's timeout,
or by the address-space limit set here) instead of taking the test run with it.

Usage: python media_worker.py MEMORY_LIMIT_BYTES
Reads one JSON request per line on stdin, answers one line on stdout, ``@answer `` and JSON:
``{"call": "load_image" | "load_audio" | "load_video" | "load_input" | "modality_of",
"args": [...]}`` or ``{"call": "encode", "argv": [...]}`` (``tvq`` arguments). The
answer is ``{"value": ...}`` (a summary of the result, see :func:`summary`) or
``{"error": type name, "message": ..., "traceback": ...}``.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import traceback

import torch

ANSWER = "@answer "
"""Prefix of an answer line (anything else a library prints to stdout is skipped)."""


def summary(value) -> object:
    """JSON of a reader's result: tensors as shape, dtype, min, max and finiteness."""
    if isinstance(value, torch.Tensor):
        finite = bool(torch.isfinite(value).all()) if value.numel() else True
        lo, hi = (float(value.min()), float(value.max())) if value.numel() and finite else (None, None)
        return {"shape": list(value.shape), "dtype": str(value.dtype), "finite": finite, "min": lo, "max": hi}
    if isinstance(value, (tuple, list)):
        return [summary(v) for v in value]
    if isinstance(value, dict):
        return {str(k): summary(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return "nan"
    return value


def encode(argv: list[str]) -> dict:
    """``tvq`` with ``argv``: its return code, what it printed to stderr, and the
    token file's items when it wrote one."""
    from tokenizers_vq.cli import main  # noqa: PLC0415
    from tokenizers_vq.tokens import load_tokens  # noqa: PLC0415

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    out = {"rc": rc, "stderr": err.getvalue()}
    if rc == 0:
        meta, records = load_tokens(argv[argv.index("-o") + 1])
        out["codebook_size"] = int(meta["codebook_size"])
        out["items"] = [{"codes": summary(r.codes), "size": r.size} for r in records]
    return out


def serve() -> None:
    from tokenizers_vq.media import load_image  # noqa: PLC0415
    from tokenizers_vq.media import load_audio, load_input, load_video, modality_of  # noqa: PLC0415

    readers = {"load_image": load_image, "load_audio": load_audio, "load_video": load_video,
               "load_input": load_input, "modality_of": modality_of}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["call"] == "encode":
                answer = {"value": encode(request["argv"])}
            else:
                answer = {"value": summary(readers[request["call"]](*request["args"]))}
        except Exception as e:  # reported, for the test to judge
            answer = {"error": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
        print(ANSWER + json.dumps(answer), flush=True)


if __name__ == "__main__":
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(1)
    serve()
