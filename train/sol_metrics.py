"""Sounding object localization: maps -> boxes, metrics, the CVAT box reader, drawing.

Pure functions used by the ``sol`` task (``train/tasks/sol_task.py``) and ``avel-train render-sol``.
Everything follows Li, Tian & Xu, "Space-Time Memory Network for Sounding Object Localization in
Videos" (BMVC 2021), sections 3.3 and 4.2, and the public code of that paper
(sizhe-li/Space-Time-Memory-Network-for-Sounding-Object-Localization-in-Videos, ``sol/models``):

- **localization** (section 3.3): the attention map [h, w] is resized bilinearly to the evaluation
  frame, min-max normalised to [0, 1]; values below ``floor`` (reference code: 0.5) are zeroed;
  the map is quantised to uint8 (``x * 255``), thresholded by Otsu's method, and the bounding
  rectangles of the outer contours (8-connected components, holes filled) are the boxes. The
  reference scores one box per frame: the rectangle enclosing all contours (:func:`enclosing_box`).
- **cIoU** (section 4.2, Senocak et al.): with the ground-truth mask ``g`` (union of the frame's
  boxes) and ``A = {i: map_i > tau}``, ``cIoU = sum_{i in A} g_i / (sum_i g_i + |A - G|)``.
- **box IoU**: IoU of the predicted enclosing box and the ground-truth enclosing box (the
  reference merges a frame's boxes into one), continuous coordinates (no "+1" pixel rule).
- **cIoU@0.5 / IoU@0.5**: the share of annotated frames whose cIoU / IoU is at least 0.5.

Coordinates are ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive (a box covering pixel
columns 2..4 is ``(2, 0, 5, ...)``), which is also how CVAT's ``xtl, ytl, xbr, ybr`` are read.

Imports numpy and scipy at module level; torch (resizing), matplotlib (drawing) inside functions.
No cv2: the tests compare against it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "VideoBoxes",
    "BoxFormatError",
    "read_cvat_xml",
    "find_box_files",
    "resize_map",
    "normalize_map",
    "otsu_threshold",
    "contour_boxes",
    "boxes_from_map",
    "enclosing_box",
    "box_iou",
    "boxes_mask",
    "ciou",
    "score_proposals",
    "FrameScore",
    "evaluate_frame",
    "CENTRE_BOX_FRACTION",
    "centre_box",
    "evaluate_centre_box",
    "summarize",
    "heatmap_overlay",
    "draw_boxes",
    "save_png",
    "scale_boxes",
    "frame_boxes",
    "frame_title",
    "frame_figure",
]


# ---------------------------------------------------------------------------------------------
# ground truth: CVAT 1.1 XML


class BoxFormatError(ValueError):
    """A box annotation file is not CVAT 1.1 XML as expected; the message names the file."""


@dataclasses.dataclass
class VideoBoxes:
    """Boxes of one video from a CVAT XML file.

    ``frames`` maps a frame number (0-based, decoder order of the original video) to an
    [N, 4] float64 array of the visible boxes (``outside="0"``) of that frame, in pixels of the
    original video (``width`` x ``height``). Frames without a visible box are absent.
    """

    video_id: str
    width: int
    height: int
    num_frames: int
    frames: dict[int, np.ndarray]
    source: Path | None = None

    def annotated_frames(self) -> list[int]:
        return sorted(self.frames)


def _text(node: ET.Element, path: str, source: Path | str) -> str:
    found = node.find(path)
    if found is None or found.text is None or not found.text.strip():
        raise BoxFormatError(f"{source}: missing <{path}> (expected CVAT 1.1 XML with meta/task/{path.split('/')[-1]})")
    return found.text.strip()


def _float_attr(box: ET.Element, name: str, source: Path | str) -> float:
    raw = box.get(name)
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BoxFormatError(f"{source}: <box frame={box.get('frame')}> has {name}={raw!r}, not a number") from None
    if not math.isfinite(value):
        raise BoxFormatError(f"{source}: <box frame={box.get('frame')}> has non-finite {name}={raw!r}")
    return value


def read_cvat_xml(path: str | Path, video_id: str | None = None) -> VideoBoxes:
    """Read one CVAT 1.1 "interpolation" XML file (``<track>``s of ``<box>``es).

    ``video_id`` defaults to the name of the folder holding the file (the layout of the released
    annotations: ``<root>/<video_id>/annotations.xml``). Boxes with ``outside="1"`` (the object
    has left the frame) are skipped. Raises :class:`BoxFormatError` naming the file for anything
    malformed: unreadable XML, no ``<original_size>``, non-numeric or inverted coordinates.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise BoxFormatError(f"{path}: not readable as XML ({exc})") from None
    if root.tag != "annotations":
        raise BoxFormatError(f"{path}: root element is <{root.tag}>, expected <annotations> (CVAT 1.1 XML)")
    try:
        width = int(_text(root, "meta/task/original_size/width", path))
        height = int(_text(root, "meta/task/original_size/height", path))
    except ValueError:
        raise BoxFormatError(f"{path}: <original_size> width/height are not integers") from None
    if width <= 0 or height <= 0:
        raise BoxFormatError(f"{path}: <original_size> is {width}x{height}")
    size_node = root.find("meta/task/size")
    num_frames = int(size_node.text) if size_node is not None and (size_node.text or "").strip().isdigit() else 0
    frames: dict[int, list[tuple[float, float, float, float]]] = {}
    for track in root.iter("track"):
        for box in track.iter("box"):
            if box.get("outside", "0").strip() == "1":
                continue
            try:
                frame = int(box.get("frame", ""))
            except ValueError:
                raise BoxFormatError(f"{path}: <box> with frame={box.get('frame')!r}, not an integer") from None
            coords = tuple(_float_attr(box, k, path) for k in ("xtl", "ytl", "xbr", "ybr"))
            if coords[2] < coords[0] or coords[3] < coords[1]:
                raise BoxFormatError(f"{path}: <box frame={frame}> has xbr < xtl or ybr < ytl: {coords}")
            frames.setdefault(frame, []).append(coords)  # type: ignore[arg-type]
    return VideoBoxes(
        video_id=video_id or path.parent.name,
        width=width,
        height=height,
        num_frames=num_frames,
        frames={k: np.asarray(v, dtype=np.float64) for k, v in sorted(frames.items())},
        source=path,
    )


