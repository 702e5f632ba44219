"""Bad input fails before any work with one line naming the file or field (through the real CLI)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from openmill.cli import app, main
from openmill.config import ModelConfig, load_recipe
from openmill.model import build_model
from openmill.stages import run_recipe
from openmill.train.pretrain import load_model_folder, save_trained_model

from .conftest import REPO
from .test_export_hf import make_model_folder, tokenizer_path  # noqa: F401 (fixture)

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


@pytest.mark.parametrize(
    "args, line",
    [
        (["generate"], "error: Missing argument 'model'. (see `openmill generate --help`)"),
        (["serve", "x", "--port", "99999"],
         "error: Invalid value for '--port': Input should be less than or equal to 65535 (see `openmill serve --help`)"),
        (["nosuch"], "error: No such command 'nosuch'. (see `openmill --help`)"),
    ],
)
def test_usage_errors_of_the_entry_point_are_one_line(args, line, capsys):
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == line  # not Typer's boxed panel


def test_the_entry_point_passes_on_exit_statuses(capsys):
    assert main(["generate", "--help"]) == 0 and "--prompt" in capsys.readouterr().out
    assert main(["generate", "/nonexistent", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.startswith("error: /nonexistent: ")


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


def test_import_of_a_config_without_hidden_size(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 512, "num_hidden_layers": 2,
                                                 "num_attention_heads": 4, "intermediate_size": 128}))
    line = fail_line("import", str(src), "--out", str(tmp_path / "out"))
    expected = f"error: {src / 'config.json'}: field hidden_size: expected a positive integer, got nothing (missing)"
    assert line == expected


# model.json's config as a hand edit can break it: a misspelt key, a value of the wrong type.
BAD_MODEL_FIELDS = [
    ("n_heads", "n_head", 4, "field model.n_head: unknown key (did you mean 'n_heads'?)"),
    ("dim", "dim", "sixty-four", "field model.dim: expected a valid integer, unable to parse string as an integer, "
                                 "got 'sixty-four'"),
]


@pytest.mark.parametrize("command", [["export", "--format", "hf"], ["upscale", "--drop", "1"], ["merge"]])
@pytest.mark.parametrize("old,new,value,problem", BAD_MODEL_FIELDS, ids=["misspelt", "mistyped"])
def test_model_folder_with_a_bad_config_field(tmp_path, tokenizer_path, command, old, new, value, problem):
    folder = make_model_folder(tmp_path, tokenizer_path)
    meta = json.loads((folder / "model.json").read_text())
    del meta["model"][old]
    meta["model"][new] = value
    (folder / "model.json").write_text(json.dumps(meta))
    sources = [str(folder)] * (2 if command[0] == "merge" else 1)
    line = fail_line(command[0], *sources, *command[1:], "--out", str(tmp_path / "out"))
    assert line == f"error: {folder / 'model.json'}: {problem}"
    assert not (tmp_path / "out").exists()


def test_upscale_of_a_truncated_weights_file(tmp_path, tokenizer_path):
    folder = make_model_folder(tmp_path, tokenizer_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # the header still lists the last tensor in full
    line = fail_line("upscale", str(folder), "--drop", "0", "--out", str(tmp_path / "out"))
    assert line == f"error: {weights}: file ends inside a tensor (truncated?)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["export", "--format", "hf"], ["upscale", "--drop", "1"], ["merge"]])
def test_model_json_that_is_not_json(tmp_path, tokenizer_path, command):
    folder = make_model_folder(tmp_path, tokenizer_path)
    text = (folder / "model.json").read_text()
    (folder / "model.json").write_text(text[: len(text) // 2])  # an editor's crash, a full disk
    sources = [str(folder)] * (2 if command[0] == "merge" else 1)
    line = fail_line(command[0], *sources, *command[1:], "--out", str(tmp_path / "out"))
    assert line.startswith(f"error: {folder / 'model.json'}: not valid JSON (")
    assert not (tmp_path / "out").exists()


def test_out_never_replaces_a_folder_of_other_files(tmp_path, tokenizer_path):
    folder = make_model_folder(tmp_path, tokenizer_path)
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for command in (["export", str(folder), "--format", "hf"], ["upscale", str(folder), "--drop", "0"],
                    ["merge", str(folder), str(folder)], ["import", str(folder)]):
        line = fail_line(*command, "--out", str(mine))
        assert line.startswith(f"error: --out {mine}: exists and holds something other than a model")
    assert (mine / "notes.txt").read_text() == "keep me"
    line = fail_line("export", str(folder), "--format", "gguf", "--out", str(mine))
    assert line == f"error: --out {mine}: is a folder; expected a file path (e.g. {mine / 'model.gguf'})"
    code, _ = run_cli("export", str(folder), "--format", "hf", "--out", str(tmp_path / "hf"))
    code_again, _ = run_cli("export", str(folder), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == code_again == 0  # a model folder of its own is replaced, as before


@pytest.mark.parametrize("option,value,expected", [
    ("--max-new-tokens", "-1", "error: --max-new-tokens: Input should be greater than 0, got -1"),
    ("--top-p", "2", "error: --top-p: Input should be less than or equal to 1, got 2.0"),
])
def test_generate_with_a_bad_option_is_one_line(tmp_path, tokenizer_path, option, value, expected):
    folder = make_model_folder(tmp_path, tokenizer_path)
    assert fail_line("generate", str(folder), "-p", "hi", option, value) == expected


def test_bad_yaml_in_set_is_one_line(tmp_path):
    line = fail_line("run", TINY, "--set", f"run_dir={tmp_path}", "--set", "pretrain={a: 1")
    assert line.startswith("error: --set pretrain={a: 1: the value is not valid YAML (")


def test_a_batch_that_processes_cannot_share_fails_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check runs before any process group
    line = fail_line("run", TINY, "--set", f"run_dir={tmp_path}", "--set", "dpo.batch_size=6", "--set", "dpo.grad_accum=2")
    assert line == "error: dpo.batch_size: 6 must divide by processes x grad_accum (2 x 2)"
    line = fail_line("run", TINY, "--set", f"run_dir={tmp_path}", "--set", "pretrain.batch_size=15")
    assert line == "error: pretrain.batch_size: 15 must divide by processes x grad_accum (2 x 1)"
    assert not (tmp_path / "curate").exists()  # nothing ran
