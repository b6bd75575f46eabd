"""Sounding-object localization maths (train/sol_metrics.py): cIoU, IoU, Otsu + contour boxes, proposal
scores, the CVAT box reader and the drawing helpers, against hand-computed values and cv2."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from train import sol_metrics as sol


# ---------------------------------------------------------------------------------------------
# metrics on hand-made maps and boxes


def test_ciou_hand_computed():
    # ground truth: rows/cols 2..5 (16 px); active map: rows/cols 4..7 (16 px); overlap 4 px
    gt = sol.boxes_mask(np.array([[2, 2, 6, 6]]), (10, 10))
    m = np.zeros((10, 10), np.float32)
    m[4:8, 4:8] = 1.0
    assert gt.sum() == 16
    assert sol.ciou(m, gt, 0.5) == pytest.approx(4 / (16 + 12))
    # values exactly at tau are not active (A = {map > tau})
    m2 = np.where(m > 0, 0.5, 0.0)
    assert sol.ciou(m2, gt, 0.5) == 0.0
    # a map covering the whole ground truth and nothing else -> 1; covering everything -> 16/100
    assert sol.ciou(gt.astype(np.float32), gt, 0.5) == 1.0
    assert sol.ciou(np.ones((10, 10)), gt, 0.5) == pytest.approx(16 / (16 + 84))
    assert math.isnan(sol.ciou(m, np.zeros((10, 10), bool)))


def test_ciou_union_of_two_boxes():
    gt = sol.boxes_mask(np.array([[0, 0, 2, 2], [1, 1, 3, 3]]), (4, 4))  # 4 + 4 - 1 = 7 px
    assert gt.sum() == 7
    m = np.zeros((4, 4))
    m[0, :] = 1.0  # row 0: 4 px, 2 of them in the union
    assert sol.ciou(m, gt, 0.5) == pytest.approx(2 / (7 + 2))


def test_boxes_mask_truncates_like_reference():
    mask = sol.boxes_mask(np.array([[1.7, 0.2, 3.9, 2.5]]), (5, 6))
    expected = np.zeros((5, 6), bool)
    expected[0:2, 1:3] = True  # rows int(0.2)..int(2.5)-1, cols int(1.7)..int(3.9)-1
    np.testing.assert_array_equal(mask, expected)
    # clipped to the frame
    assert sol.boxes_mask(np.array([[-3, -3, 100, 1]]), (4, 4)).sum() == 4


def test_box_iou_hand_computed():
    assert sol.box_iou([0, 0, 4, 4], [2, 2, 6, 6]) == pytest.approx(4 / 28)
    assert sol.box_iou([0, 0, 4, 4], [0, 0, 4, 4]) == 1.0
    assert sol.box_iou([0, 0, 2, 2], [3, 3, 5, 5]) == 0.0
    assert sol.box_iou([0, 0, 10, 10], [0, 0, 5, 10]) == pytest.approx(0.5)
    assert sol.box_iou(None, [0, 0, 1, 1]) == 0.0


def test_summarize_shares_and_means():
    out = sol.summarize([0.2, 0.5, 0.9, 0.49], [0.6, 0.1, 0.5, 0.0])
    assert out["ciou@0.5"] == pytest.approx(0.5)  # 0.5 and 0.9
    assert out["iou@0.5"] == pytest.approx(0.5)  # 0.6 and 0.5
    assert out["mean_ciou"] == pytest.approx((0.2 + 0.5 + 0.9 + 0.49) / 4)
    assert out["mean_iou"] == pytest.approx(1.2 / 4)
    assert out["frames"] == 4


def test_enclosing_box():
    np.testing.assert_array_equal(sol.enclosing_box(np.array([[1, 2, 3, 4], [0, 5, 2, 9]])), [0, 2, 3, 9])
    assert sol.enclosing_box(np.zeros((0, 4))) is None


# ---------------------------------------------------------------------------------------------
# maps -> boxes


def _ellipse(shape, cx, cy, a, b):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0


def _extent(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_otsu_boxes_on_rectangle():
    m = np.zeros((64, 80), np.float32)
    m[10:30, 25:61] = 1.0
    boxes = sol.boxes_from_map(sol.normalize_map(m))
    np.testing.assert_array_equal(boxes, [[25, 10, 61, 30]])


def test_otsu_boxes_on_ellipse_with_background_noise():
    rng = np.random.default_rng(0)
    shape = (60, 70)
    ell = _ellipse(shape, cx=40.0, cy=22.0, a=14.0, b=9.0)
    m = rng.uniform(0.0, 0.3, shape).astype(np.float32) + 0.7 * ell  # object 0.7-1.0, background 0-0.3
    boxes = sol.boxes_from_map(sol.normalize_map(m), floor=0.0)
    np.testing.assert_array_equal(boxes, [_extent(ell)])


def test_otsu_two_shapes_give_two_boxes_and_enclosing():
    m = np.zeros((50, 50), np.float32)
    m[5:15, 5:12] = 1.0
    m[30:45, 20:48] = 0.8
    boxes = sol.boxes_from_map(m, floor=0.0)
    np.testing.assert_array_equal(boxes, [[5, 5, 12, 15], [20, 30, 48, 45]])
    np.testing.assert_array_equal(sol.enclosing_box(boxes), [5, 5, 48, 45])


def test_floor_removes_weak_blob():
    m = np.zeros((40, 40), np.float32)
    m[2:10, 2:10] = 1.0
    m[25:35, 25:35] = 0.4  # below the reference's 0.5 floor
    assert sol.boxes_from_map(m, floor=0.5).tolist() == [[2, 2, 10, 10]]
    assert len(sol.boxes_from_map(m, floor=0.0)) == 2


def test_otsu_and_contours_match_cv2():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for trial in range(6):
        img = (rng.uniform(0, 1, (40, 50)) ** (1 + trial) * 255).astype(np.uint8)
        level, binary = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        assert sol.otsu_threshold(img) == int(level)
        np.testing.assert_array_equal(img > sol.otsu_threshold(img), binary > 0)
    # a ring with a blob in its hole (not an outer contour), a diagonal pair (8-connected), a dot
    mask = np.zeros((40, 40), np.uint8)
    mask[5:20, 5:20] = 1
    mask[8:17, 8:17] = 0
    mask[11:14, 11:14] = 1
    mask[25, 25] = mask[26, 26] = 1
    mask[35, 5] = 1
    mask[22:30, 32:38] = 1
    contours = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[-2]
    expected = sorted(
        [(x, y, x + w, y + h) for x, y, w, h in (cv2.boundingRect(c) for c in contours)], key=lambda b: (b[1], b[0])
    )
    np.testing.assert_array_equal(sol.contour_boxes(mask.astype(bool)), np.asarray(expected, float))


def test_resize_map_matches_cv2_bilinear():
    cv2 = pytest.importorskip("cv2")
    att = np.random.default_rng(2).uniform(0, 1, (8, 8)).astype(np.float32)
    ours = sol.resize_map(att, (64, 96))
    ref = cv2.resize(att, (96, 64), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_normalize_map():
    np.testing.assert_allclose(sol.normalize_map(np.array([[2.0, 4.0], [3.0, 6.0]])), [[0, 0.5], [0.25, 1.0]])
    assert not sol.normalize_map(np.full((3, 3), 7.0)).any()


def test_evaluate_frame_on_exact_block():
    # an 8x8 map with one hot 2x2 block (cells x 2..3, y 4..5) on a 64x64 frame: after bilinear
    # upsampling the thresholded region is centred on the block; gt = that block's pixels
    att = np.zeros((8, 8), np.float32)
    att[4:6, 2:4] = 1.0
    gt = np.array([[16.0, 32.0, 32.0, 48.0]])
    s = sol.evaluate_frame(att, gt, (64, 64), eval_size=None)
    norm = sol.normalize_map(sol.resize_map(att, (64, 64)))
    active = norm > 0.5
    inter = active[32:48, 16:32].sum()
    assert s.ciou == pytest.approx(inter / (256 + active.sum() - inter))
    assert s.ciou > 0.7 and s.iou > 0.7
    # the same frame scored on a 256x256 evaluation frame (boxes scaled) gives about the same
    s256 = sol.evaluate_frame(att, gt, (64, 64), eval_size=256)
    assert s256.iou == pytest.approx(s.iou, abs=0.05)
    np.testing.assert_allclose(s256.gt_box, gt[0] * 4)


def test_score_proposals_and_nms():
    m = np.zeros((20, 20))
    m[2:6, 2:6] = 1.0  # 16
    m[10:12, 10:20] = 0.5  # 10 in total
    props = np.array([[10, 10, 20, 12], [2, 2, 6, 6], [0, 0, 20, 20], [3, 3, 6, 6]], float)
    boxes, scores = sol.score_proposals(m, props)
    np.testing.assert_allclose(scores, [26, 16, 10, 9])
    np.testing.assert_array_equal(boxes[0], [0, 0, 20, 20])
    kept, kept_scores = sol.score_proposals(m, props, nms_iou=0.5)
    # [3,3,6,6] overlaps [2,2,6,6] by IoU 9/16 > 0.5 -> suppressed
    np.testing.assert_allclose(kept_scores, [26, 16, 10])


# ---------------------------------------------------------------------------------------------
# CVAT XML

XML = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta><task><id>1</id><size>{size}</size><mode>interpolation</mode>
    <original_size><width>{w}</width><height>{h}</height></original_size>
  </task><source>vid.mp4</source></meta>
  {tracks}
</annotations>
"""


