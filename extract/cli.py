"""`avel-extract`: videos -> feature store. Subcommands prepare manifests, demo data, benchmarks."""
from __future__ import annotations

import logging
import sys

import click

from .core.clitools import config_option, resolve, set_option, setup_logging, verbose_option

log = logging.getLogger("avel")


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--split", default=None, help="Split(s) to extract: a name under data.splits in pipeline.yaml, a comma list (train,val) or 'all'.")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None, help="Manifest CSV to extract instead of (or besides) --split.")
@click.option("--video-root", type=click.Path(file_okay=False), default=None, help="Folder the manifest's paths are relative to (default: the split's video_root, else the manifest's folder).")
@click.option("--store", default=None, help="Feature store to write (default: store.path, relative to pipeline.yaml's folder; this option is relative to the working directory). Created if absent; new videos are appended.")
@click.option("--recipe", "--preset", "recipe", type=click.Choice(["avel", "ave2018"]), default=None, help="Named extraction recipe (extract.recipe): 'ave2018' = features equal to the public AVE files (Keras VGG-19 imagenet weights, BGR minus Caffe means, the reference's frame rule, cv2 bilinear resize; VGGish AudioSet), the one to use with heads or checkpoints trained on them and to add videos to an imported store; 'avel' = avel's own (torchvision VGG-19). Recorded in the store and its fingerprint; a key that contradicts the recipe is an error naming it (docs/extraction.md, Recipes).")
@click.option("--weights", type=click.Choice(["pretrained", "random"]), default=None, help="'random' = random weights for every network the configuration uses (VGG-19, VGGish, ResNet-152 of the sol maps; tests, offline demo, benchmarks); recorded in the store. Default: the recipe's pretrained weights, which must be available locally (see docs/extraction.md).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N (default: extract.device; auto = cuda if available). On CPU torch uses all cores.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=None, help="Network precision (default: extract.precision, auto = bf16 autocast + channels_last on a GPU, fp32 on a CPU); the precision that runs is part of the store fingerprint.")
@click.option("--workers", type=int, default=None, help="Decode worker processes (default: extract.decode_workers, else all cores).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads for the networks on a CPU (default: extract.threads, else every core). Bounds avel-extract on a shared machine.")
@click.option("--timeout", "timeout", type=float, default=None, help="Seconds one video may take to decode before its worker is killed and the video marked failed (default: extract.decode_timeout_s).")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="Run the shard tasks on Dask: 'local' (an embedded LocalCluster on 127.0.0.1), 'slurm' (worker jobs on SLURM, settings in dask.slurm; needs the extra: pip install -e \".[slurm]\"), tcp://HOST:8786 or tls://HOST:8786 (certificates: dask.tls_* in pipeline.yaml or DASK_DISTRIBUTED__COMM__TLS__*). Default: dask.scheduler; unset = this machine's decode pool (fastest on one machine).")
@click.option("--print-job-script", is_flag=True, help="Print the SLURM job script one worker job would run (--scheduler slurm, settings in dask.slurm) and exit.")
@click.option("--cache", "use_cache", is_flag=True, help="Use the feature cache shared by projects (store.cache_root, $AVEL_CACHE overrides): compute only the videos it lacks (by file content), then fill the store from it.")
@click.option("--retry-failed", is_flag=True, help="Extract the rows whose status is failed again (only those; rows whose file changed are always re-extracted). The summary says how many were retried and how many now succeed.")
@click.option("--wait", is_flag=True, help="If another avel-extract is writing the store, or (with --cache) computing videos this run needs into the cache, queue behind it (saying whom it waits for: host, PID, command) instead of stopping with exit 2.")
@click.option("--no-preflight", is_flag=True, help="Skip the environment check made before any store is touched (decode + resample of a generated clip, device). Not recommended.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs and the final summary only). Without a terminal, progress is a log line every 30 s.")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration and exit.")
@config_option
@set_option
@verbose_option
@click.pass_context
def main(ctx, split, manifest, video_root, store, recipe, weights, device, precision, workers, threads, timeout, scheduler,
         print_job_script, use_cache, retry_failed, wait, no_preflight, no_progress, print_config, config, sets, verbose):
    """Extract VGG-19 pool5 maps and VGGish embeddings per 1-s segment into a Zarr feature store.

    \b
    Examples:
      avel-extract --split train
      avel-extract --recipe ave2018 --split all        # the public AVE features' recipe
      avel-extract --split all --workers 16
      avel-extract --manifest manifests/ave/test.csv --video-root data/ave/videos --store data/stores/ave.zarr
      avel-extract --recipe avel --weights random --set extract.frames_per_segment=4 bench --clips 'clips/*.mp4'
      avel-extract demo              # generate the offline demo dataset
      avel-extract --split all --device cuda --scheduler tcp://head-node:8786   # a Dask cluster
      avel-extract --split all --scheduler slurm                                 # SLURM jobs (dask.slurm)
      avel-extract --split all --cache && avel-extract list-cache                # shared cache

    \b
    Run the same command again after an interruption (crash, kill, power cut): only the missing
    store shards are computed, and the result equals an uninterrupted run's bit for bit.
    Bad videos never stop a run: they are marked failed, with the reason in the store's
    'reason' array and in <store>/logs/failures.jsonl. Only one avel-extract may write a store
    at a time (a second one is refused, naming the first).

    \b
    Before anything is written the environment is checked (decord decodes and the resampler
    resamples a generated clip, the device works, the weights load); `avel-extract doctor`
    prints that report. A file that changed since its row was made is extracted again;
    `--retry-failed` retries failed rows. When the same environment error (a library that does
    not load, CUDA, memory) hits several videos in a row the run stops: those rows stay missing.

    \b
    Exit codes: 0 all requested videos extracted; 1 some video failed or is not extracted (see
    the summary); 2 the run could not start or was stopped (configuration, manifest, store,
    lock, weights, environment, a SLURM request that cannot run); 130 interrupted (Ctrl-C; with
    --scheduler slurm every worker job is cancelled first).
    """
    extra: dict = {"extract": {}, "store": {}}
    if recipe:
        extra["extract"]["recipe"] = recipe
    if weights == "random":
        extra["extract"].update(visual_weights="random", audio_weights="random", sol_visual_weights="random")
    elif weights == "pretrained":  # "pretrained" = the recipe's VGG-19 weights (extract.config.ExtractConfig)
        extra["extract"].update(visual_weights="pretrained", audio_weights="vggish", sol_visual_weights="imagenet")
    if device:
        extra["extract"]["device"] = device
    if precision:
        extra["extract"]["precision"] = precision
    if workers is not None:
        extra["extract"]["decode_workers"] = workers
    if timeout is not None:
        extra["extract"]["decode_timeout_s"] = timeout
    if threads is not None:
        extra["extract"]["threads"] = threads
    if store:  # a path on the command line is relative to the working directory, like --manifest
        import os

        extra["store"]["path"] = os.path.abspath(store)
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"config": config, "sets": sets, "verbose": verbose, "extra": extra, "weights": weights, "recipe": recipe}
        return
    setup_logging(verbose)
    pipeline = resolve(config, sets, extra)
    if print_config:
        click.echo(pipeline.dump())
        return
    if print_job_script:
        from .core.settings import ConfigError
        from .core.slurm import print_job_script as show_script, slurm_device

        try:
            show_script(pipeline, stage="extract", device=slurm_device(pipeline.extract.device, pipeline.dask.slurm),
                        echo=click.echo)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None
        return
    if not split and not manifest:
        raise click.UsageError("give --split NAME or --manifest FILE (see --help)")
    _require_device(pipeline, scheduler=scheduler or pipeline.dask.scheduler)
    click.echo("# resolved configuration\n" + pipeline.dump(), err=True)
    sys.exit(run_command(pipeline, split=split, manifest=manifest, video_root=video_root, progress=not no_progress,
                     scheduler=scheduler, cache=use_cache, retry_failed=retry_failed, wait=wait,
                     preflight=not no_preflight))


