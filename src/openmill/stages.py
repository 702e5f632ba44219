"""The stage table and the recipe runner.

Every stage is a plain function `(recipe, out_dir) -> (outputs, metrics)` registered here with the
config sections and input files that decide whether it must run again. The runner validates the
whole recipe before any work, runs the listed stages in order, skips those whose fingerprint
(config sections + sha256 of inputs) matches their manifest, and writes each manifest on success.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from openmill.config import Recipe, RecipeError
from openmill.data.readers import check_corpus, expand_paths
from openmill.data.sources import document_files
from openmill.rundir import RunDir, atomic_write_text, fingerprint
from openmill.train.parallel import check_batch_split

StageFn = Callable[[Recipe, Path], tuple[list[Path], dict]]


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # recipe fields whose values are part of the fingerprint
    inputs: Callable[[Recipe], list[Path]]
    run: StageFn
    distributed: bool = False  # runs on every process under torchrun (else rank 0 only)
    folder: str = ""  # its folder in the run directory, when not its name

    @property
    def dir(self) -> str:
        return self.folder or self.name


def _raw_files(recipe: Recipe) -> list[Path]:
    return expand_paths([p for d in recipe.data.domains.values() for p in (*d.train, *d.valid)])


def _documents(recipe: Recipe) -> list[Path]:
    return [p for d in recipe.data.domains for split in ("train", "valid") for p in document_files(recipe, d, split)[0]]


def _tokenizer_path(recipe: Recipe) -> Path:
    return recipe.root / "tokenizer" / "tokenizer.json"


def _tokens_dir(recipe: Recipe) -> Path:
    return recipe.root / "tokens"


# Where each model-producing stage leaves its model folder, relative to the run directory.
MODEL_OUTPUTS = {
    "pretrain": "pretrain/final",
    "upscale": "upscale/model",
    "continue_pretrain": "continue_pretrain/final",
    "sft": "sft/final",
    "dpo": "dpo/final",
}


# The usual order of a full pipeline (recipes may list any subsequence).
PIPELINE_ORDER = ["curate", "tokenizer", "tokenize", "pretrain", "upscale", "continue_pretrain", "generate", "sft", "dpo", "eval", "export"]


def model_before(recipe: Recipe, stage: str) -> Path:
    """The model a stage works on: the output of the last model-producing stage listed before it
    in the recipe (all of them for a stage the recipe does not list); pretrain/final if none is.

    So `[pretrain, upscale, continue_pretrain, sft, dpo, eval, export]` evaluates and exports the
    aligned model, and dropping a stage from the list re-chains the rest with no other edit. A stage
    the recipe does not list is placed where it stands in the usual pipeline (PIPELINE_ORDER).
    """
    if stage in recipe.stages:
        names = recipe.stages[: recipe.stages.index(stage)]
    else:
        names = [n for n in recipe.stages if PIPELINE_ORDER.index(n) < PIPELINE_ORDER.index(stage)]
    producers = [n for n in names if n in MODEL_OUTPUTS]
    return recipe.root / MODEL_OUTPUTS[producers[-1] if producers else "pretrain"]


def latest_model_in_run(run_dir: Path) -> Path | None:
    """The newest model folder of a finished run directory (by its recipe.yaml's stage order)."""
    import yaml

    saved = run_dir / "recipe.yaml"
    stages = (yaml.safe_load(saved.read_text()) or {}).get("stages", []) if saved.is_file() else []
    order = [n for n in stages if n in MODEL_OUTPUTS] or list(MODEL_OUTPUTS)
    for name in reversed(order):
        if (run_dir / MODEL_OUTPUTS[name] / "model.json").is_file():
            return run_dir / MODEL_OUTPUTS[name]
    return None


def _upscale_source(recipe: Recipe) -> Path:
    return recipe.upscale.source or model_before(recipe, "upscale")


def _upscaled_model(recipe: Recipe) -> Path:
    return recipe.continue_pretrain.init_from or model_before(recipe, "continue_pretrain")


def _curate(recipe: Recipe, out: Path):
    from openmill.data.curate.stage import run_curate

    return run_curate(recipe, out)


def _tokenizer(recipe: Recipe, out: Path):
    from openmill.tokenizer import train_tokenizer

    return train_tokenizer(recipe, out)


def _tokenize(recipe: Recipe, out: Path):
    from openmill.data.tokenize import tokenize_corpus

    return tokenize_corpus(recipe, _tokenizer_path(recipe), out)


def _pretrain(recipe: Recipe, out: Path):
    from openmill.train.pretrain import run_pretrain

    return run_pretrain(recipe, out, _tokenizer_path(recipe), _tokens_dir(recipe))


def _upscale(recipe: Recipe, out: Path):
    from openmill.surgery.source import SurgeryError, open_checkpoint
    from openmill.surgery.tensorfile import PeakMemory
    from openmill.surgery.upscale import depth_upscale

    try:
        source = open_checkpoint(_upscale_source(recipe))  # outside the measurement: its first use imports code
        with PeakMemory() as peak:
            done = depth_upscale(source, out / "model", recipe.upscale.drop_for(source.cfg.n_layers), recipe.upscale.copies)
    except SurgeryError as e:
        raise RecipeError(f"upscale: {e}") from None
    return [out / "model"], {**done, "peak_memory_growth_bytes": peak.growth}


def _continue_pretrain(recipe: Recipe, out: Path):
    from openmill.train.pretrain import run_pretrain

    cfg = recipe.continue_pretrain.pretrain_config(recipe.pretrain, _upscaled_model(recipe))
    return run_pretrain(recipe.model_copy(update={"pretrain": cfg}), out, _tokenizer_path(recipe), _tokens_dir(recipe))


def _generate(recipe: Recipe, out: Path):
    from openmill.sample import sample_stage

    return sample_stage(recipe, model_before(recipe, "generate"), out)


def _export(recipe: Recipe, out: Path):
    from openmill.export import export_gguf, export_hf

    cfg, model_dir, outputs = recipe.export, model_before(recipe, "export"), []
    if "hf" in cfg.formats:
        export_hf(model_dir, out / "hf", max_shard_bytes=cfg.max_shard_bytes, dtype=cfg.hf_dtype)
        outputs.append(out / "hf")
    if "gguf" in cfg.formats:
        outputs += [export_gguf(model_dir, out / f"model-{q}.gguf", qtype=q) for q in cfg.gguf_qtypes]
    return outputs, {"files": {str(p.relative_to(out)): _size(p) for p in outputs}}


def _sft_start(recipe: Recipe) -> Path:
    return recipe.sft.init_from or model_before(recipe, "sft")


def _dpo_start(recipe: Recipe) -> Path:
    return recipe.dpo.init_from or model_before(recipe, "dpo")


def _sft(recipe: Recipe, out: Path):
    from openmill.align.sft import run_sft

    return run_sft(recipe.sft, _sft_start(recipe), out, recipe.seed)


def _dpo(recipe: Recipe, out: Path):
    from openmill.align.dpo import run_dpo

    return run_dpo(recipe.dpo, _dpo_start(recipe), out, recipe.seed)


def _eval(recipe: Recipe, out: Path):
    from openmill.eval.stage import eval_stage

    return eval_stage(recipe, out)


def _eval_inputs(recipe: Recipe) -> list[Path]:
    from openmill.eval.stage import model_path

    return [model_path(recipe, recipe.eval), *recipe.eval.task_files]


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


STAGE_TABLE: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("curate", ("seed", "data", "curate"), _raw_files, _curate),
        Stage("tokenizer", ("seed", "data", "tokenizer"), _documents, _tokenizer),
        Stage("tokenize", ("data", "tokenize"), lambda r: [_tokenizer_path(r), *_documents(r)], _tokenize, folder="tokens"),
        Stage(
            "pretrain",
            ("seed", "data", "model", "pretrain"),
            lambda r: [_tokenizer_path(r), _tokens_dir(r)] + ([r.pretrain.init_from] if r.pretrain.init_from else []),
            _pretrain,
            distributed=True,
        ),
        Stage("upscale", ("upscale",), lambda r: [_upscale_source(r)], _upscale),
        Stage(
            "continue_pretrain",
            ("seed", "data", "pretrain", "continue_pretrain"),
            lambda r: [_tokenizer_path(r), _tokens_dir(r), _upscaled_model(r)],
            _continue_pretrain,
            distributed=True,
        ),
        Stage("generate", ("seed", "generate"), lambda r: [model_before(r, "generate")], _generate),
        Stage("export", ("export",), lambda r: [model_before(r, "export")], _export),
        Stage("sft", ("seed", "sft"), lambda r: [_sft_start(r), *r.sft.train, *r.sft.valid], _sft, distributed=True),
        Stage("dpo", ("seed", "dpo"), lambda r: [_dpo_start(r), *r.dpo.train, *r.dpo.valid], _dpo, distributed=True),
        Stage("eval", ("eval",), _eval_inputs, _eval),
    )
}


