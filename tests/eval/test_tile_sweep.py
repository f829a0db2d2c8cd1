"""The packed kernel's tile sweep (a GPU benchmark): what it would launch, checked on the CPU."""

import pytest
import torch

pytest.importorskip("triton")

from tokenizers_vq.eval.benchmarks import tile_sweep  # noqa: E402


def test_grid_fits_shared_memory_and_covers_the_default_tiles():
    from tokenizers_vq.kernels import packed  # noqa: PLC0415

    for width, wide in ((256 + 16, True), (256, True), (64, False), (48, False)):
        grid = tile_sweep.tiles(width)
        assert grid and all((t["BLOCK_N"] + t["BLOCK_K"] * t["num_stages"]) * width * 2 <= tile_sweep.SMEM for t in grid)
        keys = {tuple(sorted(t.items())) for t in grid}
        for t in packed.tile_set(wide)[:-1]:  # the autotuner's set and the fixed tile; not the interpreter's
            t = {"HALF": False, **t}
            if (t["BLOCK_N"] + t["BLOCK_K"] * t["num_stages"]) * width * 2 <= tile_sweep.SMEM:
                assert tuple(sorted(t.items())) in keys, (width, t)


def test_tasks_cover_each_layout_and_split():
    cases = [(32768, 1024, 256), (32768, 16384, 32)]
    tasks = tile_sweep.tasks(cases, {(32768, 1024, 256): (None, 2)})
    seen = {(case, name, split) for case, name, split, _ in tasks}
    assert seen == {(cases[0], n, s) for n in ("ext", "norminit") for s in (None, 2)} | \
        {(cases[1], n, None) for n in ("ext", "norminit", "padup")}
    assert all(sum(1 for t in tasks if t[:3] == key and t[3] is None) == 1 for key in seen)  # one autotuned launch each
    wide = tile_sweep.layouts(256)
    assert wide["norminit"].norm_init_min_block_d == 0 and wide["ext"].norm_init_min_block_d > 256
    assert tile_sweep.layouts(32)["padup"].pad_up_max_d[torch.bfloat16] >= 32