def _require_device(pipeline, command: str = "avel-extract", scheduler: str | None = None) -> None:
    """Exit 2 with one line when extract.device names a device torch cannot use (cuda without a
    GPU, cuda:3 on a 2-GPU machine, a misspelt name); ``auto`` always resolves. On a Dask cluster
    the device is the workers' business (their preflight checks it)."""
    from .core.devices import resolve_device

    if scheduler and scheduler != "local":
        return
    try:
        resolve_device(pipeline.extract.device, check=True)
    except ValueError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def run_command(pipeline, *, split: str | None = None, manifest: str | None = None, video_root: str | None = None,
            progress: bool = True, scheduler: str | None = None, cache: bool = False, retry_failed: bool = False,
            wait: bool = False, preflight: bool = True) -> int:
    """``avel-extract`` main body: check, run, print the summary, return the exit code (0 ok, 1 some
    video failed or was not extracted, 2 the run could not start or an environment error stopped it).

    Before any store is created: the manifests are read (paths made absolute), the environment is
    checked (:mod:`extract.preflight`: decode, resample, device; on a remote cluster on every
    worker), a remote scheduler is reached and its workers checked. Then the single-machine path
    (:func:`extract.run.run_extraction`), the Dask path (:func:`run_extraction_dask`) or the cache
    (:func:`extract.cache.extract_with_cache`, computing its misses on either) runs."""
    import contextlib
    import functools
    import os

    from .core.daskclient import LOCAL, SLURM, dask_client
    from .distributed import check_workers, run_extraction_dask
    from .core.lock import StoreLocked
    from .core.manifest import ManifestError
    from .preflight import PreflightError
    from .requests import collect_requests
    from .run import run_extraction
    from .core.settings import ConfigError
    from .core.store import StoreError

    scheduler = scheduler or pipeline.dask.scheduler
    slurm = None
    try:
        requests = collect_requests(pipeline, split, manifest, video_root)
        with contextlib.ExitStack() as stack:
            client = None
            if scheduler == SLURM:  # checked (partition, resources, sbatch --test-only) before any job is queued
                from .core.slurm import slurm_device, stage_workers

                pipeline.extract.device = slurm_device(pipeline.extract.device, pipeline.dask.slurm)
                slurm = stage_workers(pipeline, stage="extract", device=pipeline.extract.device)
                slurm.check()
                client = stack.enter_context(slurm).client
            elif scheduler and scheduler != LOCAL:
                client = stack.enter_context(dask_client(pipeline.dask, scheduler, gpu=str(pipeline.extract.device).startswith("cuda"),
                                                         resolve_path=pipeline.path))
            if preflight:
                _preflight(pipeline, client)
            common = {"progress": progress, "retry_failed": retry_failed}
            if scheduler:
                runner = functools.partial(run_extraction_dask, scheduler=scheduler, client=client)
            else:
                runner = run_extraction
            if cache:
                from .cache import cache_root, extract_with_cache

                if client is not None:
                    check_workers(client, [], [os.path.abspath(cache_root(pipeline))])
                result = extract_with_cache(pipeline, requests, runner=runner, wait=wait, **common)
            else:
                result = runner(pipeline, requests, wait=wait, **common)
    except (ConfigError, ManifestError, StoreError, StoreLocked, PreflightError, FileNotFoundError, ValueError) as exc:
        print(f"avel-extract: error: {exc}", file=sys.stderr)
        _print_jobs(slurm)
        return 2
    except KeyboardInterrupt:
        print("avel-extract: interrupted; run the same command again to compute what is missing", file=sys.stderr)
        _print_jobs(slurm)
        return 130
    print(result.text(), file=sys.stderr)
    _print_jobs(slurm)
    return result.exit_code


