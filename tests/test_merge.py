"""Weight-averaging merges: a checkpoint merged with itself comes back bit for bit, linear and slerp
match their formulas, and checkpoints of different shapes, configs or tokenizers are refused naming
the first difference."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openmill.surgery.merge import merge, slerp
from openmill.surgery.source import SurgeryError
from openmill.train.pretrain import load_model_folder

from .test_export_hf import ids, make_model_folder, tokenizer_path  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("merge")
    return (make_model_folder(root / "a", tokenizer_path, seed=1, n_layers=2),
            make_model_folder(root / "b", tokenizer_path, seed=2, n_layers=2))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("how", [dict(weights=[0.3, 0.7]), dict(weights=[1, 1, 1]), dict(method="slerp", t=0.37)])
def test_merge_with_itself_returns_it_exactly(pair, tmp_path, how):
    a = pair[0]
    n = len(how.get("weights", [0, 0]))
    merge([a] * n, tmp_path / "m", **how)
    before, after = weights(a), weights(tmp_path / "m")
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_linear_merge_is_the_weighted_mean(pair, tmp_path):
    merge(list(pair), tmp_path / "m", weights=[1, 3])
    a, b, m = weights(pair[0]), weights(pair[1]), weights(tmp_path / "m")
    for k in m:
        torch.testing.assert_close(m[k], 0.25 * a[k] + 0.75 * b[k], rtol=1e-6, atol=1e-7)
    model, cfg = load_model_folder(tmp_path / "m")
    assert cfg.n_layers == 2 and torch.isfinite(model(ids())).all()


def test_slerp_keeps_the_norm_between_orthogonal_tensors_and_ends_at_each_side():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    torch.testing.assert_close(slerp(a, b, 0.5), torch.tensor([3.0, 3.0]) / 2**0.5)  # |.| stays 3, linear gives 2.12
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)


def test_slerp_merge_of_two_checkpoints(pair, tmp_path):
    merge(list(pair), tmp_path / "s", method="slerp", t=0.25)
    a, b, s = weights(pair[0]), weights(pair[1]), weights(tmp_path / "s")
    name = "layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(s[name], slerp(a[name], b[name], 0.25))
    # On unit vectors slerp walks the great circle: a quarter of the way = a quarter of the angle.
    ua, ub = a[name].flatten() / a[name].norm(), b[name].flatten() / b[name].norm()
    angle = (ua @ ub).acos()
    torch.testing.assert_close((slerp(ua, ub, 0.25) @ ua).acos(), 0.25 * angle, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(slerp(ua, ub, 0.25).norm(), torch.tensor(1.0))


def test_different_shapes_fail_naming_the_first_tensor(pair, tmp_path, tokenizer_path):
    wider = make_model_folder(tmp_path / "w", tokenizer_path, n_layers=2, ffn_dim=128)
    # In model order, a layer's tensors sort input_layernorm, mlp.down_proj, ...: down_proj differs first.
    with pytest.raises(SurgeryError, match=r"tensor layers\.0\.mlp\.down_proj\.weight has shape \(64, 96\) in .* but \(64, 128\)"):
        merge([pair[0], wider], tmp_path / "m")
    deeper = make_model_folder(tmp_path / "d", tokenizer_path, n_layers=3)
    with pytest.raises(SurgeryError, match=r"tensor layers\.2\.input_layernorm\.weight is missing in .*/a/model"):
        merge([deeper, pair[0]], tmp_path / "m")


@pytest.mark.parametrize("fields,difference", [
    (dict(rope_theta=5e5), "model config field rope_theta is 10000.0 in {a} but 500000.0 in {b}"),
    (dict(tie_embeddings=True), "model config field tie_embeddings is False in {a} but True in {b}"),
    (dict(sliding_window=16), "model config field sliding_window is None in {a} but 16 in {b}"),
], ids=["rope_theta", "tie_embeddings", "sliding_window"])
def test_same_shapes_but_different_configs_fail_naming_the_field(pair, tmp_path, tokenizer_path, fields, difference):
    # A tied model stores lm_head too, and RoPE base and window have no tensors: every shape agrees.
    other = make_model_folder(tmp_path, tokenizer_path, seed=2, n_layers=2, **fields)
    with pytest.raises(SurgeryError) as err:
        merge([pair[0], other], tmp_path / "m")
    assert str(err.value) == "merge: " + difference.format(a=pair[0], b=other)
    assert not (tmp_path / "m").exists()


def test_different_tokenizers_fail_naming_the_field(pair, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(pair[1], other)
    meta = json.loads((other / "model.json").read_text())
    meta["tokenizer"]["bos_token"] = "<|pad|>"
    (other / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SurgeryError) as err:
        merge([pair[0], other], tmp_path / "m")
    assert str(err.value) == f"merge: tokenizer field bos_token is '<|bos|>' in {pair[0]} but '<|pad|>' in {other}"
    shutil.copy(pair[1] / "model.json", other / "model.json")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][:-1]  # same special tokens, other BPE
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(SurgeryError) as err:
        merge([pair[0], other], tmp_path / "m")
    assert str(err.value) == f"merge: tokenizer.json field model differs between {pair[0]} and {other}"


def test_bad_arguments(pair, tmp_path):
    with pytest.raises(SurgeryError, match="--weights: 3 weights for 2 checkpoints"):
        merge(list(pair), tmp_path / "m", weights=[1, 2, 3])
    with pytest.raises(SurgeryError, match="slerp: interpolates exactly two"):
        merge([*pair, pair[0]], tmp_path / "m", method="slerp")
    with pytest.raises(SurgeryError, match="needs at least two"):
        merge([pair[0]], tmp_path / "m")


def test_cli_refuses_different_shapes_in_one_line(pair, tmp_path, tokenizer_path):
    deeper = make_model_folder(tmp_path / "d", tokenizer_path, n_layers=3)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "openmill.cli", "merge", str(pair[0]), str(deeper), "--out", str(tmp_path / "m")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: merge: tensor layers.2.input_layernorm.weight is missing")
    assert not (tmp_path / "m").exists()