def _box(frame, x0, y0, x1, y1, outside=0):
    return (f'<box frame="{frame}" outside="{outside}" occluded="0" keyframe="1" '
            f'xtl="{x0}" ytl="{y0}" xbr="{x1}" ybr="{y1}"></box>')


def _write(path: Path, tracks: str, w=480, h=360, size=300) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(XML.format(tracks=tracks, w=w, h=h, size=size))
    return path


def test_read_cvat_xml(tmp_path):
    tracks = (
        '<track id="0" label="sounding object" source="manual">'
        + _box(0, 10.5, 20, 110.25, 220) + _box(1, 11, 21, 111, 221) + _box(2, 12, 22, 112, 222, outside=1)
        + "</track>"
        + '<track id="1" label="sounding object" source="manual">'
        + _box(1, 300, 30, 400, 130) + _box(5, 301, 31, 401, 131)
        + "</track>"
    )
    vb = sol.read_cvat_xml(_write(tmp_path / "abc_DEF-12" / "annotations.xml", tracks))
    assert (vb.video_id, vb.width, vb.height, vb.num_frames) == ("abc_DEF-12", 480, 360, 300)
    assert vb.annotated_frames() == [0, 1, 5]  # frame 2 is outside -> not annotated
    np.testing.assert_allclose(vb.frames[0], [[10.5, 20, 110.25, 220]])
    np.testing.assert_allclose(vb.frames[1], [[11, 21, 111, 221], [300, 30, 400, 130]])
    assert sol.find_box_files(tmp_path) == {"abc_DEF-12": tmp_path / "abc_DEF-12" / "annotations.xml"}