def _print_jobs(slurm) -> None:
    """The SLURM jobs line of the summary (started, lost, replaced, cancelled), when jobs were started."""
    if slurm is not None and slurm.stats.started:
        print(f"  {slurm.stats.text()}", file=sys.stderr)


def _preflight(pipeline, client) -> None:
    """The environment checks of :mod:`extract.preflight`, here (single machine, embedded cluster)
    or on every worker of a remote cluster; PreflightError naming what failed where."""
    from .preflight import PreflightError, check_environment, require_environment

    cfg = pipeline.extract
    if client is None:  # the weights are resolved here too, when the store's identity is computed
        require_environment(cfg, cfg.device, build_networks=False)
        return
    try:
        answers = client.run(check_environment, cfg, cfg.device, build_networks=False)
        weights = client.run(_weights_problem, cfg)  # every worker loads its networks from its own disk
    except Exception as exc:  # noqa: BLE001 - a worker lost during the check (killed, out of memory)
        raise PreflightError(f"the environment check could not run on the Dask workers ({type(exc).__name__}: {exc}); "
                             "nothing was written. A worker that dies here has often run out of memory (its memory "
                             "limit: dask.slurm.memory on SLURM, `dask worker --memory-limit` elsewhere)") from None
    failed = [f"worker {worker}: {c.name}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else "")
              for worker, checks in sorted(answers.items()) for c in checks if not c.ok]
    failed += [f"worker {worker}: weights: {problem}" for worker, problem in sorted(weights.items()) if problem]
    if failed:
        raise PreflightError("the environment check failed on the Dask workers; nothing was written:\n  "
                             + "\n  ".join(failed))


