"""The frame-time rule (extract/frames.py) against brute force and hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest

from extract.core.frames import default_frame_duration, nearest_frame_indices, segment_frame_times


def brute_force_nearest(pts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """For each time: among frames at minimal |pts - t|, the earliest pts, then the first in decoder order."""
    order = np.arange(pts.size)
    out = [np.lexsort((order, pts, np.abs(t - pts)))[0] for t in times.reshape(-1)]
    return np.array(out, dtype=np.int64).reshape(times.shape)


def test_segment_frame_times_hand_values():
    times = segment_frame_times(2, 4)
    np.testing.assert_array_equal(times, [[0.125, 0.375, 0.625, 0.875], [1.125, 1.375, 1.625, 1.875]])
    shifted = segment_frame_times(3, 2, start=10.0, segment_seconds=0.5)
    np.testing.assert_allclose(shifted, [[10.125, 10.375], [10.625, 10.875], [11.125, 11.375]])
    assert segment_frame_times(10, 16).shape == (10, 16)


@pytest.mark.parametrize("fps", [981 / 50, 30000 / 1001, 10.0, 25.0, 60.0])
def test_nearest_matches_brute_force_for_frame_rates(fps):
    rng = np.random.default_rng(int(fps * 100))
    duration = 9.3
    pts = np.arange(int(duration * fps)) / fps
    # container time bases quantise pts (here 1/1000 s), like real streams
    pts = np.round(pts * 1000) / 1000
    times = segment_frame_times(10, 16)
    index, valid = nearest_frame_indices(pts, times)
    np.testing.assert_array_equal(index, brute_force_nearest(pts, times))
    step = np.median(np.diff(pts))
    np.testing.assert_array_equal(valid, times < pts[-1] + step)
    # the same frames are chosen whatever order the decoder delivered them in
    perm = rng.permutation(pts.size)
    index_perm, valid_perm = nearest_frame_indices(pts[perm], times)
    np.testing.assert_array_equal(perm[index_perm], index)
    np.testing.assert_array_equal(valid_perm, valid)
    # random query times (including outside the stream) agree with brute force too
    random_times = rng.uniform(-0.5, duration + 1.0, size=200)
    np.testing.assert_array_equal(nearest_frame_indices(pts[perm], random_times)[0], brute_force_nearest(pts[perm], random_times))


def test_more_frames_than_requested_picks_distinct_increasing_frames():
    pts = np.arange(300) / (30000 / 1001)
    index, _ = nearest_frame_indices(pts, segment_frame_times(10, 16))
    assert np.all(np.diff(pts[index.reshape(-1)]) > 0)


def test_ties_go_to_the_earlier_frame():
    pts = np.array([0.0, 0.25, 0.5])
    index, valid = nearest_frame_indices(pts, np.array([0.125, 0.375, 0.126, 0.374]))
    np.testing.assert_array_equal(index, [0, 1, 1, 1])
    assert valid.all()


def test_beyond_the_end_and_before_the_start():
    pts = np.array([1.0, 1.25, 1.5])  # default duration 0.25
    index, valid = nearest_frame_indices(pts, np.array([0.70, 0.76, 1.74, 1.75, 3.0]))
    np.testing.assert_array_equal(index, [0, 0, 2, 2, 2])
    np.testing.assert_array_equal(valid, [False, True, True, False, False])
    # an explicit frame duration overrides the median step
    _, valid = nearest_frame_indices(pts, np.array([1.74, 1.9]), frame_duration=0.5)
    np.testing.assert_array_equal(valid, [True, True])


def test_unsorted_pts_index_into_decoder_order():
    pts = np.array([0.5, 0.0, 0.25, 0.75])  # B-frame style order
    index, valid = nearest_frame_indices(pts, np.array([[0.1, 0.3], [0.6, 0.9]]))
    np.testing.assert_array_equal(index, [[1, 2], [0, 3]])
    assert valid.all()
    assert default_frame_duration(pts) == 0.25


def test_duplicate_pts_resolve_to_first_in_decoder_order():
    pts = np.array([0.0, 0.25, 0.25, 0.5])
    index, _ = nearest_frame_indices(pts, np.array([0.3, 0.2]))
    np.testing.assert_array_equal(index, [1, 1])


def test_no_frames_and_single_frame():
    index, valid = nearest_frame_indices(np.array([]), np.array([0.5, 1.5]))
    np.testing.assert_array_equal(index, [-1, -1])
    assert not valid.any()
    index, valid = nearest_frame_indices(np.array([0.0]), np.array([0.0, 0.05]), frame_duration=0.1)
    np.testing.assert_array_equal(index, [0, 0])
    np.testing.assert_array_equal(valid, [True, True])
    _, valid = nearest_frame_indices(np.array([0.0]), np.array([0.05]))  # duration unknown -> 0
    assert not valid.any()