def test_read_cvat_xml_errors_name_the_file(tmp_path):
    bad = tmp_path / "v1" / "annotations.xml"
    bad.parent.mkdir()
    bad.write_text("<annotations><meta>")
    with pytest.raises(sol.BoxFormatError, match="v1/annotations.xml"):
        sol.read_cvat_xml(bad)
    no_size = tmp_path / "v2.xml"
    no_size.write_text("<annotations><meta><task><id>1</id></task></meta></annotations>")
    with pytest.raises(sol.BoxFormatError, match="original_size"):
        sol.read_cvat_xml(no_size)
    inverted = _write(tmp_path / "v3" / "annotations.xml", '<track id="0">' + _box(0, 50, 10, 20, 30) + "</track>")
    with pytest.raises(sol.BoxFormatError, match="xbr < xtl"):
        sol.read_cvat_xml(inverted)
    nan = _write(tmp_path / "v4" / "annotations.xml", '<track id="0">' + _box(0, "abc", 10, 20, 30) + "</track>")
    with pytest.raises(sol.BoxFormatError, match="not a number"):
        sol.read_cvat_xml(nan)
    with pytest.raises(FileNotFoundError, match="sol.boxes_root"):
        sol.find_box_files(tmp_path / "absent")


def test_released_box_files_parse(shared_dir):
    root = shared_dir / "ave" / "boxes"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    files = sol.find_box_files(root)
    assert len(files) >= 400
    annotated = 0
    for vid, path in files.items():
        vb = sol.read_cvat_xml(path)
        assert vb.video_id == vid and vb.width >= 100 and vb.height >= 100
        assert vb.num_frames > 0
        for frame, boxes in vb.frames.items():
            assert 0 <= frame < vb.num_frames, (path, frame)
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all(), (path, frame)
            # CVAT lets a box hang slightly over the border; more than 5 % of the frame would be a unit error
            assert (boxes[:, [0, 2]] >= -0.05 * vb.width).all() and (boxes[:, [0, 2]] <= 1.05 * vb.width).all(), (path, frame)
            assert (boxes[:, [1, 3]] >= -0.05 * vb.height).all() and (boxes[:, [1, 3]] <= 1.05 * vb.height).all(), (path, frame)
        annotated += bool(vb.frames)
    assert annotated >= 300


