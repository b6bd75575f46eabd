"""``avel-train render-sol``: a run's sounding-object maps drawn over the frames they were computed from (PNG).

A command of the join floor (it decodes frames with stage 1 and runs a stage-2 head), added to
``avel-train`` as a plugin command (entry point ``avel.commands: render-sol =
train.predict.render:command``). It works from any folder: the store, the splits' manifests, the
video root, the box folder and every setting come from the run itself
(:func:`train.runs.run_pipeline`: its config.yaml, relative paths resolved against the folder the
training started from), unless ``--config`` names another pipeline or an option overrides one.

The head's per-frame outputs come from the run's task through the registry
(:meth:`train.tasks.base.Task.frame_outputs`; a task without per-frame maps is refused), and the
frames from stage 1's decoder (:func:`extract.decode.picture_frames`, by the decoder-order frame
index the store recorded for each sampled frame), so each picture is the frame its map belongs to.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import click
import numpy as np

log = logging.getLogger(__name__)

__all__ = ["command", "render_videos", "find_sample"]


def find_sample(pipeline, video_id: str, video_root: str | None = None):
    """``(video file, sample, manifest)`` of ``video_id`` (a video id or store key) from the
    configured splits' manifests (path column, relative to ``video_root`` or the split's
    ``video_root``, else the manifest's folder)."""
    from extract.core.manifest import read_manifest

    from ..data import DataError

    for split_cfg in pipeline.data.splits.values():
        if not split_cfg.manifest:
            continue
        path = pipeline.path(split_cfg.manifest)
        if not path.is_file():
            continue
        manifest = read_manifest(path)
        for sample in manifest.samples:
            if sample.video_id == video_id or sample.key == video_id:
                p = Path(sample.path).expanduser()
                if not p.is_absolute():
                    root = Path(video_root) if video_root else (pipeline.path(split_cfg.video_root) if split_cfg.video_root else path.parent)
                    p = root / p
                return p, sample, manifest
    raise DataError(f"video {video_id!r} is in none of the manifests of data.splits ({', '.join(pipeline.data.splits) or 'none'})")


def render_videos(run_dir: str | Path, video_ids: Sequence[str], out_dir: str | Path, *, pipeline=None,
                  store_path: str | None = None, video_root: str | None = None, boxes_root: str | None = None,
                  annotated_only: bool = False, device: str = "cpu") -> list[Path]:
    """Draw each sampled frame of ``video_ids`` with the run's heat-map (jet), its Otsu/contour
    boxes (green) and, where annotated, the ground-truth boxes (red, dashed); one PNG per frame
    under ``out_dir/<video_id>/``, about 560 px wide whatever the video's size, titled with the
    video, second, frame, true class, predicted class and score (and cIoU / IoU of annotated
    frames), with a legend and a colour bar (:func:`train.sol_metrics.frame_figure`).

    ``pipeline``: the configuration (default: the run's own, :func:`train.runs.run_pipeline`);
    ``store_path`` / ``video_root`` / ``boxes_root`` override its store, the splits' video root
    and ``sol.boxes_root``. Returns the written paths."""
    from extract.decode import picture_frames

    from .. import sol_metrics as sol
    from ..checkpoint import build_head
    from ..data import DataError
    from ..plots import save_figure
    from ..registry import get_task
    from ..runs import run_pipeline

    run_dir = Path(run_dir)
    model, meta = build_head(run_dir / "checkpoint.safetensors", device)
    task = get_task(str(meta.get("task", "avel")))
    if not task.can_render_frames():
        raise DataError(f"{run_dir}: a run of task {task.name!r}, whose heads give no per-frame maps to draw "
                          "(render-sol draws the runs of tasks that provide Task.frame_outputs, e.g. sol)")
    if pipeline is None:
        pipeline = run_pipeline(run_dir)
    segments = int((meta.get("features") or {}).get("segments") or 0)
    path = Path(store_path) if store_path else pipeline.path(pipeline.store.path)
    store = task.open_prediction_store(path, segments or _store_segments(path))
    scfg = pipeline.sol
    root = Path(boxes_root) if boxes_root else pipeline.path(scfg.boxes_root)
    files = sol.find_box_files(root) if root.is_dir() else {}
    class_names = list(meta.get("classes") or []) + ["background"]
    written: list[Path] = []
    for vid in video_ids:
        video_path, sample, manifest = find_sample(pipeline, vid, video_root)
        row = store.row_of(vid)
        _, probs, maps, index = next(task.frame_outputs(model, store, [row], device))
        valid = np.asarray(store.read("valid", [row])[0], bool)
        vb = sol.read_cvat_xml(files[vid.split("@")[0]]) if vid.split("@")[0] in files else None
        T, F = index.shape
        true_labels = manifest.segment_labels(T)[manifest.samples.index(sample)]
        true_names = list(manifest.classes) + ["background"]
        chosen = [(t, f, int(index[t, f])) for t in range(T) for f in range(F)
                  if int(index[t, f]) >= 0 and valid[t]
                  and not (annotated_only and (vb is None or vb.frames.get(int(index[t, f])) is None))]
        frames = picture_frames(str(video_path), indices=[k for _, _, k in chosen]) if chosen else []
        for (t, f, k), frame in zip(chosen, frames):
            gt = vb.frames.get(k) if vb is not None else None
            H, W = frame.shape[:2]
            norm = sol.normalize_map(sol.resize_map(maps[t, f], (H, W)))
            image = sol.heatmap_overlay(frame, norm, alpha=0.5, floor=scfg.otsu_floor)
            pred_boxes = sol.boxes_from_map(norm, scfg.otsu_floor)
            gt_scaled = None if gt is None else sol.scale_boxes(gt, (vb.height, vb.width), (H, W))
            top = int(np.argmax(probs[t, f]))
            scored = None
            if gt is not None:
                scored = sol.evaluate_frame(maps[t, f], gt, (vb.height, vb.width), scfg.eval_size or None,
                                            scfg.map_threshold, scfg.otsu_floor)
            title = sol.frame_title(vid, t, k, true_names[int(true_labels[t])],
                                    class_names[top] if top < len(class_names) else str(top), float(probs[t, f, top]),
                                    None if scored is None else scored.ciou, None if scored is None else scored.iou)
            fig = sol.frame_figure(image, pred_boxes, gt_scaled, title)
            written.append(save_figure(fig, Path(out_dir) / vid / f"t{t:02d}_f{f}_frame{k:05d}.png"))
        del frames
    log.info("wrote %d PNG files to %s", len(written), out_dir)
    return written


