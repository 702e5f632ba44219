"""Bad input fails before any work with one line naming the file or field (through the real CLI)."""

import pytest
import torch
from typer.testing import CliRunner

from openmill.cli import app
from openmill.config import ModelConfig, load_recipe
from openmill.model import build_model
from openmill.stages import run_recipe
from openmill.train.pretrain import load_model_folder, save_trained_model

from .conftest import REPO

TINY = str(REPO / "recipes" / "tiny.yaml")


def run_cli(*args):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output.strip()


def fail_line(*args) -> str:
    code, out = run_cli(*args)
    assert code == 2, out
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def test_missing_file(tmp_path):
    line = fail_line("run", TINY, "--set", f"run_dir={tmp_path}", "--set", "data.domains.en.train=[nope/en.jsonl]")
    assert line == "error: nope/en.jsonl: file not found"
    assert not (tmp_path / "tokenizer").exists()  # nothing ran


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n\n')
    line = fail_line("run", TINY, "--set", f"run_dir={tmp_path}", "--set", f"data.domains.zh.valid=[{empty}]")
    assert line == f"error: {empty}: empty corpus (no non-empty documents) in data.domains.zh.valid"


# Without curate (or with curate.strict) a bad line stops the run before any work; with curate
# in lenient mode it is counted and written to the rejects instead (tests/test_curate_stage.py).
STRICT_WAYS = [["--set", "stages=[tokenizer,tokenize,pretrain]"], ["--set", "curate.strict=true"]]


@pytest.mark.parametrize("how", STRICT_WAYS, ids=["no-curate", "curate-strict"])
def test_non_utf8_file(tmp_path, how):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    line = fail_line("run", TINY, "--set", f"run_dir={tmp_path}", "--set", f"data.domains.en.train=[{bad}]", *how)
    assert line.startswith(f"error: {bad}:1: not valid UTF-8")


@pytest.mark.parametrize("how", STRICT_WAYS, ids=["no-curate", "curate-strict"])
def test_missing_text_field(tmp_path, how):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"content": "x"}\n')
    line = fail_line("run", TINY, "--set", f"run_dir={tmp_path}", "--set", f"data.domains.en.train=[{bad}]", *how)
    assert line.startswith(f"error: {bad}:1:") and "'text'" in line


def test_impossible_shape():
    line = fail_line("run", TINY, "--set", "model.n_heads=8", "--set", "model.n_kv_heads=3")
    assert line == f"error: {TINY}: model: n_heads (8) must be a positive multiple of n_kv_heads (3)"


def test_sequence_longer_than_model():
    line = fail_line("run", TINY, "--set", "pretrain.seq_len=4096")
    assert line == "error: pretrain.seq_len: 4096 exceeds model.max_seq_len 512"


def test_unknown_key():
    line = fail_line("pretrain", TINY, "--set", "pretrain.step=3")
    assert "pretrain.step: unknown key (did you mean 'steps'?)" in line


def test_export_and_import_round_trip_through_the_cli(tmp_path):
    """A model folder -> GGUF (f16) -> imported back through the CLI: the same logits up to f16 rounding."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2).resolved())
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"run_dir={tmp_path / 'run'}", "stages=[tokenizer]",
                                                          "tokenizer.vocab_size=1024", "tokenizer.max_train_bytes=200000"])
    run_recipe(recipe)
    save_trained_model(tmp_path / "m", model, tmp_path / "run" / "tokenizer" / "tokenizer.json", {})
    code, out = run_cli("export", str(tmp_path / "m"), "--format", "gguf", "--qtype", "f16", "--out", str(tmp_path / "m.gguf"))
    assert code == 0, out
    code, out = run_cli("import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back"))
    assert code == 0, out
    back, _ = load_model_folder(tmp_path / "back")
    x = torch.randint(0, 1024, (1, 12))
    with torch.no_grad():
        assert (model(x) - back(x)).abs().max() < 1e-2 * model(x).abs().max()
    assert fail_line("export", str(tmp_path / "m"), "--format", "onnx", "--out", str(tmp_path / "x")) == (
        "error: --format: expected hf or gguf, got 'onnx'"
    )
