"""The upscale and continue_pretrain stages in a recipe: pretrain -> DUS -> continued pretraining
with a fresh optimizer and its own warm-up, and the skip-if-unchanged rule across the three."""

import json

import pytest

from openmill.config import RecipeError, load_recipe
from openmill.stages import preflight, run_recipe
from openmill.train.metrics import read_metrics
from openmill.train.pretrain import load_model_folder

from .test_pretrain import SMALL, TINY, fresh_run, prepared  # noqa: F401 (fixture)

DUS = ["stages=[tokenizer,tokenize,pretrain,upscale,continue_pretrain]", "model.n_layers=4", "pretrain.steps=4", "upscale.drop=1", "continue_pretrain.steps=3",
       "continue_pretrain.warmup_steps=2", "continue_pretrain.lr=1e-3", "continue_pretrain.eval_every=3",
       "continue_pretrain.checkpoint_every=3"]
STAGES = ["pretrain", "upscale", "continue_pretrain"]


def test_pretrain_upscale_continue(prepared, tmp_path):
    recipe, root = fresh_run(prepared, tmp_path, DUS)
    results = run_recipe(recipe, STAGES)
    up = results["upscale"]["metrics"]
    assert up["layer_map"] == [0, 1, 2, 1, 2, 3] and up["peak_memory_growth_bytes"] is not None
    model, cfg = load_model_folder(root / "continue_pretrain" / "final")
    assert cfg.n_layers == 6
    # Its own schedule from step 0: warm-up 2 steps to 1e-3 (pretrain's is 3e-3 after 2 warm-up steps).
    lrs = [r["lr"] for r in read_metrics(root / "continue_pretrain" / "metrics.jsonl") if "lr" in r]
    assert lrs[:2] == [pytest.approx(5e-4), pytest.approx(1e-3)]
    cont = results["continue_pretrain"]["metrics"]
    assert cont["tokens"] == 3 * 8 * 32
    manifest = json.loads((root / "continue_pretrain" / "manifest.json").read_text())
    assert str(root / "upscale" / "model") in [i["path"] for i in manifest["inputs"]]

    # Unchanged: both skipped. A new drop re-runs upscale, and continue_pretrain sees the new weights.
    messages = []
    run_recipe(recipe, ["upscale", "continue_pretrain"], log=messages.append)
    assert sum("up to date, skipped" in m for m in messages) == 2
    changed = load_recipe(TINY, SMALL + [f"run_dir={root}", *DUS, "upscale.drop=0"])
    messages.clear()
    run_recipe(changed, ["upscale", "continue_pretrain"], log=messages.append)
    assert "[upscale] running" in messages and "[continue_pretrain] running" in messages
    assert load_model_folder(root / "continue_pretrain" / "final")[1].n_layers == 8


def test_preflight_refuses_a_drop_of_half_the_layers(prepared, tmp_path):
    recipe, _ = fresh_run(prepared, tmp_path, [*DUS, "upscale.drop=2", "stages=[pretrain,upscale]"])
    with pytest.raises(RecipeError, match=r"upscale.drop: drop 2: must be less than half of the source's 4 layers"):
        preflight(recipe)
