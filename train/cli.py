"""`avel-train`: train and evaluate localization heads on a feature store.

Subcommands: ``bench`` (speed benchmark), ``evaluate`` and the commands of the entry-point group
``avel.commands`` (:class:`PluginGroup`): ``gpucheck`` (the GPU path measured in one command,
:mod:`train.predict.gpucheck`) and ``render-sol`` (sounding-object maps as PNG,
:mod:`train.predict.render`), both of the join floor. The public AVE
h5 features become a store with ``avel-extract import-h5`` (stage 1, :mod:`extract.import_h5`).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from extract.core import plugins
from extract.core.clitools import config_option, resolve, set_option, setup_logging, verbose_option

log = logging.getLogger("avel")


class RegistryChoice(click.Choice):
    """A click.Choice whose choices are read from a registry when used (so heads registered
    after import, e.g. by plugins or tests, are accepted)."""

    def __init__(self, names):
        self._names = names
        super().__init__([], case_sensitive=True)

    @property
    def choices(self):  # type: ignore[override]
        return tuple(self._names())

    @choices.setter
    def choices(self, value):
        pass


class CommaList(click.ParamType):
    """A comma list of names, each checked against ``choices`` (a Choice/RegistryChoice); the
    value is the list (a sweep runs every combination, see train.sweep)."""

    name = "list"

    def __init__(self, choice: click.Choice):
        self.choice = choice

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        from .sweep import parse_list

        names = parse_list(value)
        if not names:
            self.fail(f"{value!r}: give a name or a comma list", param, ctx)
        return [self.choice.convert(name, param, ctx) for name in names]


def _head_names():
    from .registry import head_names

    return head_names()


class PluginGroup(click.Group):
    """A click group whose commands are its own plus those of the entry-point group
    ``avel.commands`` (``name = module:command``, :mod:`extract.core.plugins`). A plugin command's
    module is imported only when that command is invoked (or its name is asked for): ``--help``
    lists it with the help text read from its source, so a command of the join floor (gpucheck,
    which imports stage 1) costs nothing to ``avel-train --list-heads`` or a training run."""

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *(p.name for p in plugins.entry_points(plugins.COMMANDS))})

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        plugin = plugins.find(plugins.COMMANDS, name)
        if plugin is None:
            return None
        command = plugin.load()
        if not isinstance(command, click.Command):
            raise plugins.PluginError(f"{plugin.describe()} is a {type(command).__name__}, not a click command")
        return command

    def format_commands(self, ctx, formatter):
        """Like click's, but a plugin command not imported yet is described from its source."""
        rows = []
        for name in self.list_commands(ctx):
            command = super().get_command(ctx, name)
            if command is not None:
                if not command.hidden:
                    rows.append((name, command))
                continue
            plugin = plugins.find(plugins.COMMANDS, name)
            text = plugins.docstring(plugin) if sys.modules.get(plugin.module) is None else None
            rows.append((name, click.Command(name, help=text) if text is not None else self.get_command(ctx, name)))
        if rows:
            limit = formatter.width - 6 - max(len(name) for name, _ in rows)
            with formatter.section("Commands"):
                formatter.write_dl([(name, command.get_short_help_str(limit)) for name, command in rows])


def _task_names():
    from .registry import TASKS, discover

    discover()
    return sorted(TASKS)