def _weights_problem(cfg) -> str:
    """Runs on a worker: "" when every configured network's weights resolve there, else why not."""
    from .extractors import extractor_identity

    try:
        extractor_identity(cfg)  # resolves (and hashes) every weights file, loads nothing
    except Exception as exc:  # noqa: BLE001 - reported, with the worker's name, by the caller
        return f"{type(exc).__name__}: {exc}"
    return ""


@main.command("bench")
@click.option("--clips", required=True, help="Folder of video files, or a glob pattern ('clips/*.mp4').")
@click.option("--limit", type=int, default=None, help="Use only the first N clips.")
@click.option("--vgg-seconds", type=float, default=10.0, show_default=True, help="How long to time the VGG-19 forwards.")
@click.option("--keep-store", type=click.Path(file_okay=False), default=None, help="Write the end-to-end store here (default: a temporary folder, deleted).")
@click.pass_obj
def bench(obj, clips, limit, vgg_seconds, keep_store):
    """Throughput benchmark: VGG-19 only (frames/s), decode only (videos/s), end to end (videos/s).

    \b
    Prints the three figures, the bound min(VGG-bound videos/s, decode videos/s) and the ratio
    end-to-end / bound. Uses the configuration of the main command's options, e.g.
      avel-extract --device cuda --precision bf16 bench --clips data/ave/videos --limit 200
    Weights are random unless --weights pretrained is given (throughput does not depend on them).
    """
    from .bench import find_clips, run_benchmark

    setup_logging(obj["verbose"])
    extra = obj["extra"]
    if obj.get("weights") is None:
        extra["extract"].update(visual_weights="random", audio_weights="random")
    pipeline = resolve(obj["config"], obj["sets"], extra)
    _require_device(pipeline, "avel-extract bench")
    try:
        paths = find_clips(clips)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if limit:
        paths = paths[:limit]
    result = run_benchmark(pipeline, paths, vgg_seconds=vgg_seconds, keep_store=keep_store)
    click.echo(result.text())


