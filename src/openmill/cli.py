"""The `openmill` command: one verb per stage, each a thin call into stages.py.

    openmill run RECIPE [--set a.b=v ...] [--force]     every stage the recipe lists
    openmill curate|tokenizer|tokenize|pretrain|continue_pretrain RECIPE  one stage (its inputs must exist)
    openmill generate RUN_OR_MODEL --prompt TEXT        samples from a trained model
    openmill export RUN_OR_MODEL --format hf|gguf --out PATH
    openmill import SOURCE --out DIR                    a HF folder or a GGUF file -> model folder
    openmill serve RUN_OR_MODEL [--port 8000]           OpenAI-compatible HTTP server
    openmill chat RUN_OR_MODEL [--system TEXT]          terminal chat with streaming output
    openmill control RUN --set data.weights.zh=0.4      live change of a running pretraining job
    openmill upscale SRC --drop M [--copies K] --out DIR  depth up-scaling (SOLAR), streamed
    openmill merge A B [C ...] --out DIR [--weights ...|--method slerp --t T]
    openmill eval MODEL... [--preset P] [--task T ...]  benchmarks, several models side by side

Bad input ends with one line `error: ...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from openmill.config import GenerateConfig, RecipeError, load_recipe
from openmill.data.readers import DataError

ModelArg = Annotated[Path, typer.Argument(help="a run directory (uses its newest model: dpo, sft, continue_pretrain or pretrain) or a model folder")]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="openmill: raw text to a released language model.")

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML, e.g. recipes/tiny.yaml")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: a.b=value (repeatable)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="rerun even when config and inputs are unchanged")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _run(recipe_path: Path, overrides: list[str] | None, stages: list[str] | None, force: bool):
    from openmill.align.data import AlignDataError
    from openmill.eval.tasks import TaskError
    from openmill.stages import run_recipe

    try:
        recipe = load_recipe(recipe_path, overrides or [])
        return run_recipe(recipe, stages, force=force), recipe
    except (RecipeError, DataError, AlignDataError, TaskError, FileNotFoundError) as e:
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
    _monitor_summary(console, root)
    _upscale_summary(console, results)
    for s in (results.get("generate") or {}).get("metrics", {}).get("samples", []):
        console.print(f"[bold]{s['prompt']}[/bold]{s['completion']}")
    aligned = [name for name in ("dpo", "sft") if results.get(name)]
    if aligned:  # the last alignment stage's replies, through the chat template it was trained on
        console.print(f"[bold]chat with {aligned[0]}/final:[/bold]")
        for turn in results[aligned[0]].get("metrics", {}).get("chat", []):
            console.print(f"[bold]user:[/bold] {turn['user']}\n[bold]assistant:[/bold] {turn['assistant']}")
    evaluated = (results.get("eval") or {}).get("metrics", {})
    if evaluated.get("results"):
        from openmill.eval.report import markdown_table

        console.print(f"[bold]evaluation of {evaluated['model']}[/bold] (% unless a perplexity)")
        console.print(markdown_table({"score": evaluated["results"]}), markup=False)


def _monitor_summary(console, root: Path) -> None:
    """The training monitor's run facts and events (the report's text part; its plots sit beside it)."""
    report = root / "pretrain" / "report.md"
    if report.is_file():
        text = report.read_text(encoding="utf-8")
        console.print(f"[bold]training monitor report:[/bold] {report.resolve()}")
        console.print(text[text.find("## Run") :].strip() if "## Run" in text else text.strip(), markup=False)


def _upscale_summary(console, results: dict) -> None:
    """Depth up-scaling in the demo: bpb of the trained model, of the up-scaled one before and after continuing."""
    from rich.table import Table

    up = (results.get("upscale") or {}).get("metrics", {})
    cont = (results.get("continue_pretrain") or {}).get("metrics", {})
    if not cont.get("val_bpb"):
        return
    pre = (results.get("pretrain") or {}).get("metrics", {}).get("val_bpb", {})
    depth = f"{up['source_layers']} -> {up['layers']} layers" if up else "continued"
    table = Table(title=f"depth up-scaling ({depth}): validation bits per byte")
    for col in ("domain", "trained", "right after up-scaling", f"after {cont.get('tokens', 0):,} more tokens"):
        table.add_column(col, justify="right")
    for domain, v in cont["val_bpb"].items():
        trained = pre.get(domain, {}).get("final")
        table.add_row(domain, f"{trained:.3f}" if trained else "-", f"{v['step0']:.3f}", f"{v['final']:.3f}")
    console.print(table)


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


for _stage in ("curate", "tokenizer", "tokenize", "pretrain", "continue_pretrain", "sft", "dpo"):
    app.command(_stage)(_single(_stage))


def _model_folder(model: Path) -> Path:
    from openmill.stages import latest_model_in_run

    folder = model if (model / "model.json").is_file() else latest_model_in_run(model)
    if folder is None:
        _fail(f"{model}: neither a model folder (model.json) nor a run directory with a trained model")
    return folder


def _checked_out(out: Path, kind: str) -> Path:
    """--out is written under a temporary name, then replaces what was there: refuse a path whose
    current content is not of the kind written (a folder of other files would be deleted)."""
    if out.resolve() == Path.cwd().resolve() or not out.resolve().name:
        _fail(f"--out {out}: give a new path; it replaces what is there, and this is a working folder")
    if kind == "file" and out.is_dir():
        _fail(f"--out {out}: is a folder; expected a file path (e.g. {out / 'model.gguf'})")
    if kind == "folder" and out.is_file():
        _fail(f"--out {out}: is a file; expected a folder path")
    model_files = ("model.json", "config.json")
    if kind == "folder" and out.is_dir() and any(out.iterdir()) and not any((out / f).is_file() for f in model_files):
        _fail(f"--out {out}: exists and holds something other than a model, which would be deleted; "
              "give a new or empty folder")
    return out


@app.command("export")
def export_cmd(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (hf) or .gguf file (gguf)")],
    format: Annotated[str, typer.Option("--format", "-f", help="hf or gguf")] = "hf",
    qtype: Annotated[str, typer.Option(help="gguf: f32, f16, q8_0 or q4_0")] = "f16",
    dtype: Annotated[Optional[str], typer.Option(help="hf: float32, bfloat16 or float16 (default: as trained)")] = None,
):
    """Write a model as a Hugging Face folder or a GGUF file for llama.cpp."""
    from openmill.export import ExportError, export_gguf, export_hf

    folder = _model_folder(model)
    _checked_out(out, "file" if format == "gguf" else "folder")
    try:
        if format == "hf":
            export_hf(folder, out, dtype=dtype)
        elif format == "gguf":
            export_gguf(folder, out, qtype=qtype)
        else:
            _fail(f"--format: expected hf or gguf, got {format!r}")
    except ExportError as e:
        _fail(str(e))
    typer.echo(f"wrote {out}")


@app.command("import")
def import_cmd(
    source: Annotated[Path, typer.Argument(help="a Hugging Face folder (config.json + safetensors) or a .gguf file")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the openmill model folder to write")],
):
    """Read a Llama/Mistral model from Hugging Face or GGUF into an openmill model folder."""
    from openmill.export import ExportError, import_gguf, import_hf

    _checked_out(out, "folder")
    try:
        if source.is_file() and source.suffix == ".gguf":
            import_gguf(source, out)
        elif (source / "config.json").is_file():
            import_hf(source, out)
        else:
            _fail(f"{source}: expected a .gguf file or a folder with config.json")
    except ExportError as e:
        _fail(str(e))
    typer.echo(f"wrote {out}")


@app.command("control")
def control_cmd(
    run: Annotated[Path, typer.Argument(help="the run directory of a running (or resumable) pretraining job")],
    set: SetOpt = None,
):
    """Change a running pretraining job at its next step boundary: --set data.weights.zh=0.4 --set lr_scale=0.5."""
    from openmill.train.control import ControlError, write_settings

    if not set:
        _fail("nothing to set; e.g. openmill control runs/tiny --set data.weights.zh=0.4")
    try:
        path = write_settings(run, set)
    except (ControlError, RecipeError) as e:
        _fail(str(e))
    typer.echo(f"wrote {path}; the job applies it at its next step boundary (see its metrics.jsonl events)")


@app.command("generate")
def generate_cmd(
    model: ModelArg,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="prompt text (repeatable)")],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: Optional[float] = 0.95,
    seed: int = 0,
):
    """Sample continuations of PROMPT from a trained model."""
    from pydantic import ValidationError

    from openmill.export import ExportError
    from openmill.sample import complete

    folder = _model_folder(model)
    try:
        cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        samples = complete(folder, prompt, cfg, seed)
    except ValidationError as e:
        _fail(_option_problem(e))
    except (ValueError, ExportError) as e:
        _fail(str(e))
    for s in samples:
        typer.echo(f"{s['prompt']}{s['completion']}")


def _option_problem(err) -> str:
    """A pydantic error on options as one line naming the first bad option: `--top-p: ...`."""
    problem = err.errors()[0]
    option = "--" + str(problem["loc"][-1]).replace("_", "-")
    return f"{option}: {problem['msg']}, got {problem['input']!r}"


QuantizeOpt = Annotated[Optional[str], typer.Option(help="weight-only quantization for inference: int8 or int4")]


@app.command("serve")
def serve_cmd(
    model: ModelArg,
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    name: Annotated[Optional[str], typer.Option(help="the model id clients ask for (default: the folder's name)")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="OPENMILL_API_KEY", help="require 'Authorization: Bearer KEY'")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="requests decoded together")] = 8,
    max_context: Annotated[int, typer.Option(min=2, help="prompt + completion tokens per request")] = 2048,
    max_tokens: Annotated[int, typer.Option(min=1, help="the largest max_tokens a request may ask for")] = 1024,
    quantize: QuantizeOpt = None,
):
    """Serve a model over an OpenAI-compatible API (/v1/completions, /v1/chat/completions)."""
    try:
        from openmill.serve.app import ServeLimits, serve
    except ImportError as e:
        _fail(f"openmill serve needs the serve extra (pip install 'openmill[serve]'): {e}")
    from openmill.export import ExportError

    limits = ServeLimits(max_batch=max_batch, max_context=max_context, max_tokens=max_tokens, default_max_tokens=min(256, max_tokens))
    try:
        serve(_model_folder(model), host, port, name, limits, api_key, quantize)
    except (ValueError, ExportError) as e:  # the model folder, or --quantize, before anything is served
        _fail(str(e))


@app.command("chat")
def chat_cmd(
    model: ModelArg,
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,
    max_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    max_context: Annotated[int, typer.Option(min=2, help="prompt + reply tokens kept")] = 2048,
    quantize: QuantizeOpt = None,
):
    """Chat with a model in the terminal (/reset, /exit)."""
    from openmill.export import ExportError
    from openmill.generate import Engine, SamplingParams
    from openmill.generate.quantize import quantize_model
    from openmill.serve.chat import run_chat
    from openmill.textmodel import load_text_model

    folder = _model_folder(model)
    try:
        params = SamplingParams(max_tokens, temperature, None, top_p, repetition_penalty, seed)
        loaded, tok = load_text_model(folder)
        if tok.info.chat_template is None:
            _fail(f"{folder}: this model has no chat template")
        if quantize:
            quantize_model(loaded, quantize)
        else:
            loaded.pack_weights()
    except (ValueError, ExportError) as e:
        _fail(str(e))
    run_chat(Engine(loaded, max_batch=1, max_len=max_context, decode=tok.decode), tok, params, system)


@app.command("upscale")
def upscale_cmd(
    source: Annotated[Path, typer.Argument(help="an openmill model folder or a Hugging Face folder (config.json + safetensors)")],
    drop: Annotated[str, typer.Option("--drop", help="m: layers dropped at each seam, a whole number < n/2 (SOLAR: 8 of 32)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the openmill model folder to write")],
    copies: Annotated[int, typer.Option("--copies", help="k copies stacked (SOLAR: 2)")] = 2,
):
    """Depth Up-Scaling: stack COPIES copies of SOURCE, dropping DROP layers at each seam."""
    from openmill.surgery.source import SurgeryError, open_checkpoint
    from openmill.surgery.upscale import depth_upscale
    from openmill.surgery.tensorfile import PeakMemory

    _checked_out(out, "folder")
    try:
        ckpt = open_checkpoint(source)  # outside the measurement: its first model build imports ~80 MB of code
        with PeakMemory() as peak:
            done = depth_upscale(ckpt, out, drop, copies)
    except SurgeryError as e:
        _fail(str(e))
    growth = f", peak memory +{peak.growth / 2**20:.0f} MiB" if peak.growth is not None else ""
    typer.echo(f"wrote {out}: {done['layers']} layers from {done['source_layers']} "
               f"({done['bytes_written'] / 2**20:.0f} MiB in {done['seconds']:.1f} s{growth}; "
               f"largest tensor {done['largest_tensor_bytes'] / 2**20:.0f} MiB)")
    typer.echo("new layer <- source layer: " + ", ".join(f"{i}<-{j}" for i, j in enumerate(done["layer_map"])))


@app.command("merge")
def merge_cmd(
    sources: Annotated[list[Path], typer.Argument(help="two or more model folders of one architecture")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the openmill model folder to write")],
    weights: Annotated[Optional[str], typer.Option("--weights", help="linear: comma-separated weights, normalised (default equal)")] = None,
    method: Annotated[str, typer.Option("--method", help="linear or slerp")] = "linear",
    t: Annotated[float, typer.Option("--t", help="slerp: 0 = first checkpoint, 1 = second")] = 0.5,
):
    """Average checkpoints' weights (linear) or interpolate two of them (slerp)."""
    from openmill.surgery.merge import merge
    from openmill.surgery.source import SurgeryError

    try:
        parsed = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        _fail(f"--weights: expected comma-separated numbers, got {weights!r}")
    _checked_out(out, "folder")
    try:
        done = merge(sources, out, parsed, method, t)
    except SurgeryError as e:
        _fail(str(e))
    typer.echo(f"wrote {out}: {method} merge of {len(sources)} checkpoints, {done['tensors']} tensors in {done['seconds']:.1f} s")