class UserError(click.ClickException):
    """An error the user can fix (a missing store, a manifest that does not fit, a non-finite
    feature, ...): printed as ONE line ``Error: ...`` on stderr, exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def user_errors() -> tuple[type[Exception], ...]:
    from extract.core.manifest import ManifestError
    from extract.core.settings import ConfigError
    from extract.core.store import StoreError

    from .checkpoint import CheckpointError
    from .data import DataError
    from .loop import NonFiniteError
    from .runner import SetupError
    from .sol_metrics import BoxFormatError

    return (StoreError, DataError, ManifestError, ConfigError, CheckpointError, NonFiniteError, SetupError, BoxFormatError)


@click.group(cls=PluginGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--head", type=CommaList(RegistryChoice(_head_names)), default=None, metavar="NAME[,NAME...]", show_choices=False, help="Head to train (default: train.head, dmrn). The registered names: --list-heads. A comma list (dmrn,bmfn) runs a sweep: every head x setting x seed, with a results table.")
@click.option("--task", type=RegistryChoice(_task_names), default=None, help="The task, from the task registry (plugins add theirs): avel = event localization (default), cml = cross-modality localization, sol = sounding objects.")
@click.option("--setting", type=CommaList(click.Choice(["supervised", "weak"])), default=None, help="supervised = segment labels; weak = video labels only, evaluated per segment. 'supervised,weak' sweeps both.")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="Run the sweep's runs as Dask tasks: 'local' (a LocalCluster on 127.0.0.1, dask.n_workers processes), 'slurm' (worker jobs on SLURM, settings in dask.slurm; needs the extra: pip install -e \".[slurm]\"), tcp://HOST:8786 or tls://HOST:8786 (certificates: dask.tls_* in pipeline.yaml). Default: dask.scheduler; unset = one run after the other here.")
@click.option("--print-job-script", is_flag=True, help="Print the SLURM job script one worker job of a sweep would run (--scheduler slurm, settings in dask.slurm) and exit.")
@click.option("--seeds", default=None, metavar="LIST", help="Seeds, e.g. 0,1,2 or 0-4; several seeds report mean ± std (default: train.seeds).")
@click.option("--select-on", type=click.Choice(["val", "test", "last"]), default=None, help="Split that picks the evaluated epoch (default val). 'test' only to compare with papers; outputs are labelled optimistic.")
@click.option("--protocol", type=click.Choice(["avel", "reference"]), default=None, help="'reference': train as the head's reference script does (its batch order, last partial batch, selection split and evaluation epochs; docs/training.md); outputs are labelled 'reference protocol'. Default: train.protocol (avel).")
@click.option("--store", default=None, help="Feature store to read (default: store.path).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs (default: the head's paper schedule).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Adam learning rate (default: the head's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size (default: the head's).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N (default: train.device).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help=f"torch CPU threads (default: train.threads, else every core: {os.cpu_count()} here). Recorded in the run's config.yaml.")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration and exit.")
@click.option("--list-heads", is_flag=True, help="List the registered heads and exit.")
@config_option
@set_option
@verbose_option
@click.pass_context
def main(ctx, head, task, setting, scheduler, print_job_script, seeds, select_on, protocol, store, epochs, lr, batch_size, device,
         threads, print_config, list_heads, config, sets, verbose):
    """Train a localization head on a feature store and report segment accuracy.

    Accuracy = correct 1-s segments / all segments of the split, background included (AVE test:
    402 x 10 = 4020). The epoch is selected on the validation split; test is evaluated once.
    The closing summary prints each headline metric beside its trivial baseline (avel: majority
    class; cml: chance; sol: a centre box of half the frame's width and height).

    Everything a run needs (store, arrays, manifests, boxes) is checked before the first epoch;
    a problem, or a NaN/inf in a training batch or loss, ends the run with one line on stderr
    and exit code 2. The run folder is made only once the checks have passed.
    Every run writes runs_root/<task>-<head>-<setting>/seed<k>-<time>/ (config.yaml,
    metrics.json, epochs.csv, checkpoint.safetensors, PNG plots).

    \b
    Examples:
      avel-train --head dmrn
      avel-train --head dmrn --seeds 0-4 --store data/stores/ave.zarr
      avel-train --head a+v-att --setting weak --set train.weak_pool=max
      avel-train --head dmrn --protocol reference     # as AVE-ECCV18's supervised_main.py trains it
      avel-train --list-heads
      avel-train --head dmrn,bmfn --seeds 0-4 --scheduler local     # sweep, mean ± std table
      avel-train --head dmrn,bmfn --seeds 0-4 --scheduler slurm     # the runs as SLURM jobs (dask.slurm)
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"config": config, "sets": sets, "verbose": verbose}
        return
    setup_logging(verbose)
    if list_heads:
        click.echo(heads_table())
        return
    heads, settings = head or [], setting or []
    extra = cli_overrides(head=heads[0] if heads else None, task=task, setting=settings[0] if settings else None,
                          seeds=seeds, select_on=select_on, protocol=protocol, store=store,
                          epochs=epochs, lr=lr, batch_size=batch_size, device=device, threads=threads)
    pipeline = resolve(config, sets, extra)
    scheduler = scheduler or pipeline.dask.scheduler
    if scheduler == "slurm" or print_job_script:  # the compute nodes' device and cores, not this machine's
        from extract.core.settings import ConfigError
        from extract.core.slurm import slurm_device

        try:
            pipeline.train.device = slurm_device(pipeline.train.device, pipeline.dask.slurm)
        except ConfigError as exc:
            raise UserError(str(exc)) from None
        pipeline.train.threads = pipeline.train.threads or pipeline.dask.slurm.cores
    if not pipeline.train.threads:  # recorded in config.yaml: the number of threads really used
        pipeline.train.threads = os.cpu_count() or 1
    if print_job_script:
        from extract.core.slurm import print_job_script as show_script

        try:
            show_script(pipeline, stage="train", device=pipeline.train.device, echo=click.echo)
        except ConfigError as exc:
            raise UserError(str(exc)) from None
        return
    click.echo(pipeline.dump(), err=True)
    if print_config:
        return
    runs = max(1, len(heads)) * max(1, len(settings)) * len(pipeline.train.seeds)
    # on SLURM even one run goes to a job (this is a login node)
    if len(heads) > 1 or len(settings) > 1 or (scheduler and runs > 1) or scheduler == "slurm":
        sys.exit(run_sweep_cli(pipeline, heads, settings, scheduler, verbose))
    try:
        results = run_seeds(pipeline, verbose)
    except user_errors() as exc:
        if verbose > 1:
            raise
        raise UserError(str(exc)) from None
    click.echo(results_table(results))
    click.echo(accuracy_line(results))
    from .registry import get_task

    report = get_task(pipeline.train.task).report_lines(results)  # e.g. cml: A2V / V2A / chance
    if report:
        click.echo(report)