@main.command("manifest-ave")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default="manifests/ave", show_default=True, help="Folder for train.csv, val.csv, test.csv and classes.txt.")
@click.option("--video-ext", default=".mp4", show_default=True, help="File extension of the videos (path column = <video_id><ext>).")
def manifest_ave(src, out, video_ext):
    """Convert the official AVE files in SRC (Annotations.txt, trainSet.txt, valSet.txt,
    testSet.txt) into manifests. Class index = order of first appearance; background = 28."""
    from .ave import convert_ave

    counts = convert_ave(src, out, video_ext)
    for split, n in counts.items():
        click.echo(f"{split}: {n} samples -> {out}/{split}.csv")


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="data/demo", show_default=True, help="Folder for the demo: videos/, manifests/, segments.csv, pipeline.yaml, README.txt.")
@click.option("--videos", type=click.IntRange(min=15), default=50, show_default=True, help="Number of 10-s clips (>= 15), split 60/20/20 into train/val/test with every class in each split.")
@click.option("--background-videos", type=click.IntRange(min=0), default=10, show_default=True, help="Extra background-only clips (no event second; a class object or sound appears in one modality at a time), split 60/20/20 like the others. Weakly supervised training learns background from them, as AVE's 178 'noisy' videos.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same --videos, --background-videos and --seed give the same dataset.")
@click.option("--force", is_flag=True, help="Regenerate even if OUT already holds this demo; write into OUT even if it holds other files.")
@click.pass_obj
def demo(obj, out, videos, background_videos, seed, force):
    """Generate the offline demo dataset: small AVE-like clips (real H.264/AAC files) whose events
    need both modalities, with manifests and a pipeline.yaml for extraction and training.

    \b
    The demo's pipeline.yaml uses RANDOM VGG-19/VGGish weights (no download needed; recorded in
    the store) and 1 frame per 1-s segment instead of AVE's 16, so that extraction on a CPU takes
    minutes. Re-running with the same options keeps the existing files.

    \b
    Example:
      avel-extract demo && avel-extract --config data/demo/pipeline.yaml --split all \\
        && avel-train --config data/demo/pipeline.yaml --head dmrn
    """
    setup_logging((obj or {}).get("verbose", 0))
    from .factories.demo import DEMO_FRAMES_PER_SEGMENT, DemoError, generate_demo, next_commands

    try:
        summary = generate_demo(out, videos, seed, background_videos=background_videos, force=force, progress=sys.stderr.isatty())
    except DemoError as exc:
        raise click.UsageError(str(exc)) from None
    sizes = summary.split_sizes()
    state = "already present, kept" if summary.reused else f"generated in {summary.seconds:.1f} s"
    click.echo(
        f"demo dataset in {out} ({state}): {len(summary.plan)} clips of 10 s "
        f"({sizes['train']} train / {sizes['val']} val / {sizes['test']} test), see {out}/README.txt"
    )
    click.echo(
        f"demo settings: RANDOM VGG-19/VGGish weights; {DEMO_FRAMES_PER_SEGMENT} VGG-19 frame per 1-s "
        f"segment instead of AVE's 16 (VGG-19 on a CPU is slow); short training, cross-entropy loss for the Tian et al. heads "
        f"- see {summary.pipeline}"
    )
    click.echo(f"majority-class baseline on the test seconds: {summary.baseline_accuracy:.3f}")
    click.echo("next:")
    for command in next_commands(summary.pipeline):
        click.echo(f"  {command}")


@main.command("list-cache")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Cache root (default: $AVEL_CACHE, else store.cache_root).")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@click.pass_obj
def list_cache_command(obj, root, as_json):
    """Show the feature sets of the shared cache: id, complete or not, videos (done/failed/missing),
    size on disk, creation time and how they were made (extractors and weights, segments, frames
    per segment, image size, precision)."""
    import json

    from .cache import cache_root, format_cache_listing, list_cache

    pipeline = resolve(obj["config"], obj["sets"])
    path = cache_root(pipeline, root)
    entries = list_cache(path)
    click.echo(json.dumps(entries, indent=2) if as_json else format_cache_listing(entries, path))


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def doctor(obj, as_json):
    """Check this machine for extraction: package versions (and whether a fresh install would
    resolve the same), devices, where each weights file was found, and a real decode, resample,
    device and network check on a generated clip. Exit 0 when every check passes, else 2.

    \b
    Example:
      avel-extract --weights random doctor
    """
    import json

    from .preflight import doctor_json, render_doctor

    setup_logging(obj["verbose"])
    pipeline = resolve(obj["config"], obj["sets"], obj["extra"])
    report = doctor_json(pipeline)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render_doctor(report))
    sys.exit(0 if report.get("ok") else 2)