def preflight(recipe: Recipe) -> None:
    """Everything that can be checked before any work, each failure one line naming the field or file."""
    # The curate stage counts and rejects bad lines itself (unless curate.strict): there, only
    # missing files and empty corpora stop the run before it starts.
    strict = "curate" not in recipe.stages or recipe.curate.strict
    for name, domain in recipe.data.domains.items():
        for split in ("train", "valid"):
            where = f"data.domains.{name}.{split}"
            check_corpus(list(getattr(domain, split)), domain.text_field, where, strict=strict)
    p, m = recipe.pretrain, recipe.model
    try:
        model = m.resolved(vocab_size=m.vocab_size or recipe.tokenizer.vocab_size)
    except ValueError as e:
        raise RecipeError(f"model: {e}") from None
    for field, seq_len in p.window_lengths():
        if seq_len > model.max_seq_len:
            raise RecipeError(f"{field}: {seq_len} exceeds model.max_seq_len {model.max_seq_len}")
    if m.vocab_size is not None and m.vocab_size < recipe.tokenizer.vocab_size:
        raise RecipeError(f"model.vocab_size: {m.vocab_size} is smaller than tokenizer.vocab_size {recipe.tokenizer.vocab_size}")
    if p.init_from is not None and not (Path(p.init_from) / "model.json").is_file():
        raise RecipeError(f"pretrain.init_from: {p.init_from} is not a model folder (model.json missing)")
    _check_batch_splits(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    if "upscale" in recipe.stages and recipe.upscale.source is None:  # else the source's depth is checked when read
        from openmill.surgery.source import SurgeryError
        from openmill.surgery.upscale import dus_layer_map

        try:
            dus_layer_map(model.n_layers, recipe.upscale.drop_for(model.n_layers), recipe.upscale.copies)
        except SurgeryError as e:
            raise RecipeError(f"upscale.drop: {e}".replace("--drop", "drop")) from None


def _check_batch_splits(recipe: Recipe, processes: int) -> None:
    """Under torchrun (WORLD_SIZE processes) every process takes an equal share of each global
    batch in grad_accum micro-batches: checked for every training stage before the first runs."""
    p = recipe.pretrain
    splits = []
    if "pretrain" in recipe.stages:
        splits += [("pretrain.batch_size", p.batch_size, p.grad_accum)]
        splits += [(f"pretrain.phases.{ph.name}.batch_size", ph.batch_size, p.grad_accum) for ph in p.phases if ph.batch_size]
    if "continue_pretrain" in recipe.stages:
        field = "continue_pretrain.batch_size" if recipe.continue_pretrain.batch_size else "pretrain.batch_size"
        splits += [(field, recipe.continue_pretrain.batch_size or p.batch_size, p.grad_accum)]
    splits += [(f"{name}.batch_size", getattr(recipe, name).batch_size, getattr(recipe, name).grad_accum)
               for name in ("sft", "dpo") if name in recipe.stages]
    for field, size, accum in splits:
        check_batch_split(field, size, processes, accum)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def run_stage(recipe: Recipe, name: str, run: RunDir, force: bool = False, log=print) -> dict | None:
    stage = STAGE_TABLE[name]
    dump = recipe.model_dump(mode="json")
    config = {section: dump[section] for section in stage.sections}
    fp = fingerprint(config, stage.inputs(recipe))
    if _rank0_says(not force and run.is_up_to_date(stage.dir, fp)):
        log(f"[{name}] up to date, skipped (use --force to rerun)")
        return run.manifest(stage.dir)
    if not stage.distributed and not _is_main():
        dist.barrier()
        return None
    log(f"[{name}] running")
    started = time.time()
    outputs, metrics = stage.run(recipe, run.stage(stage.dir))
    manifest = None
    if _is_main():
        manifest = run.write_manifest(
            stage.dir, stage=name, config=config, fp=fp, inputs=stage.inputs(recipe), outputs=outputs, metrics=metrics, started=started
        )
        log(f"[{name}] done in {manifest['seconds']:.1f} s")
    if dist.is_initialized():  # the next stage's inputs are complete for every process
        dist.barrier()
    return manifest


def _rank0_says(answer: bool) -> bool:
    """Process 0's answer on every process: all must take the same branch, or the next collective hangs."""
    if not dist.is_initialized():
        return answer
    box = [answer]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_recipe(recipe: Recipe, stages: list[str] | None = None, force: bool = False, log=print) -> dict[str, dict]:
    """Run `stages` (default: the recipe's list) in order; returns each stage's manifest."""
    preflight(recipe)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: join the group before any stage
        from openmill.train.parallel import init_world

        init_world()
    run = RunDir(recipe.root)
    import yaml

    if _is_main():
        atomic_write_text(run.root / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
    results = {}
    try:
        for name in stages or recipe.stages:
            if name not in STAGE_TABLE:
                raise RecipeError(f"stages: unknown stage {name!r}; choices: {', '.join(STAGE_TABLE)}")
            results[name] = run_stage(recipe, name, run, force=force, log=log)
    finally:
        # Leaving a gloo/nccl group alive until interpreter exit lets its worker threads be torn down
        # in arbitrary order, which aborts the process ("terminate called without an active exception").
        if dist.is_initialized():
            dist.destroy_process_group()
    return results
