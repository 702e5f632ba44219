"""Which model each stage works on: the newest one the stages listed before it produce."""

from pathlib import Path

import yaml

from openmill.config import load_recipe
from openmill.stages import latest_model_in_run, model_before

from .conftest import REPO


def recipe(stages, **extra):
    sets = [f"stages=[{','.join(stages)}]", "run_dir=/r", *[f"{k}={v}" for k, v in extra.items()]]
    return load_recipe(REPO / "recipes" / "tiny.yaml", sets)


def test_each_stage_takes_the_newest_model_before_it():
    full = recipe(["pretrain", "upscale", "continue_pretrain", "generate", "sft", "dpo", "eval", "export"])
    expected = {
        "upscale": "pretrain/final", "continue_pretrain": "upscale/model", "generate": "continue_pretrain/final",
        "sft": "continue_pretrain/final", "dpo": "sft/final", "eval": "dpo/final", "export": "dpo/final",
    }  # fmt: skip
    assert {s: str(model_before(full, s).relative_to("/r")) for s in expected} == expected
    # Dropping stages re-chains the rest; a stage the recipe does not list gets the newest model.
    short = recipe(["pretrain", "dpo", "export"])
    assert model_before(short, "dpo") == Path("/r/pretrain/final")
    assert model_before(short, "export") == Path("/r/dpo/final") == model_before(short, "eval")
    assert model_before(recipe(["export"]), "export") == Path("/r/pretrain/final")
    # An unlisted stage stands where the usual pipeline puts it.
    assert model_before(short, "sft") == Path("/r/pretrain/final")
    assert model_before(recipe(["pretrain", "sft", "eval"]), "generate") == Path("/r/pretrain/final")


def test_explicit_sources_win():
    r = recipe(["pretrain", "sft", "dpo"], **{"dpo.init_from": "/elsewhere/model"})
    from openmill.stages import _dpo_start

    assert _dpo_start(r) == Path("/elsewhere/model")


def test_latest_model_in_a_run_directory(tmp_path):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"stages": ["pretrain", "sft", "eval"]}))
    assert latest_model_in_run(tmp_path) is None
    for folder in ("pretrain/final", "dpo/final"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "model.json").write_text("{}")
    assert latest_model_in_run(tmp_path) == tmp_path / "pretrain" / "final"  # dpo/final is not this recipe's
    (tmp_path / "sft/final").mkdir(parents=True)
    (tmp_path / "sft/final/model.json").write_text("{}")
    assert latest_model_in_run(tmp_path) == tmp_path / "sft" / "final"


def test_pipeline_order_names_every_stage():
    from openmill.stages import PIPELINE_ORDER, STAGE_TABLE

    assert sorted(PIPELINE_ORDER) == sorted(STAGE_TABLE)
