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


def test_table_ranks_timed_launches_and_skips_failed_ones():
    tile = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2, "HALF": False}
    base = {"n": 32768, "k": 1024, "d": 256, "layout": "norminit", "split": None, "differ": 0}
    rows = [{**base, "tile": None, "ms": 0.09}, {**base, "tile": tile, "ms": 0.06},
            {**base, "tile": {**tile, "num_stages": 4}, "error": "OutOfResources: shared memory"},
            {**base, "tile": {**tile, "BLOCK_K": 32}, "ms": float("nan")}]
    lines = tile_sweep._table(rows, top=8).splitlines()[2:]
    assert len(lines) == 2 and "autotuned" in lines[0] and "| 0.0600 | 1.50x |" in lines[1]