# ---------------------------------------------------------------------------------------------
# drawing


def test_heatmap_overlay_and_boxes(tmp_path):
    from matplotlib import colormaps, image as mpimg

    frame = np.full((20, 30, 3), 100, np.uint8)
    m = np.zeros((20, 30), np.float32)
    m[5:10, 5:10] = 1.0
    out = sol.heatmap_overlay(frame, m, alpha=0.5, floor=0.5)
    top = np.asarray(colormaps["jet"](1.0)[:3]) * 255
    np.testing.assert_allclose(out[7, 7], np.rint(0.5 * 100 + 0.5 * top), atol=1)
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # below the floor: untouched
    boxed = sol.draw_boxes(frame, np.array([[2, 3, 12, 9]]), (0, 255, 0), thickness=1)
    outline = np.zeros((20, 30), bool)
    outline[3, 2:12] = outline[8, 2:12] = True
    outline[3:9, 2] = outline[3:9, 11] = True
    np.testing.assert_array_equal((boxed == [0, 255, 0]).all(-1), outline)
    path = sol.save_png(tmp_path / "x" / "f.png", boxed)
    back = mpimg.imread(path)
    np.testing.assert_array_equal(np.rint(back[..., :3] * 255).astype(np.uint8), boxed)


# ---------------------------------------------------------------------------------------------
# the centre-box baseline


def test_centre_box_is_half_the_frame_in_its_centre():
    np.testing.assert_allclose(sol.centre_box((100, 200)), [50, 25, 150, 75])
    np.testing.assert_allclose(sol.centre_box((64, 64), 0.25), [24, 24, 40, 40])


def test_centre_box_scores_by_hand():
    # 64 x 64 frame: the centre box covers x, y in 16..48 (1024 pixels)
    gt = np.array([[0.0, 0.0, 24.0, 24.0]])  # 576 pixels, 8 x 8 = 64 of them inside the centre box
    s = sol.evaluate_centre_box(gt, (64, 64), eval_size=None)
    assert s.ciou == pytest.approx(64 / (576 + (1024 - 64)))
    assert s.iou == pytest.approx(64 / (1024 + 576 - 64))
    np.testing.assert_allclose(s.pred_box, [16, 16, 48, 48])
    # a ground truth inside the centre box: every gt pixel hit, the box's other pixels count against it
    inner = np.array([[20.0, 20.0, 44.0, 44.0]])  # 576 pixels
    s = sol.evaluate_centre_box(inner, (64, 64), eval_size=None)
    assert s.ciou == pytest.approx(576 / (576 + 1024 - 576)) and s.iou == pytest.approx(576 / 1024)
    # on the evaluation frame: boxes scaled like the head's (128 x 64 video -> 256 x 256)
    s = sol.evaluate_centre_box(np.array([[32.0, 16.0, 96.0, 48.0]]), (64, 128), eval_size=256)
    assert s.iou == pytest.approx(1.0) and s.ciou == pytest.approx(1.0)
    # a frame at 0.5 counts in cIoU@0.5 / IoU@0.5 like a head's
    summary = sol.summarize([0.5625, 0.0417], [0.5625, 0.0417])
    assert summary["ciou@0.5"] == 0.5
