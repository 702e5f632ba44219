"""The `generate` stage and CLI verb: text samples from a trained or imported model folder."""

from __future__ import annotations

from pathlib import Path

from openmill.config import GenerateConfig, Recipe
from openmill.generate import generate
from openmill.rundir import atomic_write_json
from openmill.textmodel import load_text_model


def complete(model_dir: Path, prompts: list[str], cfg: GenerateConfig, seed: int) -> list[dict]:
    # The folder's own rules, openmill-trained or imported: what a document starts after (EOS for
    # openmill's shards, BOS for a model that adds one) and which ids end a generation.
    model, tok = load_text_model(model_dir)
    stop_ids = tok.stop_ids
    samples = []
    for i, prompt in enumerate(prompts):
        ids = generate(
            model,
            tok.document_prefix() + tok.encode(prompt),
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=seed + i,
            stop_ids=stop_ids,
        )
        # Special tokens other than the stop stay visible, as openmill's own tokenizer decodes them.
        completion = tok.decode([t for t in ids if t not in stop_ids], skip_special=False)
        samples.append({"prompt": prompt, "completion": completion})
    return samples


def sample_stage(recipe: Recipe, model_dir: Path, out: Path, log=print) -> tuple[list[Path], dict]:
    samples = complete(model_dir, recipe.generate.prompts, recipe.generate, recipe.seed)
    for s in samples:
        log(f"  {s['prompt']!r} -> {s['completion']!r}")
    atomic_write_json(out / "samples.json", samples)
    return [out / "samples.json"], {"samples": samples}
