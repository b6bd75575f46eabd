"""`avel-extract`: videos -> feature store. Subcommands prepare manifests, demo data, benchmarks."""
from __future__ import annotations

import logging
import sys

import click

from .settings import ConfigError, load_pipeline, parse_set_option

log = logging.getLogger("avel")


def setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def resolve(config: str | None, sets: tuple[str, ...], extra: dict | None = None):
    """pipeline.yaml (or --config) <- CLI options <- --set, as a Pipeline; ConfigError -> usage error."""
    overrides: dict = {}
    for source in (extra or {}, parse_set_option(sets)):
        for sec, values in source.items():
            overrides.setdefault(sec, {}).update(values)
    try:
        return load_pipeline(config, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), default=None,
    help="pipeline.yaml to use (default: $AVEL_PIPELINE, else ./pipeline.yaml, else built-in defaults).",
)
set_option = click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE",
    help="Override any config key, e.g. --set extract.batch_frames=64 (repeatable).",
)
verbose_option = click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--split", default=None, help="Split to extract (a name under data.splits in pipeline.yaml).")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None, help="Manifest CSV to extract instead of --split.")
@click.option("--video-root", type=click.Path(file_okay=False), default=None, help="Folder the manifest's paths are relative to (default: the split's video_root, else the manifest's folder).")
@click.option("--store", default=None, help="Feature store to write (default: store.path).")
@click.option("--weights", type=click.Choice(["pretrained", "random"]), default=None, help="'random' = random VGG-19 and VGGish weights (tests, offline demo); recorded in the store. Default: pretrained weights, which must be available locally (see README).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N (default: extract.device).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None, help="Network precision (default: extract.precision).")
@click.option("--workers", type=int, default=None, help="Decode worker processes (default: all cores).")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration and exit.")
@config_option
@set_option
@verbose_option
@click.pass_context
def main(ctx, split, manifest, video_root, store, weights, device, precision, workers, print_config, config, sets, verbose):
    """Extract VGG-19 pool5 maps and VGGish embeddings per 1-s segment into a Zarr feature store.

    \b
    Examples:
      avel-extract --split train
      avel-extract --manifest manifests/ave/test.csv --video-root data/ave/videos --store data/stores/ave.zarr
      avel-extract demo              # generate the offline demo dataset
    Run again after an interruption: only missing videos are computed.
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"config": config, "sets": sets, "verbose": verbose}
        return
    setup_logging(verbose)
    extra: dict = {"extract": {}, "store": {}}
    if weights == "random":
        extra["extract"].update(visual_weights="random", audio_weights="random")
    if device:
        extra["extract"]["device"] = device
    if precision:
        extra["extract"]["precision"] = precision
    if workers is not None:
        extra["extract"]["decode_workers"] = workers
    if store:
        extra["store"]["path"] = store
    pipeline = resolve(config, sets, extra)
    click.echo(pipeline.dump(), err=True)
    if print_config:
        return
    if not split and not manifest:
        raise click.UsageError("give --split NAME or --manifest FILE (see --help)")
    from .run import run_extraction_cli

    sys.exit(run_extraction_cli(pipeline, split=split, manifest=manifest, video_root=video_root))


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
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same --videos and --seed give the same dataset.")
@click.option("--force", is_flag=True, help="Regenerate even if OUT already holds this demo; write into OUT even if it holds other files.")
@click.pass_obj
def demo(obj, out, videos, seed, force):
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
    from .demo import DEMO_FRAMES_PER_SEGMENT, DemoError, generate_demo, next_commands

    try:
        summary = generate_demo(out, videos, seed, force=force, progress=sys.stderr.isatty())
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
        f"segment instead of AVE's 16 (VGG-19 on a CPU is slow) - see {summary.pipeline}"
    )
    click.echo(f"majority-class baseline on the test seconds: {summary.baseline_accuracy:.3f}")
    click.echo("next:")
    for command in next_commands(summary.pipeline):
        click.echo(f"  {command}")


@main.command("config")
@click.pass_obj
def print_config(obj):
    """Print the fully resolved configuration (defaults <- pipeline.yaml <- --set)."""
    click.echo(resolve(obj["config"], obj["sets"]).dump())


if __name__ == "__main__":
    main()
