"""Muon: the Newton-Schulz step orthogonalizes, the optimizer splits parameters as documented,
and a crashed muon run resumes bit for bit (its momentum and Adam states are checkpointed)."""

import pytest
import torch

from openmill.config import ModelConfig, PretrainConfig
from openmill.model import Transformer
from openmill.stages import run_recipe
from openmill.train.muon import Muon, hidden_matrices, orthogonalize

from .test_pretrain import crash_pretrain_at_step_10, fresh_run, losses, prepared  # noqa: F401 (fixture)


@pytest.mark.parametrize("shape", [(96, 32), (32, 160), (128, 384)])
def test_orthogonalize_flattens_the_singular_values(shape):
    spread = torch.diag(torch.logspace(-1, 0, shape[1]))  # columns scaled over a decade
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) @ spread
    before, after = torch.linalg.svdvals(g), torch.linalg.svdvals(orthogonalize(g))
    assert before.max() / before.min() > 4
    # The quintic iteration is tuned for speed, not exact convergence: singular values land in
    # ~[0.68, 1.13] (measured) whatever their spread, which is what equalizes the update's directions.
    assert after.min() > 0.65 and after.max() < 1.2


def test_hidden_matrices_get_muon_the_rest_adamw():
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16).resolved())
    opt = Muon(model, lr=1e-3, weight_decay=0.1)
    muon = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per block
    no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0.0][0]["params"]
    assert all(p.dim() == 1 for p in no_decay)
    assert hidden_matrices(torch.nn.ModuleDict({"module": model})) != set()  # found under a wrapper too


def test_muon_with_fsdp_is_refused():
    with pytest.raises(ValueError, match="muon needs whole matrices"):
        PretrainConfig(optimizer="muon", parallel="fsdp")


def test_muon_run_resumes_bit_exact_after_crash(prepared, tmp_path, monkeypatch):
    extra = ["pretrain.optimizer=muon"]
    whole, whole_root = fresh_run(prepared, tmp_path / "a", extra)
    run_recipe(whole, ["pretrain"])
    reference = losses(whole_root)

    crashed, root = fresh_run(prepared, tmp_path / "b", extra)
    crash_pretrain_at_step_10(crashed, monkeypatch)
    run_recipe(crashed, ["pretrain"])
    assert losses(root) == reference
    first, last = reference[1], reference[max(reference)]
    assert last < first  # and it learns
