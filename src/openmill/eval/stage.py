"""The eval stage and verb: a preset and/or named tasks on one or more model folders."""

from __future__ import annotations

from pathlib import Path

from openmill.eval.config import EvalConfig
from openmill.eval.report import write_report
from openmill.eval.runner import Options, evaluate
from openmill.eval.tasks import TaskError, TaskSpec, load_presets, load_tasks


def select_tasks(cfg: EvalConfig) -> tuple[list[TaskSpec], dict[str, int | None]]:
    """The preset's tasks then `cfg.tasks`, and each one's few-shot override."""
    tasks = load_tasks(cfg.task_files)
    presets = load_presets()
    wanted: dict[str, int | None] = {}
    if cfg.preset is not None:
        if cfg.preset not in presets:
            raise TaskError(f"eval.preset: unknown preset {cfg.preset!r}; choices: {', '.join(presets)}")
        wanted.update(presets[cfg.preset])
    for name in cfg.tasks:
        wanted.setdefault(name, None)
    unknown = [n for n in wanted if n not in tasks]
    if unknown:
        raise TaskError(f"eval.tasks: unknown task {unknown[0]!r}; choices: {', '.join(sorted(tasks))}")
    if not wanted:
        raise TaskError("eval: no tasks (set eval.preset or eval.tasks)")
    return [tasks[n] for n in wanted], wanted


def run_eval(cfg: EvalConfig, models: dict[str, Path], out: Path, log=print) -> dict:
    """Evaluate every model folder of `models` (label -> folder); writes the report into `out`."""
    specs, shots = select_tasks(cfg)
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    opts = Options(data_dir=cfg.data_dir, batch_size=cfg.batch_size, limit=cfg.limit, chat=cfg.chat, seed=cfg.seed, shots=shots)
    by_model = {}
    for label, folder in models.items():
        if not (Path(folder) / "model.json").is_file():
            raise TaskError(f"eval.model: {folder} is not a model folder (model.json missing)")
        by_model[label] = evaluate(Path(folder), specs, opts, device=cfg.device, log=log)
    return write_report(by_model, out)


def model_path(recipe, cfg: EvalConfig) -> Path:
    """eval.model if set (absolute, or relative to the run directory), else the model the stages
    before eval produced last (stages.model_before)."""
    from openmill.stages import model_before

    if cfg.model is None:
        return model_before(recipe, "eval")
    return cfg.model if cfg.model.is_absolute() else recipe.root / cfg.model


def eval_stage(recipe, out: Path, log=print) -> tuple[list[Path], dict]:
    folder = model_path(recipe, recipe.eval)
    results = run_eval(recipe.eval, {folder.parent.name + "/" + folder.name: folder}, out, log=log)
    outputs = [out / "results.json", out / "results.md"] + ([out / "results.png"] if (out / "results.png").is_file() else [])
    return outputs, {"model": str(folder), "results": next(iter(results.values()))}