@main.command("import-h5")
@click.option("--visual", required=True, type=click.Path(exists=True, dir_okay=False), help="visual_feature.h5 of the public AVE features ([4143, 10, 7, 7, 512], dataset 'avadataset').")
@click.option("--audio", required=True, type=click.Path(exists=True, dir_okay=False), help="audio_feature.h5 ([4143, 10, 128]).")
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False), help="AVE Annotations.txt: row i of the h5 files is annotation line i; one store row per video.")
@click.option("--store", "store_path", default=None, help="The store to write (default: the main --store, else store.path).")
@click.option("--visual-weights", default="keras-imagenet", show_default=True, help="The VGG-19 weights that made the visual file: 'keras-imagenet' (Keras VGG19 imagenet, as the public files; no file needed), a weights file (identified by its sha256) or 'random'.")
@click.option("--audio-weights", default="vggish", show_default=True, help="The VGGish weights that made the audio file: 'vggish' (the AudioSet release, as the public files; no file needed), a weights file or 'random'.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at the path.")
@click.pass_obj
def import_h5(obj, visual, audio, annotations, store_path, visual_weights, audio_weights, overwrite):
    """Write a feature store from the public AVE feature files instead of extracting the videos.

    \b
    The store (--store, default store.path) has the contract's arrays and records what made the
    files as an extraction would: the ave2018 recipe (extract.recipe) with the Keras VGG-19
    imagenet and AudioSet VGGish weights, and the fingerprint that follows. So it is ONE feature
    set with `avel-extract --recipe ave2018`: avel-predict computes new videos' features for a
    head trained on it, and `avel-extract --recipe ave2018 --store <it>` adds videos to it (both
    need the weights files then, see docs/extraction.md). The source files' sha256 are recorded
    under 'sources'. The recipe is the main command's --recipe (default ave2018); --set
    extract.KEY=VALUE of the main command applies too, pipeline.yaml's extract section does not.
    Example:
      avel-extract import-h5 --visual visual_feature.h5 --audio audio_feature.h5 \\
          --annotations /path/to/AVE/Annotations.txt --store data/stores/ave_h5.zarr
    """
    from .import_h5 import import_ave_h5
    from .core.settings import ConfigError, merge, parse_set_option
    from .core.store import StoreError
    from .weights import WeightsUnavailable

    setup_logging(obj["verbose"])
    pipeline = resolve(obj["config"], obj["sets"], obj["extra"])
    try:
        from .config import ExtractConfig

        explicit = {"recipe": obj.get("recipe") or "ave2018", "visual_weights": visual_weights,
                    "audio_weights": audio_weights, **parse_set_option(obj["sets"]).get("extract", {})}
        cfg = merge(ExtractConfig(), explicit, "extract")
        store = import_ave_h5(visual, audio, annotations, store_path or pipeline.path(pipeline.store.path),
                              extract_cfg=cfg, rows_per_shard=pipeline.store.rows_per_shard,
                              compression_level=pipeline.store.compression_level, overwrite=overwrite)
    except (StoreError, ConfigError, WeightsUnavailable, ValueError) as exc:
        click.echo(f"avel-extract import-h5: error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"imported {len(store)} videos into {store.path} (recipe {cfg.recipe}, fingerprint {store.fingerprint})")


@main.command("config")
@click.pass_obj
def print_config(obj):
    """Print the fully resolved configuration (defaults <- pipeline.yaml <- --set)."""
    click.echo(resolve(obj["config"], obj["sets"]).dump())


if __name__ == "__main__":
    main()
