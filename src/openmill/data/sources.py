"""Which document files feed the tokenizer and tokenize stages.

With `curate` among the recipe's stages, they read the curated shards in the run directory;
otherwise the raw files named in `data.domains`.
"""

from __future__ import annotations

from pathlib import Path

from openmill.config import Recipe
from openmill.data.readers import DataError, expand_paths


def curated_dir(run_root: Path, domain: str, split: str) -> Path:
    """Where the curate stage writes the clean documents of one domain and split."""
    return Path(run_root) / "curate" / domain / split


def document_files(recipe: Recipe, domain: str, split: str) -> tuple[list[Path], str]:
    """(files, text_field) for one domain and split ("train" or "valid")."""
    if "curate" in recipe.stages:
        folder = curated_dir(recipe.root, domain, split)
        files = sorted(folder.glob("*.jsonl*"))
        if not files:
            raise DataError(f"{folder}: no curated documents; run the curate stage first (it is in this recipe's stages)")
        return files, "text"
    spec = recipe.data.domains[domain]
    return expand_paths(list(getattr(spec, split))), spec.text_field