def run_sweep_cli(pipeline, heads: list[str], settings: list[str], scheduler: str | None, verbose: int) -> int:
    """Every head x setting x seed (train.sweep), then the results table; exit code 1 if a run failed."""
    from .sweep import expand_runs, run_sweep, sweep_markdown, sweep_table, write_sweep

    cfg = pipeline.train
    specs = expand_runs(heads or [cfg.head], settings or [cfg.setting], cfg.seeds)
    where = f"Dask scheduler {scheduler}" if scheduler else "this process, one after the other"
    if scheduler == "slurm":
        where = f"SLURM jobs: {pipeline.dask.slurm.jobs} at a time"
    click.echo(f"sweep: {len(specs)} runs ({where})", err=True)
    slurm = None

    def jobs_line() -> None:
        if slurm is not None and slurm.stats.started:
            click.echo(f"  {slurm.stats.text()}", err=True)

    def echo_row(row) -> None:
        click.echo(f"  {row['head']} {row['setting']} seed {row['seed']}: {row['error'] or row['run_dir']}", err=True)

    try:
        if scheduler == "slurm":  # heads and settings, then SLURM (partition, resources, sbatch --test-only)
            from extract.core.slurm import stage_workers

            from .sweep import check_spec

            for spec in specs:
                check_spec(cfg.task, spec)
            slurm = stage_workers(pipeline, stage="train", device=cfg.device)
            slurm.check()
            with slurm:
                rows = run_sweep(pipeline, specs, client=slurm.client, on_result=echo_row)
        else:
            rows = run_sweep(pipeline, specs, scheduler=scheduler, on_result=echo_row)
    except (*user_errors(), ValueError) as exc:
        jobs_line()
        if verbose > 1:
            raise
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("avel-train: interrupted", err=True)
        jobs_line()
        return 130
    paths = write_sweep(pipeline.path(cfg.runs_root), cfg.task, rows)
    click.echo(sweep_markdown(sweep_table(rows), cfg.task))
    click.echo(f"results: {paths['results']}, {paths['markdown']} (every run: {paths['runs']})", err=True)
    jobs_line()
    return 1 if any(row["error"] for row in rows) else 0


def cli_overrides(*, head, task, setting, seeds, select_on, store, epochs, lr, batch_size, device, threads=None,
                  protocol=None) -> dict:
    """The options given on the command line as pipeline overrides."""
    train = {"head": head, "task": task, "setting": setting, "select_on": select_on, "protocol": protocol, "epochs": epochs,
             "lr": lr, "batch_size": batch_size, "device": device, "threads": threads}
    train = {k: v for k, v in train.items() if v is not None}
    if seeds is not None:
        from .runs import parse_seeds

        try:
            train["seeds"] = parse_seeds(seeds)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--seeds") from None
    extra: dict = {"train": train}
    if store:  # relative to the working directory, like every path given on a command line
        extra["store"] = {"path": str(Path(store).expanduser().resolve())}
    return extra


