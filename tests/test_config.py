"""Recipes: loading, overrides, and one-line errors that name the file and field."""

from pathlib import Path

import pytest

from openmill.config import RecipeError, load_recipe, parse_override

from .conftest import REPO

TINY = REPO / "recipes" / "tiny.yaml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


MINIMAL = """
name: t
data:
  domains:
    en: {train: [a.jsonl], valid: [b.jsonl]}
"""


def test_tiny_recipe_loads_with_overrides():
    r = load_recipe(TINY, ["pretrain.steps=7", "model.n_layers=2", "generate.prompts=[hi]"])
    assert r.pretrain.steps == 7 and r.model.n_layers == 2 and r.generate.prompts == ["hi"]
    assert r.root == Path("runs/tiny")


def test_unknown_key_names_field_and_choices(tmp_path):
    p = write(tmp_path, MINIMAL + "pretrain:\n  lrr: 0.1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "pretrain.lrr: unknown key" in msg and "did you mean 'lr'" in msg and "warmup_steps" in msg
    assert str(p) in msg


def test_mistyped_override_is_reported(tmp_path):
    with pytest.raises(RecipeError, match=r"model\.n_layer: unknown key \(did you mean 'n_layers'\?\)"):
        load_recipe(write(tmp_path, MINIMAL), ["model.n_layer=3"])


def test_wrong_type_names_field(tmp_path):
    with pytest.raises(RecipeError, match=r"pretrain\.steps: Input should be a valid integer"):
        load_recipe(write(tmp_path, MINIMAL), ["pretrain.steps=many"])


def test_impossible_model_shape(tmp_path):
    with pytest.raises(RecipeError, match=r"model: n_heads \(6\) must be a positive multiple of n_kv_heads \(4\)"):
        load_recipe(write(tmp_path, MINIMAL), ["model.n_heads=6", "model.n_kv_heads=4"])


def test_mixture_names_unknown_domain(tmp_path):
    with pytest.raises(RecipeError, match=r"pretrain.mixture.fr: unknown domain; choices: en"):
        load_recipe(write(tmp_path, MINIMAL), ["pretrain.mixture={fr: 1.0}"])


def test_unknown_stage(tmp_path):
    with pytest.raises(RecipeError, match=r"stages.0: Input should be 'curate', 'tokenizer'"):
        load_recipe(write(tmp_path, MINIMAL), ["stages=[tokenise]"])


def test_override_syntax():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    with pytest.raises(RecipeError, match="expected key=value"):
        parse_override("a.b")
    for bad in ("pretrain={a: 1", "name=!!python/name:os.system"):  # one line, never a traceback
        with pytest.raises(RecipeError, match=r"^--set .*: the value is not valid YAML \(.*\); quote it"):
            parse_override(bad)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_derived_fields_filled_only_when_unset():
    from openmill.config import ModelConfig

    cfg = ModelConfig(dim=256, n_heads=8, head_dim=64, ffn_dim=100).resolved(vocab_size=1000)
    assert (cfg.head_dim, cfg.ffn_dim, cfg.n_kv_heads, cfg.vocab_size) == (64, 100, 8, 1000)
    auto = ModelConfig(dim=256, n_heads=8).resolved(vocab_size=1000)
    assert auto.head_dim == 32 and auto.ffn_dim == 704  # 8/3 * 256 = 682.7 -> multiple of 64
