"""Presets of published models: their parameter counts, on the meta device only, and config errors."""

import pytest
import torch
from pydantic import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaForCausalLM, MistralForCausalLM

from openmill.config import ModelConfig, RecipeError, load_recipe
from openmill.model import count_parameters
from openmill.presets import PRESETS, PUBLISHED

from .test_model import hf_config


class DevicesTouched(TorchDispatchMode):
    """Records the device of every tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.devices: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.devices |= {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        return out


def test_every_preset_has_a_published_count():
    assert set(PUBLISHED) == set(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_published_figure_on_meta_device(name):
    cfg = ModelConfig(preset=name).resolved()
    with DevicesTouched() as touched:
        ours = count_parameters(cfg)
    assert touched.devices == {"meta"}  # every tensor it made (weights, RoPE tables) is on meta: nothing allocated
    published = PUBLISHED[name].params
    assert abs(ours - published) / published <= 0.005, f"{name}: {ours:,} vs published {published:,.0f}"


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_equals_transformers_count(name):
    """The same shape built by the real consumer (LlamaForCausalLM / MistralForCausalLM) on meta."""
    cfg = ModelConfig(preset=name).resolved()
    arch = "mistral" if cfg.sliding_window is not None else "llama"
    with torch.device("meta"):
        hf = (MistralForCausalLM if arch == "mistral" else LlamaForCausalLM)(hf_config(cfg, arch))
    assert count_parameters(cfg) == sum(p.numel() for p in hf.parameters())


def test_explicit_fields_override_a_preset():
    cfg = ModelConfig(preset="mistral-7b", n_layers=2, sliding_window=None).resolved()
    assert (cfg.n_layers, cfg.sliding_window, cfg.dim, cfg.n_kv_heads) == (2, None, 4096, 8)


def test_heads_not_divisible_by_kv_heads_fails_naming_both_fields():
    with pytest.raises(ValidationError, match=r"n_heads \(6\) must be a positive multiple of n_kv_heads \(4\)"):
        ModelConfig(dim=96, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValidationError, match=r"n_heads \(32\) must be a positive multiple of n_kv_heads \(5\)"):
        ModelConfig(preset="mistral-7b", n_heads=32, n_kv_heads=5).resolved()


def test_valid_kv_override_of_a_preset_is_accepted():
    assert ModelConfig(preset="llama2-7b", n_kv_heads=16).resolved().n_kv_heads == 16


def test_unknown_preset_fails_at_load_naming_the_choices(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\ndata: {domains: {en: {train: [a], valid: [b]}}}\nmodel: {preset: llama3-8b}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    msg = str(err.value)
    assert f"{recipe}: model: unknown preset 'llama3-8b'; choices: " in msg
    assert all(name in msg for name in PRESETS)


def test_tokenizer_vocab_beats_preset_vocab_unless_set_explicitly():
    assert ModelConfig(preset="llama2-7b").resolved(vocab_size=8192).vocab_size == 8192
    assert ModelConfig(preset="llama2-7b").resolved().vocab_size == 32000
    assert ModelConfig(preset="llama2-7b", vocab_size=32768).resolved(vocab_size=8192).vocab_size == 32768