def run_seeds(pipeline, verbose: int = 0) -> list[dict]:
    """Run the configured task/head once per seed (:func:`train.runner.run`); write
    summary.json/.md for several seeds. The epoch progress bar is shown on a terminal; elsewhere
    each evaluated epoch logs a line. A seed's run folder is made once its checks have passed, and
    removed again when the run fails."""
    from . import runner
    from .registry import get_head, get_task
    from .runs import group_dir, summarize, write_summary

    cfg = pipeline.train
    try:
        head_cls = get_head(cfg.head)
        task_cls = get_task(cfg.task)
    except KeyError as exc:
        raise click.UsageError(str(exc.args[0])) from None
    if head_cls.task != cfg.task:
        raise click.UsageError(f"head {cfg.head!r} is a {head_cls.task!r} head; use --task {head_cls.task} or pick another head")
    if cfg.setting not in head_cls.settings:
        raise click.UsageError(f"head {cfg.head!r} supports --setting {'/'.join(head_cls.settings)}, not {cfg.setting!r}")
    results = []
    for seed in cfg.seeds:
        metrics = runner.run(pipeline, cfg.head, seed, task_cls=task_cls, progress=True,
                             on_run_dir=lambda path, seed=seed: click.echo(f"seed {seed}: {path}", err=True))
        results.append({**metrics, "seed": seed})
    if len(results) > 1:
        directory = group_dir(pipeline.path(cfg.runs_root), cfg.task, cfg.head, cfg.setting, cfg.protocol)
        js, md = write_summary(directory, summarize(results))
        click.echo(f"summary: {js} and {md}", err=True)
    return results


def results_table(results: list[dict]) -> str:
    """Plain-text table: seed, selected epoch, val and test accuracy, run dir; mean ± std row."""
    from .runs import mean_std

    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    lines = [f"{'seed':>6}  {'epoch':>5}  {'val acc':>8}  {'test acc':>8}  run"]
    for r in results:
        lines.append(f"{r['seed']:>6}  {r.get('selected_epoch', '-'):>5}  {fmt(r.get('val_accuracy')):>8}  {fmt(r.get('test_accuracy')):>8}  {r['run_dir']}")
    if len(results) > 1:
        cells = []
        for key in ("val_accuracy", "test_accuracy"):
            vals = [r[key] for r in results if r.get(key) is not None]
            mean, std = mean_std(vals) if vals else (None, None)
            cells.append("-" if mean is None else f"{mean:.4f}±{std:.4f}")
        lines.append(f"{'mean':>6}  {'':>5}  {cells[0]:>8}  {cells[1]:>8}")
    selection = results[0].get("selection") if results else None
    if selection:
        lines.append(f"epoch selected on: {selection}")
    protocol = (results[0].get("protocol") or {}) if results else {}
    if protocol.get("name") == "reference":
        lines.append(f"trained with the {protocol['label']}: {protocol_summary(protocol)}")
    return "\n".join(lines)


def protocol_summary(protocol: dict) -> str:
    """``fixed order, last partial batch dropped, val evaluated every 5 epochs from epoch 1`` (a
    metrics.json ``protocol`` entry in words)."""
    order = "a new order every epoch" if protocol["shuffle"] else "one fixed order"
    drop = ", last partial batch dropped" if protocol["drop_last"] else ""
    every = protocol["eval_every"]
    cadence = f"every {every} epochs from epoch {protocol['eval_first']}" if every > 1 else f"every epoch from epoch {protocol['eval_first']}"
    if protocol.get("eval_last") and every > 1:
        cadence += " and after the last"
    return f"{order}{drop}, {protocol['select_on']} evaluated {cadence}"


def accuracy_line(results: list[dict]) -> str:
    """``test accuracy: 0.xxxx`` (one seed) or ``test accuracy: 0.xxxx ± 0.xxxx (n seeds)``,
    followed by the task's baseline of the same figure when the metrics give one (``baseline``
    entry ``test_accuracy``: avel majority class, cml chance, sol majority class)."""
    from .runs import mean_std_text

    values = [r["test_accuracy"] for r in results if r.get("test_accuracy") is not None]
    seeds = f" ({len(values)} seeds)" if len(values) > 1 else ""
    line = f"test accuracy: {mean_std_text(values)}{seeds}"
    base = (results[0].get("baseline") or {}).get("test_accuracy") if results else None
    if base and base.get("value") is not None:
        line += f"; baseline {base['value']:.4f} ({base['method']})"
    return line