@app.command("eval")
def eval_cmd(
    models: Annotated[list[Path], typer.Argument(help="run directories (their newest model) or model folders; several = side by side")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for results.json / .md / .png")] = Path("eval"),
    preset: Annotated[Optional[str], typer.Option(help="quick, h6, en or zh (src/openmill/eval/tasks/presets.yaml)")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="a task name (repeatable)")] = None,
    tasks_file: Annotated[Optional[list[Path]], typer.Option("--tasks-file", help="a task YAML of your own (repeatable)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="first N records of each task")] = None,
    data_dir: Annotated[Path, typer.Option(help="what {data_dir} means in task YAMLs")] = Path("../shared/data"),
    batch_size: int = 16,
    chat: Annotated[bool, typer.Option("--chat", help="prompts through the model's chat template")] = False,
    seed: int = 1234,
    device: str = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's)")] = None,
):
    """Evaluate one or more models on benchmark tasks and write a side-by-side report."""
    from pydantic import ValidationError

    from openmill.eval.config import EvalConfig
    from openmill.eval.stage import run_eval
    from openmill.eval.tasks import TaskError

    folders = {}
    for m in models:
        folder = _model_folder(m)
        folders[str(m)] = folder
    try:
        cfg = EvalConfig(
            preset=preset if preset or task else "quick", tasks=task or [], task_files=tasks_file or [], limit=limit,
            data_dir=data_dir, batch_size=batch_size, chat=chat, seed=seed, device=device, threads=threads,
        )
        results = run_eval(cfg, folders, out)
    except ValidationError as e:
        _fail(_option_problem(e))
    except (TaskError, ValueError, OSError) as e:
        _fail(str(e).splitlines()[0])
    from openmill.eval.report import markdown_table

    typer.echo(markdown_table(results))
    typer.echo(f"wrote {out}/results.json, results.md, results.png")


def main(argv: list[str] | None = None) -> int:
    """The console entry point. Typer's own usage errors (a missing argument, an option out of
    range, an unknown command) end like ours: one line and status 2, not a boxed panel."""
    try:
        code = app(argv, prog_name="openmill", standalone_mode=False)
    except typer.Abort:  # Ctrl-C or end of input while a command reads it
        typer.echo("Aborted!", err=True)
        return 1
    except typer.TyperException as e:  # click's UsageError family, as Typer ships it
        ctx = getattr(e, "ctx", None)
        message = e.format_message()
        if not message and ctx is not None:  # a bare `openmill` or verb: the help is the answer
            typer.echo(ctx.get_help())
            return 0
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.secho(f"error: {message}{hint}", err=True, fg=typer.colors.RED)
        return e.exit_code
    return code if isinstance(code, int) else 0  # typer.Exit(n) comes back as n


if __name__ == "__main__":
    sys.exit(main())
