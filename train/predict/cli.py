"""``avel-predict``: run a trained head on new videos (see :mod:`train.predict.run`)."""
from __future__ import annotations

import logging
import sys

import click

from extract.core.clitools import setup_logging, verbose_option

log = logging.getLogger(__name__)

#: exit codes of avel-predict, one meaning each (2 is also click's code for a usage error)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CRASH = 0, 1, 2, 3


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("videos", nargs=-1, type=click.Path())
@click.option("--run", "run_dir", type=click.Path(file_okay=False), default=None, help="Run directory of avel-train (holds checkpoint.safetensors).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="A checkpoint file instead of --run.")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None, help="More videos: a CSV with a 'path' column (avel manifests are) or one path per line; relative to the file's folder.")
@click.option("--video-root", type=click.Path(file_okay=False), default=None, help="Folder the --manifest's relative paths are relative to (default: the manifest's folder).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output folder (default: <run>/predict). One folder per video plus summary.csv.")
@click.option("--store", type=click.Path(file_okay=False), default=None, help="Feature store of the predicted videos (default: <out>/features.zarr); created or extended, resumed like avel-extract's.")
@click.option("--no-cache", is_flag=True, help="Do not use the feature cache shared with avel-extract (default: use it, so a second head on the same videos decodes nothing).")
@click.option("--cache-root", type=click.Path(file_okay=False), default=None, help="Feature cache folder; overrides $AVEL_CACHE, which overrides the run's store.cache_root (its config.yaml).")
@click.option("--device", default="cpu", show_default=True, help="Where the head runs (cpu, cuda, cuda:N).")
@click.option("--extract-device", default=None, help="Where the feature networks run (default: the training store's extract.device; not part of the features).")
@click.option("--no-plots", is_flag=True, help="Write predictions.csv/.json only (no timeline.png / attention.png).")
@click.option("--overlay-video", is_flag=True, help="Also write overlay.mp4 per video: the attention overlay and the label track.")
@click.option("--no-progress", is_flag=True, help="No progress bar during the feature extraction.")
@verbose_option
def main(videos, run_dir, checkpoint, manifest, video_root, out, store, no_cache, cache_root, device, extract_device, no_plots,
         overlay_video, no_progress, verbose):
    """Say, for every second of each video, which event is seen and heard, with a trained head.

    \b
      avel-predict clip.mp4 --run data/runs/avel-dmrn-supervised/seed0-20261203-101500
      avel-predict videos/ --run RUN --out predictions/ --overlay-video
      avel-predict --manifest more.csv --checkpoint model.safetensors

    VIDEOS are files or folders (their video files). Features are computed as the run's training
    store computed them (same networks, weights, frames per segment, precision), in windows of the
    run's T seconds; a video that cannot be predicted is reported and the others go on.

    Writes per video: predictions.csv (per second: label, valid, probability of every class),
    predictions.json (plus merged events), timeline.png, attention.png (heads with spatial
    attention), overlay.mp4 (--overlay-video); summary.csv for all videos.

    Features are computed in this process by stage 1 (avel-extract's extraction through the
    shared feature cache), with its progress (rate and ETA on a terminal, log lines otherwise).

    \b
    Exit codes (each means one thing):
      0  every video was predicted
      1  some videos failed (each named with its reason); the others were predicted
      2  usage or configuration error: nothing was predicted (bad option, run or
         checkpoint, weights missing, features that cannot be computed as in training)
      3  internal error (a bug): the traceback is logged; report it
    """
    setup_logging(verbose)
    from extract.core.devices import resolve_device

    from .run import PredictError, predict_videos, summary_text

    try:
        device = resolve_device(device, check=True)
        if extract_device:
            extract_device = resolve_device(extract_device, check=True)
    except ValueError as exc:
        print(f"avel-predict: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        results = predict_videos(videos, run=run_dir, checkpoint=checkpoint, manifest=manifest, video_root=video_root, out=out, store=store,
                                 cache=not no_cache, cache_root=cache_root, device=device, extract_device=extract_device,
                                 plots=not no_plots, overlay_video=overlay_video, progress=not no_progress)
    except PredictError as exc:
        print(f"avel-predict: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("avel-predict: interrupted; run the same command again (computed features are kept)", file=sys.stderr)
        sys.exit(130)
    except Exception:  # noqa: BLE001 - a bug: never reported as "some videos failed"
        log.exception("avel-predict stopped on an internal error (a bug; please report it with this traceback)")
        sys.exit(EXIT_CRASH)
    print(summary_text(results))
    if results:
        import pathlib

        first = next((r for r in results if r.outputs.get("csv")), None)
        if first is not None:
            print(f"outputs: {pathlib.Path(first.outputs['csv']).parent.parent}")
    sys.exit(EXIT_OK if all(r.ok for r in results) else EXIT_FAILED)


if __name__ == "__main__":
    main()