def _store_segments(path: Path) -> int:
    """T of a store (for runs whose checkpoint does not record it)."""
    from extract.core.store import open_store

    return open_store(path).segments


@click.command("render-sol", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Run directory of a sol run (holds checkpoint.safetensors); its config.yaml gives the store, splits, video root and box folder.")
@click.option("--video", "videos", required=True, multiple=True, help="Video id (store key) to draw; repeat for several. Ids starting with '-': --video=-5EoTUVneQA.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the PNG files (one subfolder per video).")
@click.option("--store", default=None, help="Store with frame_maps/audio_maps (default: the run's store.path).")
@click.option("--video-root", default=None, help="Folder the manifest paths are relative to (default: the run's split video_root).")
@click.option("--boxes-root", default=None, help="Folder of <video_id>/annotations.xml box files (default: the run's sol.boxes_root).")
@click.option("--annotated-only", is_flag=True, help="Only frames that have ground-truth boxes.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N.")
@click.pass_context
def command(ctx, run_dir, videos, out_dir, store, video_root, boxes_root, annotated_only, device):
    """Draw sounding-object maps over video frames (PNG), for chosen videos of a sol run.

    Each sampled frame (extract.sol_frames_per_segment per second) is decoded from the video file
    named by the manifests of the run's data.splits (with stage 1's decoder, the frame the map was
    computed from), overlaid with the run's attention map (jet colours, values below
    sol.otsu_floor left uncoloured), the boxes found by Otsu + contours (green) and the
    ground-truth boxes where the frame is annotated (red).

    The configuration is the run's own (its config.yaml; relative paths resolved against the
    folder the training started from), so the command works from any folder; avel-train's
    --config names another pipeline instead, --set and the options above override single keys.

    \b
    Example:
      avel-train render-sol --run data/runs/sol-stm-supervised/seed0-... \\
                 --video=-5EoTUVneQA --out data/renders
    """
    from extract.core.clitools import setup_logging
    from extract.core.settings import parse_set_option
    from extract.decode import DecodeError

    from ..cli import UserError, check_device, user_errors
    from ..runs import run_pipeline

    obj: Mapping[str, Any] = ctx.obj or {}
    setup_logging(int(obj.get("verbose") or 0))
    check_device(device)
    try:
        pipeline = run_pipeline(run_dir, config=obj.get("config"), overrides=parse_set_option(tuple(obj.get("sets") or ())))
        paths = render_videos(run_dir, list(videos), out_dir, pipeline=pipeline, store_path=store, video_root=video_root,
                              boxes_root=boxes_root, annotated_only=annotated_only, device=device)
    except (*user_errors(), DecodeError, KeyError, FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)) from None
    click.echo(f"wrote {len(paths)} PNG files to {out_dir}")


if __name__ == "__main__":
    command()