def heads_table() -> str:
    """One line per registered head: name, task, settings, default schedule, summary."""
    from .registry import HEADS, discover

    discover()
    if not HEADS:
        return "no heads registered"
    lines = [f"{'head':<22} {'task':<5} {'settings':<18} {'lr':>7} {'batch':>5} {'epochs':>6}  description"]
    for name in sorted(HEADS):
        cls = HEADS[name]
        d = dict(getattr(cls, "train_defaults", {}) or {})
        doc = (cls.__doc__ or "").strip().splitlines()
        lines.append(
            f"{name:<22} {cls.task:<5} {','.join(cls.settings):<18} {d.get('lr', '-')!s:>7} {d.get('batch_size', '-')!s:>5} "
            f"{d.get('epochs', '-')!s:>6}  {_clip(doc[0] if doc else '', 90)}"
        )
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def check_device(device: str | None) -> None:
    """A UserError (one line, exit 2) for a device torch cannot use, before any work."""
    from extract.core.devices import resolve_device

    try:
        resolve_device(device, check=True)
    except ValueError as exc:
        raise UserError(str(exc)) from None


@main.command("bench")
@click.option("--workdir", type=click.Path(file_okay=False), default="/tmp/avel-bench", show_default=True, help="Where the synthetic store and h5 files are made (once) and reused.")
@click.option("--head", "head_name", default=None, help="Head to time (default: dmrn when registered, else the first registered head).")
@click.option("--rows", type=click.IntRange(min=8), default=4143, show_default=True, help="Videos in the synthetic store (AVE: 4143).")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True, help="Timed epochs per trainer.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Batch size (AVEL reference: 64).")
@click.option("--schedule-epochs", type=click.IntRange(min=1), default=300, show_default=True, help="Epochs of the extrapolated full schedule (AVEL reference: 300).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the figures as JSON here.")
@click.pass_obj
def bench_command(obj, workdir, head_name, rows, epochs, batch_size, schedule_epochs, device, threads, json_out):
    """Seconds per epoch and for the full schedule: this trainer vs a reference-style loop that
    copies each batch out of h5-loaded arrays, on the same synthetic AVE-sized data and head."""
    from .bench import run_benchmark

    setup_logging(obj["verbose"])
    check_device(device)
    report = run_benchmark(Path(workdir), head_name=head_name, rows=rows, epochs=epochs, batch_size=batch_size,
                           schedule_epochs=schedule_epochs, device=device, threads=threads, json_out=json_out)
    click.echo(report)


@main.command("evaluate")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run folder of avel-train (holds config.yaml, metrics.json, checkpoint.safetensors).")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True, help="The split to score: the run's train.<split>_split.")
@click.option("--store", default=None, help="Feature store to read (default: the store the run was trained on).")
@click.option("--boxes-root", default=None, help="Folder of <video_id>/annotations.xml box files, task sol (default: the run's sol.boxes_root).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N (default: the run's train.device).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the figures as JSON here.")
@click.pass_obj
def evaluate_command(obj, run_dir, split, store, boxes_root, device, json_out):
    """Score a finished run's checkpoint on a split again and print its figures.

    The run describes itself: store, splits, box folder and every other setting come from the
    run's config.yaml (relative paths from the folder the training started in), so this works
    from any folder. --store, --boxes-root, --device, --set and an explicit --config override
    them. The figures are computed by the run's task exactly as for its metrics.json: on the
    same data, the test accuracy equals metrics.json's, and the val accuracy the selected
    epoch's.

    \b
    Examples:
      avel-train evaluate --run data/runs/avel-dmrn-supervised/seed0-20250101-120000
      avel-train evaluate --run RUN --split val --json-out val.json
      avel-train evaluate --run RUN --store other.zarr     # the same split of another store
    """
    from extract.core.settings import ConfigError, parse_set_option

    from .runner import evaluate_run

    setup_logging(obj["verbose"])
    overrides: dict = {}
    try:
        overrides.update(parse_set_option(obj["sets"]))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if store:  # relative to the working directory, like every path given on a command line
        overrides.setdefault("store", {})["path"] = str(Path(store).expanduser().resolve())
    if boxes_root:
        overrides.setdefault("sol", {})["boxes_root"] = str(Path(boxes_root).expanduser().resolve())
    try:
        report = evaluate_run(run_dir, split, config=obj["config"], overrides=overrides, device=device)
    except (*user_errors(), KeyError) as exc:
        if obj["verbose"] > 1:
            raise
        raise UserError(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)) from None
    click.echo(f"run {report['run_dir']} (task {report['task']}, head {report['head']}): split {split} "
               f"({report['split_name']} of {report['store']})")
    for key, value in report["metrics"].items():
        if isinstance(value, float):
            click.echo(f"{key.replace('_', ' ')}: {value:.4f}")
    if json_out:
        from .runs import write_json

        write_json(json_out, report)
        click.echo(f"figures written to {json_out}", err=True)


if __name__ == "__main__":
    main()