def find_box_files(root: str | Path) -> dict[str, Path]:
    """``video_id -> annotations.xml`` for every ``<root>/**/<video_id>/annotations.xml``.

    Also accepts flat ``<root>/<video_id>.xml`` files. Raises FileNotFoundError naming ``root``
    when it does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: no box annotation folder there (set sol.boxes_root to the folder of "
            "<video_id>/annotations.xml files, e.g. the AVE boxes of the STM paper)"
        )
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.xml")):
        vid = path.parent.name if path.name == "annotations.xml" else path.stem
        if vid in out:
            raise BoxFormatError(f"{root}: two annotation files for video {vid!r}: {out[vid]} and {path}")
        out[vid] = path
    return out


# ---------------------------------------------------------------------------------------------
# maps -> boxes


def resize_map(att: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a map [h, w] to ``size`` = (H, W), float32 (half-pixel centres, the
    convention of ``cv2.resize`` and ``F.interpolate(align_corners=False)``)."""
    import torch
    from torch.nn import functional as F

    att = np.asarray(att, dtype=np.float32)
    if att.ndim != 2:
        raise ValueError(f"resize_map expects a 2-D map, got shape {att.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(att))[None, None]
    out = F.interpolate(tensor, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def normalize_map(att: np.ndarray) -> np.ndarray:
    """Min-max normalisation to [0, 1] (float32); a constant map becomes all zeros."""
    att = np.asarray(att, dtype=np.float32)
    lo, hi = float(att.min()), float(att.max())
    if not hi > lo:
        return np.zeros_like(att)
    return (att - lo) / (hi - lo)


def otsu_threshold(image: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image (as ``cv2.threshold(..., THRESH_OTSU)``): the level t
    maximising the between-class variance of {<= t} and {> t}; the first maximum wins; 0 when
    all pixels are equal."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"otsu_threshold expects uint8, got {image.dtype}")
    hist = np.bincount(image.reshape(-1), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    levels = np.arange(256, dtype=np.float64)
    omega = np.cumsum(p)
    mu = np.cumsum(p * levels)
    mu_total = mu[-1]
    eps = np.finfo(np.float32).eps
    valid = (omega >= eps) & (omega <= 1.0 - eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = (mu_total * omega - mu) ** 2 / (omega * (1.0 - omega))
    sigma = np.where(valid, sigma, -1.0)
    if not valid.any():
        return 0
    return int(np.argmax(sigma))


def contour_boxes(mask: np.ndarray) -> np.ndarray:
    """Bounding rectangles of the outer contours of a binary mask [H, W] -> [N, 4] float64
    ``(x0, y0, x1, y1)``, exclusive ends, sorted by (y0, x0).

    Equivalent to ``cv2.findContours(RETR_EXTERNAL)`` + ``cv2.boundingRect``: foreground is
    8-connected, and components lying inside a hole of another component are not outer contours
    (holes are filled first).
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros((0, 4), dtype=np.float64)
    filled = ndimage.binary_fill_holes(mask)  # background 4-connected = complement of 8-connected foreground
    labels, count = ndimage.label(filled, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for sl in ndimage.find_objects(labels)[:count]:
        if sl is None:
            continue
        ys, xs = sl
        boxes.append((xs.start, ys.start, xs.stop, ys.stop))
    boxes.sort(key=lambda b: (b[1], b[0]))
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def boxes_from_map(norm_map: np.ndarray, floor: float = 0.5) -> np.ndarray:
    """Boxes of a normalised map [H, W] (values in [0, 1]) -> [N, 4] (section 3.3).

    Values below ``floor`` are zeroed (the reference ``find_bbox_in_heatmap`` uses 0.5; 0 turns
    it off), the map is quantised to uint8 (``uint8(x * 255)``), Otsu-thresholded (foreground =
    above the threshold) and the outer contours' rectangles are returned.
    """
    m = np.array(norm_map, dtype=np.float32, copy=True)
    if m.ndim != 2:
        raise ValueError(f"boxes_from_map expects a 2-D map, got shape {m.shape}")
    m[m < floor] = 0.0
    gray = (np.clip(m, 0.0, 1.0) * 255).astype(np.uint8)
    level = otsu_threshold(gray)
    return contour_boxes(gray > level)


def enclosing_box(boxes: np.ndarray) -> np.ndarray | None:
    """The rectangle enclosing all boxes [N, 4] -> [4], or None when N = 0."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return None
    return np.array([boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()])


def box_iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """IoU of two boxes ``(x0, y0, x1, y1)`` (continuous areas); 0 if either is None or empty."""
    if a is None or b is None:
        return 0.0
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def boxes_mask(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Union of boxes as a bool mask of ``size`` = (H, W); pixel rows ``int(y0) .. int(y1) - 1``
    and columns ``int(x0) .. int(x1) - 1`` (the reference's rasterisation), clipped to the frame."""
    H, W = int(size[0]), int(size[1])
    mask = np.zeros((H, W), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0, r0 = max(0, int(x0)), max(0, int(y0))
        c1, r1 = min(W, int(x1)), min(H, int(y1))
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def ciou(norm_map: np.ndarray, gt_mask: np.ndarray, tau: float = 0.5) -> float:
    """Consensus IoU (section 4.2): ``sum_{A} g / (sum g + |A - G|)`` with ``A = {map > tau}``.

    NaN when the ground truth is empty (such a frame is not an annotated frame)."""
    norm_map = np.asarray(norm_map)
    gt = np.asarray(gt_mask, dtype=bool)
    if norm_map.shape != gt.shape:
        raise ValueError(f"ciou: map {norm_map.shape} and ground truth {gt.shape} differ in shape")
    active = norm_map > tau
    total = int(gt.sum())
    if total == 0:
        return float("nan")
    return float((active & gt).sum()) / float(total + (active & ~gt).sum())


def score_proposals(norm_map: np.ndarray, proposals: np.ndarray, nms_iou: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Score proposal boxes [N, 4] (pixels of the map's frame) by the map (section 3.3):
    ``S_n = sum_{ij} m_n(i, j) * map(i, j)`` with ``m_n`` the box's binary mask.

    Returns ``(boxes, scores)`` sorted by decreasing score; with ``nms_iou`` set, boxes overlapping
    a better one by more than that IoU are removed (non-maximum suppression).
    """
    norm_map = np.asarray(norm_map, dtype=np.float64)
    proposals = np.asarray(proposals, dtype=np.float64).reshape(-1, 4)
    # integral image: the sum over any rectangle in O(1)
    integral = np.zeros((norm_map.shape[0] + 1, norm_map.shape[1] + 1))
    integral[1:, 1:] = norm_map.cumsum(0).cumsum(1)
    H, W = norm_map.shape
    scores = np.empty(len(proposals))
    for n, (x0, y0, x1, y1) in enumerate(proposals):
        c0, r0 = min(max(0, int(x0)), W), min(max(0, int(y0)), H)
        c1, r1 = min(max(c0, int(x1)), W), min(max(r0, int(y1)), H)
        scores[n] = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    order = np.argsort(-scores, kind="stable")
    boxes, scores = proposals[order], scores[order]
    if nms_iou is not None:
        keep: list[int] = []
        for i in range(len(boxes)):
            if all(box_iou(boxes[i], boxes[j]) <= nms_iou for j in keep):
                keep.append(i)
        boxes, scores = boxes[keep], scores[keep]
    return boxes, scores


# ---------------------------------------------------------------------------------------------
# one frame, and a whole evaluation


@dataclasses.dataclass
class FrameScore:
    """Scores of one annotated frame (boxes in the evaluation frame's pixels)."""

    ciou: float
    iou: float
    pred_box: np.ndarray | None
    gt_box: np.ndarray


def evaluation_frame(frame_size, gt_boxes, eval_size, caller: str) -> tuple[int, int, np.ndarray]:
    """(H, W, ground-truth boxes [K, 4]) of the frame a score is computed on: the original frame,
    or ``eval_size`` x ``eval_size`` with the boxes scaled to it; at least one box is required."""
    H, W = int(frame_size[0]), int(frame_size[1])
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if gt_boxes.shape[0] == 0:
        raise ValueError(f"{caller} needs at least one ground-truth box")
    if eval_size:
        gt_boxes = gt_boxes * np.array([eval_size / W, eval_size / H, eval_size / W, eval_size / H])
        H = W = int(eval_size)
    return H, W, gt_boxes


def evaluate_frame(
    att: np.ndarray,
    gt_boxes: np.ndarray,
    frame_size: tuple[int, int],
    eval_size: int | None = 256,
    tau: float = 0.5,
    floor: float = 0.5,
) -> FrameScore:
    """Score one frame's attention map against its ground-truth boxes.

    Args:
        att: [h, w] attention map (any scale; e.g. the head's 8x8 softmax map).
        gt_boxes: [N, 4] boxes in original-video pixels (N >= 1).
        frame_size: (H, W) of the original video.
        eval_size: evaluate on an ``eval_size`` x ``eval_size`` frame with the boxes scaled to it
            (the paper: 256); None = the original frame size.
        tau: cIoU map threshold; floor: pre-Otsu floor, see :func:`boxes_from_map`.
    """
    H, W, gt_boxes = evaluation_frame(frame_size, gt_boxes, eval_size, "evaluate_frame")
    norm = normalize_map(resize_map(att, (H, W)))
    pred = enclosing_box(boxes_from_map(norm, floor))
    gt_box = enclosing_box(gt_boxes)
    return FrameScore(
        ciou=ciou(norm, boxes_mask(gt_boxes, (H, W)), tau),
        iou=box_iou(pred, gt_box),
        pred_box=pred,
        gt_box=gt_box,  # type: ignore[arg-type]
    )


#: the centre-box baseline's box: this share of the frame's width and of its height, centred
#: (0.5: a box of a quarter of the frame's area, from W/4 to 3W/4 and H/4 to 3H/4)
CENTRE_BOX_FRACTION = 0.5


def centre_box(size: tuple[int, int], fraction: float = CENTRE_BOX_FRACTION) -> np.ndarray:
    """The box ``fraction`` of the width and height of a (H, W) frame, centred: ``(x0, y0, x1, y1)``."""
    H, W = float(size[0]), float(size[1])
    w, h = fraction * W, fraction * H
    return np.array([(W - w) / 2, (H - h) / 2, (W + w) / 2, (H + h) / 2])


def evaluate_centre_box(
    gt_boxes: np.ndarray,
    frame_size: tuple[int, int],
    eval_size: int | None = 256,
    tau: float = 0.5,
    fraction: float = CENTRE_BOX_FRACTION,
) -> FrameScore:
    """The trivial baseline of one frame: predict :func:`centre_box` whatever the frame shows,
    scored as :func:`evaluate_frame` scores a head (same evaluation frame and boxes): the map is 1
    inside the box and 0 outside (cIoU's ``A`` = the box's pixels), the predicted box is the box."""
    H, W, gt_boxes = evaluation_frame(frame_size, gt_boxes, eval_size, "evaluate_centre_box")
    box = centre_box((H, W), fraction)
    norm = boxes_mask(box, (H, W)).astype(np.float32)
    gt_box = enclosing_box(gt_boxes)
    return FrameScore(ciou=ciou(norm, boxes_mask(gt_boxes, (H, W)), tau), iou=box_iou(box, gt_box), pred_box=box,
                      gt_box=gt_box)  # type: ignore[arg-type]


def summarize(cious: Iterable[float], ious: Iterable[float], threshold: float = 0.5) -> dict[str, float]:
    """``ciou@0.5`` / ``iou@0.5``: share of frames with cIoU / IoU >= ``threshold``; plus means and
    the frame count. Fractions in [0, 1] (the paper prints percentages)."""
    c = np.asarray(list(cious), dtype=np.float64)
    i = np.asarray(list(ious), dtype=np.float64)
    if c.shape != i.shape:
        raise ValueError("summarize: cious and ious differ in length")
    tag = f"{threshold:g}"
    if c.size == 0:
        return {f"ciou@{tag}": float("nan"), f"iou@{tag}": float("nan"), "mean_ciou": float("nan"), "mean_iou": float("nan"), "frames": 0}
    return {
        f"ciou@{tag}": float((c >= threshold).mean()),
        f"iou@{tag}": float((i >= threshold).mean()),
        "mean_ciou": float(c.mean()),
        "mean_iou": float(i.mean()),
        "frames": int(c.size),
    }


# ---------------------------------------------------------------------------------------------
# drawing


def heatmap_overlay(frame: np.ndarray, norm_map: np.ndarray, alpha: float = 0.5, floor: float = 0.0) -> np.ndarray:
    """Blend a jet-coloured map [H, W] in [0, 1] over an RGB frame [H, W, 3] uint8 -> uint8.

    Pixels whose map value is below ``floor`` keep the frame's colour."""
    from matplotlib import colormaps

    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[:2] != np.shape(norm_map):
        raise ValueError(f"heatmap_overlay: frame {frame.shape} and map {np.shape(norm_map)} do not match")
    m = np.clip(np.asarray(norm_map, dtype=np.float32), 0.0, 1.0)
    colour = colormaps["jet"](m)[..., :3].astype(np.float32) * 255.0
    weight = (alpha * (m >= floor)).astype(np.float32)[..., None]
    out = frame.astype(np.float32) * (1.0 - weight) + colour * weight
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def draw_boxes(image: np.ndarray, boxes: np.ndarray, color: tuple[int, int, int], thickness: int = 2) -> np.ndarray:
    """Draw rectangle outlines (boxes [N, 4], exclusive ends) on a copy of an RGB image."""
    out = np.array(image, dtype=np.uint8, copy=True)
    H, W = out.shape[:2]
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0, r0 = int(np.clip(np.floor(x0), 0, W - 1)), int(np.clip(np.floor(y0), 0, H - 1))
        c1, r1 = int(np.clip(np.ceil(x1) - 1, 0, W - 1)), int(np.clip(np.ceil(y1) - 1, 0, H - 1))
        t = max(1, int(thickness))
        out[r0:min(r0 + t, r1 + 1), c0:c1 + 1] = color
        out[max(r1 - t + 1, r0):r1 + 1, c0:c1 + 1] = color
        out[r0:r1 + 1, c0:min(c0 + t, c1 + 1)] = color
        out[r0:r1 + 1, max(c1 - t + 1, c0):c1 + 1] = color
    return out


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG (creating the folder)."""
    from matplotlib import image as mpimg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(path, np.asarray(image, dtype=np.uint8), format="png")
    return path


def scale_boxes(boxes: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Rescale boxes [N, 4] from a (H, W) frame to another (H', W')."""
    sy = to_size[0] / from_size[0]
    sx = to_size[1] / from_size[1]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])


def frame_boxes(videos: Mapping[str, VideoBoxes], video_id: str, frame: int) -> np.ndarray | None:
    """The visible boxes of ``frame`` of ``video_id`` [N, 4], or None if it is not annotated."""
    v = videos.get(video_id)
    return None if v is None else v.frames.get(int(frame))


def frame_title(video: str, second: int, frame: int, true_class: str | None, predicted: str, score: float,
                ciou_value: float | None = None, iou_value: float | None = None) -> str:
    """Two-line title of a rendered frame: video, second and frame number; the true class of
    the second, the head's predicted class and its softmax score; cIoU / IoU when annotated."""
    first = f"{video}  second {second}  (frame {frame})"
    second_line = f"class: {true_class if true_class is not None else '?'}  |  predicted: {predicted} (score {score:.2f})"
    if ciou_value is not None and iou_value is not None:
        second_line += f"  |  cIoU {ciou_value:.2f}, IoU {iou_value:.2f}"
    return f"{first}\n{second_line}"


#: colours (RGB, 0-1) of the rendered boxes
PRED_COLOUR = (0.0, 0.85, 0.0)
GT_COLOUR = (1.0, 0.1, 0.1)


def frame_figure(image: np.ndarray, pred_boxes: np.ndarray, gt_boxes: np.ndarray | None, title: str,
                 width_px: int = 560):
    """A readable figure of one rendered frame: ``image`` (the frame with its heat-map overlay,
    RGB uint8 [H, W, 3]) scaled to about ``width_px`` pixels, the predicted boxes (green) and the
    ground-truth boxes (red) as outlines, the title, a legend and a colour bar of the map
    (jet, 0-1). Returns the matplotlib figure (save it at dpi 100)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    H, W = np.asarray(image).shape[:2]
    inches = width_px / 100
    fig, ax = plt.subplots(figsize=(inches, inches * H / W + 1.4))
    ax.imshow(image, interpolation="nearest")
    for boxes, colour, style in ((pred_boxes, PRED_COLOUR, "-"), (gt_boxes, GT_COLOUR, "--")):
        if boxes is None:
            continue
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                                   linewidth=2.5, linestyle=style))
    handles = [Line2D([], [], color=PRED_COLOUR, linewidth=2.5, label="prediction (Otsu boxes of the map)"),
               Line2D([], [], color=GT_COLOUR, linewidth=2.5, linestyle="--",
                      label="ground truth" if gt_boxes is not None else "ground truth (frame not annotated)")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), ax=ax, fraction=0.046, pad=0.02, label="sounding-object map")
    fig.tight_layout()
    return fig
