"""The pure parts of train/predict.py: windows, events, ids, video lists, attention layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.predict import (MIN_LAST_SECOND, PredictError, collect_videos, merge_events, read_video_list,
                           spatial_attention, video_ids, window_key, window_starts)


def test_windows_cover_the_video_in_T_second_steps():
    assert window_starts(10.0, 10) == [0]
    assert window_starts(10.064, 10) == [0]  # a few ms of trailing audio are no second
    assert window_starts(35.0, 10) == [0, 10, 20, 30]
    assert window_starts(30.0 + MIN_LAST_SECOND + 0.01, 10) == [0, 10, 20, 30]
    assert window_starts(0.4, 10) == [0]
    assert window_key("clip", 20, 10) == "clip@20+10"


def test_events_merge_runs_of_valid_event_seconds():
    names = ["dog", "car", "background"]
    labels = ["background", "dog", "dog", "car", "car", "car", "background", "dog", "dog"]
    probs = np.full((9, 3), 0.1)
    probs[1:3, 0] = [0.6, 0.8]
    probs[3:6, 1] = [0.5, 0.7, 0.9]
    probs[7:9, 0] = [0.9, 0.9]
    valid = np.ones(9, bool)
    valid[8] = False  # an invalid second ends an event
    events = merge_events(labels, probs, valid, names, "background")
    assert [(e.onset, e.offset, e.label) for e in events] == [(1, 3, "dog"), (3, 6, "car"), (7, 8, "dog")]
    assert events[0].mean_probability == pytest.approx(0.7)
    assert events[1].mean_probability == pytest.approx(0.7)


def test_ids_are_unique_and_lists_resolve_relative_paths(tmp_path):
    from pathlib import Path

    assert video_ids([Path("a/x.mp4"), Path("b/x.mp4"), Path("c/y.mkv"), Path("d/x.avi")]) == ["x", "x-2", "y", "x-3"]
    (tmp_path / "vids").mkdir()
    for name in ("b.mp4", "a.mov", "notes.txt"):
        (tmp_path / "vids" / name).write_bytes(b"x")
    assert [p.name for p in collect_videos([tmp_path / "vids"])] == ["a.mov", "b.mp4"]
    (tmp_path / "list.txt").write_text("# my clips\nvids/a.mov\n/abs/c.mp4\n")
    assert read_video_list(tmp_path / "list.txt") == [tmp_path / "vids" / "a.mov", Path("/abs/c.mp4")]
    (tmp_path / "m.csv").write_text("sample_id,path,video_id\ns1,b.mp4,b\n")
    assert read_video_list(tmp_path / "m.csv", tmp_path / "vids") == [tmp_path / "vids" / "b.mp4"]
    with pytest.raises(PredictError, match="no videos"):
        collect_videos([])


def test_spatial_attention_of_every_extras_layout():
    flat = torch.arange(2 * 3 * 49, dtype=torch.float32).reshape(2, 3, 49)
    assert torch.equal(spatial_attention({"attention": flat}), flat.reshape(2, 3, 7, 7))
    assert torch.equal(spatial_attention({"spatial_attention": flat.reshape(2, 3, 7, 7)}), flat.reshape(2, 3, 7, 7))
    assert spatial_attention({"is_event_scores": torch.zeros(2, 3)}) is None
    assert spatial_attention({"attention": torch.zeros(2, 3, 50)}) is None  # not a square map
