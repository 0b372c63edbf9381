"""The `dapc` command: validate | plan | render | schema, and thin wrappers for the runtime's prepare | train | eval."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from dapc.errors import DapcError

EXIT_UNFIT = 3
_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe field (repeatable)."
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")


class _Group(click.Group):
    """Turns DapcError into one located line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DapcError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:  # stdout gone or full (`> /dev/full`, a closed pipe): say so once, on stderr
            _drop_stdout()
            click.echo(f"error: cannot write the output: {e.strerror or e}", err=True)
            sys.exit(2)
        except click.UsageError as e:  # one line, not click's usage block
            command = f"dapc {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "dapc"
            click.echo(f"error: {command}: {' '.join(e.format_message().split())} (see {command} --help)", err=True)
            sys.exit(2)


def _drop_stdout() -> None:
    # What is still buffered for stdout would fail again at exit: point it at the null device.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _warn(warnings) -> None:
    for line in warnings:
        click.echo(f"warning: {line}", err=True)


def _stdout():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=max(120, Console().width))


@click.group(cls=_Group)
@click.version_option(package_name="dapc")
def main() -> None:
    """dapc compiles a training recipe into a memory-checked plan and launch scripts."""


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_set_option
@_json_option
def validate(recipe: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check RECIPE: every check `plan` makes but whether it fits. Exit 0 when valid, 2 with the first problem."""
    from dapc.compile import compile_recipe

    spec = compile_recipe(recipe, overrides).spec
    _warn(spec.warnings)
    facts = {"valid": True, "name": spec.recipe.name, "model": spec.arch.name, "params": spec.params.total,
             "world_size": spec.world_size, "corpus_files": spec.corpus_files, "corpus_bytes": spec.corpus_bytes}
    if as_json:
        click.echo(json.dumps(facts, sort_keys=True))
    else:
        click.echo(f"ok: {facts['name']}: {facts['model']} ({facts['params']:,} parameters) on {facts['world_size']} "
                   f"GPUs; corpus {facts['corpus_files']} files, {facts['corpus_bytes']:,} bytes")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_set_option
@_json_option
def plan(recipe: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the plan for RECIPE: memory per GPU, strategy, batch, cost. Exit 3 when nothing fits."""
    from dapc.compile import compile_recipe
    from dapc.plan import plan_json_text

    compiled = compile_recipe(recipe, overrides)
    _warn(compiled.plan.warnings)
    if as_json:
        click.echo(plan_json_text(compiled.plan), nl=False)
    else:
        from dapc.report import print_plan

        print_plan(compiled.plan, _stdout())
    if not compiled.decision.fits:
        sys.exit(EXIT_UNFIT)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", type=str,
              help="Run directory; overrides the recipe's `output`.")
@_set_option
@click.option("--allow-unfit", is_flag=True, help="Write the artifacts even when the plan does not fit.")
@click.option("--force", is_flag=True, help="Replace files of the same names that dapc did not write.")
@_json_option
def render(recipe: Path, output: str | None, overrides: tuple[str, ...], allow_unfit: bool, force: bool,
           as_json: bool) -> None:
    """Write plan.json, launch.sh, job.sbatch, pytorchjob.yaml, ds_config.json and README.md for RECIPE."""
    from dapc.compile import compile_recipe
    from dapc.render import render_artifacts, write_artifacts

    if output is not None and not output.strip():
        raise DapcError("-o: the output directory is empty; name one")
    compiled = compile_recipe(recipe, overrides, output=str(Path(output).resolve()) if output is not None else None)
    _warn(compiled.plan.warnings)
    out_dir = Path(compiled.plan.paths.output_dir)
    if not compiled.decision.fits and not allow_unfit:
        click.echo(f"error: plan does not fit ({compiled.plan.memory.misfit}); nothing written. "
                   "`dapc plan` shows what would fit; --allow-unfit writes anyway.", err=True)
        sys.exit(EXIT_UNFIT)
    written = write_artifacts(render_artifacts(compiled.plan, out_dir), out_dir, force=force)
    if as_json:
        click.echo(json.dumps({"output_dir": str(out_dir), "files": [str(p) for p in written]}, sort_keys=True))
    else:
        click.echo(f"wrote {len(written)} files to {out_dir}: {', '.join(p.name for p in written)}")
    if not compiled.decision.fits:
        sys.exit(EXIT_UNFIT)


@main.command()
def schema() -> None:
    """Print the recipe's JSON Schema."""
    from dapc.recipe import Recipe

    click.echo(json.dumps(Recipe.model_json_schema(), indent=2, sort_keys=True))


@main.command()
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--set-a", "overrides_a", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a field of recipe A (repeatable).")
@click.option("--set-b", "overrides_b", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a field of recipe B (repeatable).")
@click.option("--exit-code", is_flag=True, help="Exit 1 when the plans differ, like `git diff --exit-code`.")
@_json_option
def diff(a: Path, b: Path, overrides_a: tuple[str, ...], overrides_b: tuple[str, ...], exit_code: bool,
         as_json: bool) -> None:
    """Compare A and B, each a recipe or a plan.json: the resolved fields that differ and what they change
    (memory per GPU, fit, strategy, batch, time, cost). Exit 0 even when they differ (1 with --exit-code)."""
    from dapc.diff import diff_files, diff_json_text, print_diff

    result = diff_files(a, b, overrides_a, overrides_b)
    if as_json:
        click.echo(diff_json_text(result), nl=False)
    else:
        print_diff(result, _stdout())
    if exit_code and result.differ:
        sys.exit(1)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@_json_option
def report(run_dir: Path, as_json: bool) -> None:
    """Progress, throughput and memory of the run in RUN_DIR next to its plan.json, while it runs or after; writes
    charts and report.md into RUN_DIR/report/."""
    from dapc.run_report import print_run_report, report_json_text, report_run

    result = report_run(run_dir)
    _warn(result.warnings)
    if as_json:
        click.echo(report_json_text(result), nl=False)
    else:
        print_run_report(result, _stdout())


_PASS_THROUGH = {"context_settings": {"ignore_unknown_options": True, "allow_extra_args": True,
                                      "help_option_names": []}}


@main.command(**_PASS_THROUGH)
@click.pass_context
def prepare(ctx: click.Context) -> None:
    """Tokenize and pack the plan's corpus: `dapc prepare --plan plan.json` (runs runtime.prepare; needs torch)."""
    from runtime.prepare.__main__ import main as prepare_main

    sys.exit(prepare_main(list(ctx.args)))


@main.command(name="eval", **_PASS_THROUGH)
@click.pass_context
def eval_(ctx: click.Context) -> None:
    """Benchmarks and perplexity: `dapc eval --model DIR [--compare-to DIR] ...`, or score answers produced
    elsewhere: `dapc eval --responses MODEL:BENCH=FILE.jsonl ...` (runs runtime.evaluate)."""
    from runtime.evaluate.__main__ import main as evaluate_main

    sys.exit(evaluate_main(list(ctx.args)))
