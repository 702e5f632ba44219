"""The `generate` stage and CLI verb: text samples from a trained model folder."""

from __future__ import annotations

from pathlib import Path

from openmill.config import GenerateConfig, Recipe
from openmill.generate import generate
from openmill.rundir import atomic_write_json
from openmill.tokenizer import Tokenizer


def complete(model_dir: Path, prompts: list[str], cfg: GenerateConfig, seed: int) -> list[dict]:
    from openmill.train.pretrain import load_model_folder

    model, _ = load_model_folder(model_dir)
    tok = Tokenizer.load(Path(model_dir) / "tokenizer.json")
    samples = []
    for i, prompt in enumerate(prompts):
        ids = generate(
            model,
            # Shards separate documents with EOS (no BOS), so EOS is what a document starts after.
            [tok.eos_id, *tok.encode(prompt)],
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=seed + i,
            stop_ids=(tok.eos_id,),
        )
        samples.append({"prompt": prompt, "completion": tok.decode([t for t in ids if t != tok.eos_id])})
    return samples


def sample_stage(recipe: Recipe, model_dir: Path, out: Path, log=print) -> tuple[list[Path], dict]:
    samples = complete(model_dir, recipe.generate.prompts, recipe.generate, recipe.seed)
    for s in samples:
        log(f"  {s['prompt']!r} -> {s['completion']!r}")
    atomic_write_json(out / "samples.json", samples)
    return [out / "samples.json"], {"samples": samples}
