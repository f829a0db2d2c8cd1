"""Two versions of the top-k search kernel timed in one process on the same inputs (CUDA
graphs, ``triton.testing.do_bench_cudagraph``), with their ids compared.

    git show REV:kernels/topk.py > .devdata/topk_ab/topk_before.py; cp kernels/topk.py .devdata/topk_ab/topk_after.py
    device run, carry [.devdata/topk_ab, .whl]:  python3 eval/gpu/topk_ab.py .devdata/topk_ab/topk_before.py .devdata/topk_ab/topk_after.py
"""
import importlib.util
import json
import sys

import torch
import triton


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(f"tokenizers_vq.kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(before: str, after: str) -> None:
    mods = {"before": load(before, "topk_before"), "after": load(after, "topk_after")}
    for n, kc, d, k in ((32768, 1024, 8, 4), (32768, 1024, 32, 4), (32768, 4096, 32, 8), (4096, 16384, 64, 4),
                        (256, 65536, 32, 4)):
        x, c = torch.randn(1, n, d, device="cuda"), torch.randn(1, kc, d, device="cuda")
        row = {"N": n, "K": kc, "d": d, "k": k}
        ids = {}
        for name, m in mods.items():
            def call(m=m):
                return m.nearest_topk(x, c, k, False, "tf32", True, None)
            ids[name] = call()[1].clone()
            torch.cuda.synchronize()
            row[f"{name}_ms"] = triton.testing.do_bench_cudagraph(call)
        row["same_ids"] = torch.equal(ids["before"], ids["after"])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
