"""The `openmill` command: one verb per stage, each a thin call into stages.py.

    openmill run RECIPE [--set a.b=v ...] [--force]     every stage the recipe lists
    openmill curate|tokenizer|tokenize|pretrain RECIPE  one stage (its inputs must exist)
    openmill generate RUN_OR_MODEL --prompt TEXT        samples from a trained model

Bad input ends with one line `error: ...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from openmill.config import GenerateConfig, RecipeError, load_recipe
from openmill.data.readers import DataError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="openmill: raw text to a released language model.")

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML, e.g. recipes/tiny.yaml")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: a.b=value (repeatable)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="rerun even when config and inputs are unchanged")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _run(recipe_path: Path, overrides: list[str] | None, stages: list[str] | None, force: bool):
    from openmill.stages import run_recipe

    try:
        recipe = load_recipe(recipe_path, overrides or [])
        return run_recipe(recipe, stages, force=force), recipe
    except (RecipeError, DataError, FileNotFoundError) as e:
        _fail(str(e))


def _summary(results: dict, root: Path) -> None:
    """What `make demo` ends with: where the run lives, validation bits-per-byte, samples."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"\n[bold]run directory:[/bold] {root.resolve()}")
    pre = (results.get("pretrain") or {}).get("metrics", {})
    if pre.get("val_bpb"):
        table = Table(title="validation bits per byte")
        for col in ("domain", "step 0", "final", "final / step 0"):
            table.add_column(col, justify="right")
        for domain, v in pre["val_bpb"].items():
            table.add_row(domain, f"{v['step0']:.3f}", f"{v['final']:.3f}", f"{v['ratio']:.2f}")
        console.print(table)
    for s in (results.get("generate") or {}).get("metrics", {}).get("samples", []):
        console.print(f"[bold]{s['prompt']}[/bold]{s['completion']}")


@app.command()
def run(recipe: RecipeArg, set: SetOpt = None, force: ForceOpt = False):
    """Run every stage of RECIPE in order, skipping those already done."""
    results, r = _run(recipe, set, None, force)
    _summary(results, r.root)


def _single(stage: str):
    def command(recipe: RecipeArg, set: SetOpt = None, force: ForceOpt = False):
        _run(recipe, set, [stage], force)

    command.__doc__ = f"Run the {stage} stage of RECIPE."
    return command


for _stage in ("curate", "tokenizer", "tokenize", "pretrain"):
    app.command(_stage)(_single(_stage))


@app.command("generate")
def generate_cmd(
    model: Annotated[Path, typer.Argument(help="a run directory (uses pretrain/final) or a model folder")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="prompt text (repeatable)")],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: Optional[float] = 0.95,
    seed: int = 0,
):
    """Sample continuations of PROMPT from a trained model."""
    from openmill.sample import complete

    folder = model / "pretrain" / "final" if (model / "pretrain" / "final").is_dir() else model
    if not (folder / "model.json").is_file():
        _fail(f"{model}: neither a run directory with pretrain/final nor a model folder")
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    for s in complete(folder, prompt, cfg, seed):
        typer.echo(f"{s['prompt']}{s['completion']}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
