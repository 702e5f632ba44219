"""Depth Up-Scaling: the layer maps, the streamed copy from openmill and Hugging Face folders, the
result's parity with transformers, its peak memory, and the refusals of --drop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from openmill.export import export_hf
from openmill.surgery.source import SurgeryError
from openmill.surgery.upscale import depth_upscale, dus_layer_map, upscale
from openmill.surgery.tensorfile import PeakMemory
from openmill.train.pretrain import load_model_folder

from .test_export_hf import VOCAB, ids, make_model_folder, tokenizer_path  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def src(tmp_path_factory, tokenizer_path) -> Path:
    """A 6-layer tied GQA model with randomised weights, as training writes it."""
    return make_model_folder(tmp_path_factory.mktemp("up"), tokenizer_path, n_layers=6, tie_embeddings=True)


def test_solar_preset_and_the_benchmark_maps():
    solar = dus_layer_map(32, 8)
    assert len(solar) == 48 and solar == [*range(24), *range(8, 32)]
    assert dus_layer_map(8, 2) == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    # k copies: the middle ones lose m layers at both ends.
    assert dus_layer_map(8, 2, copies=3) == [*range(6), *range(2, 6), *range(2, 8)]
    assert dus_layer_map(4, 0) == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize(
    "drop, reason",
    [
        (4, "must be less than half of the source's 8 layers (m < 4); with m >= n/2 two copies keep 2(n-m) = 8 layers"),
        (5, "must be less than half"),
        ("2.5", "expected a whole number of layers, got '2.5'"),
        ("two", "expected a whole number of layers, got 'two'"),
        (-1, "must be >= 0"),
    ],
)
def test_bad_drop_fails_with_the_reason(drop, reason):
    with pytest.raises(SurgeryError, match="--drop") as e:
        dus_layer_map(8, drop)
    assert reason in str(e.value)


def test_upscaled_layers_are_the_mapped_source_layers(src, tmp_path):
    done = depth_upscale(src, tmp_path / "up", drop=2)
    assert done["layer_map"] == [0, 1, 2, 3, 2, 3, 4, 5] and done["layers"] == 8
    before, after = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "up" / "model.safetensors"))
    for name, t in after.items():
        parts = name.split(".")
        if parts[0] == "layers":
            parts[1] = str(done["layer_map"][int(parts[1])])
        assert torch.equal(t, before[".".join(parts)]), name
    meta = json.loads((tmp_path / "up" / "model.json").read_text())
    assert meta["model"]["n_layers"] == 8
    assert meta["source"]["upscale"]["layer_map"] == done["layer_map"]
    assert meta["source"]["upscale"]["drop"] == 2 and meta["tokenizer"]["eos_token"]
    assert (tmp_path / "up" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


@torch.no_grad()
def test_identity_map_gives_the_same_logits(src, tmp_path):
    upscale(src, tmp_path / "same", list(range(6)))
    a, _ = load_model_folder(src)
    b, _ = load_model_folder(tmp_path / "same")
    assert torch.equal(a(ids()), b(ids()))


@torch.no_grad()
def test_from_a_sharded_hf_folder_same_result_and_loads_in_transformers(src, tmp_path):
    # Sharded HF source, tied (no lm_head tensor in it): the result must equal the openmill-source one.
    export_hf(src, tmp_path / "hf", max_shard_bytes=200_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    depth_upscale(tmp_path / "hf", tmp_path / "from_hf", drop=1, copies=3)
    depth_upscale(src, tmp_path / "from_om", drop=1, copies=3)
    a, b = load_file(str(tmp_path / "from_hf" / "model.safetensors")), load_file(str(tmp_path / "from_om" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours, cfg = load_model_folder(tmp_path / "from_hf")
    assert cfg.n_layers == 14  # 5 + 4 + 5
    export_hf(tmp_path / "from_hf", tmp_path / "hf_up")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf_up", dtype=torch.float32).eval()
    torch.testing.assert_close(hf(ids()).logits, ours(ids()), rtol=1e-4, atol=1e-4)


def test_bad_layer_map_and_bad_source(src, tmp_path):
    with pytest.raises(SurgeryError, match=r"source layers must lie in 0..5, got \[6\]"):
        upscale(src, tmp_path / "x", [0, 6])
    with pytest.raises(SurgeryError, match="neither an openmill model folder"):
        depth_upscale(tmp_path, tmp_path / "y", drop=1)


def test_peak_memory_is_about_one_tensor_not_the_model(tokenizer_path, tmp_path):
    # 16 layers of dim 256: ~46 MiB of model, ~70 MiB written; the largest tensor (an MLP matrix) is 0.7 MiB.
    src = make_model_folder(tmp_path, tokenizer_path, dim=256, n_layers=16, n_heads=4, n_kv_heads=2, ffn_dim=704)
    with PeakMemory() as peak:
        done = depth_upscale(src, tmp_path / "up", drop=4)
    largest = done["largest_tensor_bytes"]
    assert largest == 704 * 256 * 4 and peak.growth is not None
    assert done["bytes_written"] > 80 * largest
    assert peak.growth < 2 * largest + (1 << 20), (peak.growth, largest)


def test_cli_reports_the_map_and_refuses_bad_drop(src, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "openmill.cli", "upscale", str(src), "--out", str(tmp_path / "up")]
    ok = subprocess.run([*cmd, "--drop", "1"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "10 layers from 6" in ok.stdout and "4<-4, 5<-1, 6<-2" in ok.stdout
    bad = subprocess.run([*cmd, "--drop", "3"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "error: --drop 3: must be less than half" in bad.stderr


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_30_to_48_layers_streams_and_loads_in_transformers(smollm2_folder, tmp_path):
    """The real model (benchmarks/dus.md has the perplexity and throughput): peak memory stays
    under 2 x the largest tensor + one shard, and transformers runs the result as openmill does."""
    from openmill.surgery.source import open_checkpoint

    ckpt = open_checkpoint(smollm2_folder)
    shard = 128 * 2**20
    with PeakMemory() as peak:
        done = depth_upscale(ckpt, tmp_path / "up", drop=6)
    assert done["layers"] == 48 and done["layer_map"] == [*range(24), *range(6, 30)]
    assert peak.growth < 2 * done["largest_tensor_bytes"] + shard, peak.growth
    with PeakMemory() as export_peak:
        export_hf(tmp_path / "up", tmp_path / "hf", max_shard_bytes=shard)
    assert export_peak.growth < 2 * done["largest_tensor_bytes"] + shard, export_peak.growth
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours, _ = load_model_folder(tmp_path / "up")
    x = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 216]])
    torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-4, atol=1e-4)
