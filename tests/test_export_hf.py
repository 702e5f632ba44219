"""HF export/import through the real converter against the real consumer (transformers).

Tiny fp32 models with O(1) logits (tests/test_model.randomised), a BPE tokenizer trained in well
under a second on data/default, and folders written by the training code's own writer.
"""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from openmill.export import ExportError, export_hf, import_hf
from openmill.textmodel import TextTokenizer
from openmill.tokenizer import SPECIAL_TOKENS, Tokenizer, new_tokenizer
from openmill.train.pretrain import load_model_folder, save_trained_model

from .conftest import DEFAULT_DATA
from .test_model import hf_config, randomised, tiny

VOCAB = 512
SHAPES = {  # name -> ModelConfig fields
    "gqa4-2-untied": dict(n_heads=4, n_kv_heads=2),
    "mha4-4-tied": dict(n_heads=4, n_kv_heads=4, tie_embeddings=True),
    "gqa4-2-window": dict(n_heads=4, n_kv_heads=2, sliding_window=8),
}


def sample_texts(per_domain: int, split: str = "train") -> dict[str, list[str]]:
    out = {}
    for path in sorted(DEFAULT_DATA.glob(f"*/{split}.jsonl")):
        with path.open() as f:
            out[path.parent.name] = [json.loads(line)["text"] for _, line in zip(range(per_domain), f)]
    return out


def train_small_tokenizer(out: Path, pretokenizer: str = "cl100k") -> Path:
    """A 512-token byte-level BPE with openmill's specials, trained on 180 documents (en, zh, code)."""
    hf = new_tokenizer(pretokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([t for ts in sample_texts(60).values() for t in ts], trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    hf.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


def make_model_folder(root: Path, tokenizer_path: Path, seed: int = 0, **fields) -> Path:
    """An openmill model folder, written by the training stage's writer, with randomised weights."""
    model = randomised(tiny(vocab_size=VOCAB, **fields), seed)
    folder = root / "model"
    save_trained_model(folder, model, tokenizer_path, {"step": 0})
    return folder


def ids(n=24, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("shape", SHAPES)
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, tokenizer_path, shape):
    folder = make_model_folder(tmp_path, tokenizer_path, **SHAPES[shape])
    model, cfg = load_model_folder(folder)
    files = export_hf(folder, tmp_path / "hf")
    names = {f.name for f in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = "MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM"
    assert type(hf).__name__ == expected
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    x = ids(n=24)  # longer than the window of 8: the window matters
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x).logits
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max() <= 1e-4


def test_sharded_export_writes_an_index_and_loads(tmp_path, tokenizer_path):
    folder = make_model_folder(tmp_path, tokenizer_path)
    model, _ = load_model_folder(folder)
    files = export_hf(folder, tmp_path / "hf", max_shard_bytes=200_000, dtype="float32")
    shards = sorted(f.name for f in files if f.name.startswith("model-"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "model.layers.1.mlp.down_proj.weight" in index["weight_map"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (model(ids()) - hf(input_ids=ids()).logits).abs().max() <= 1e-4


def test_bfloat16_export_is_the_rounded_model(tmp_path, tokenizer_path):
    folder = make_model_folder(tmp_path, tokenizer_path)
    export_hf(folder, tmp_path / "hf", dtype="bfloat16")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def test_exported_tokenizer_gives_openmill_ids_and_chat_ids(tmp_path, tokenizer_path):
    folder = make_model_folder(tmp_path, tokenizer_path)
    export_hf(folder, tmp_path / "hf")
    ours = Tokenizer.load(tokenizer_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert isinstance(theirs, PreTrainedTokenizerFast)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    texts = sample_texts(20, "valid")
    assert set(texts) == {"en", "zh", "code"}
    for domain, docs in texts.items():
        for doc in docs:
            assert theirs(doc, add_special_tokens=True)["input_ids"] == ours.encode(doc), domain
    messages = [
        {"role": "system", "content": "你是一个有帮助的助手。"},
        {"role": "user", "content": "Write fib(n) in Python:\n\tdef fib(n):"},
        {"role": "assistant", "content": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)"},
        {"role": "user", "content": "谢谢！ And 12345?"},
    ]
    for gen in (False, True):
        expected, _ = ours.encode_chat(messages, add_generation_prompt=gen)
        got = theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert list(got) == expected
    gen_config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen_config["eos_token_id"] == [ours.eos_id, ours.end_id]  # a chat reply stops at <|end|>


# -------------------------------------------------------------------------------------- import


def hf_random_folder(root: Path, tokenizer_path: Path, arch: str = "llama", **fields) -> Path:
    """A transformers-written folder: random weights from a config, save_pretrained, and a tokenizer."""
    from transformers import MistralForCausalLM

    cfg = tiny(vocab_size=VOCAB, **fields)
    torch.manual_seed(0)
    hf = (MistralForCausalLM if arch == "mistral" else LlamaForCausalLM)(hf_config(cfg, arch)).eval()
    with torch.no_grad():  # O(1) logits, so a 1e-4 agreement means something
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0, 1)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    out = root / "hf_src"
    hf.save_pretrained(out)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path), bos_token="<|bos|>", eos_token="<|eos|>",
                                  pad_token="<|pad|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("arch,fields", [("llama", {}), ("llama", {"tie_embeddings": True}),
                                         ("mistral", {"sliding_window": 8})], ids=["llama", "llama-tied", "mistral"])
def test_transformers_model_imports_with_the_same_logits(tmp_path, tokenizer_path, arch, fields):
    src = hf_random_folder(tmp_path, tokenizer_path, arch, **fields)
    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    import_hf(src, tmp_path / "ours")
    model, cfg = load_model_folder(tmp_path / "ours")
    assert cfg.sliding_window == fields.get("sliding_window") and cfg.tie_embeddings == fields.get("tie_embeddings", False)
    with torch.no_grad():
        ours, theirs = model(ids()), hf(input_ids=ids()).logits
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max() <= 1e-4
    meta = json.loads((tmp_path / "ours" / "model.json").read_text())
    assert meta["tokenizer"]["chat_template"].startswith("{% for m in messages %}")
    assert meta["tokenizer"]["bos_token"] == "<|bos|>"


def test_import_then_export_round_trips_the_folder(tmp_path, tokenizer_path):
    src = hf_random_folder(tmp_path, tokenizer_path)
    import_hf(src, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "again")
    a = AutoModelForCausalLM.from_pretrained(src).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids()).logits, b(input_ids=ids()).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "again").chat_template == AutoTokenizer.from_pretrained(src).chat_template


@pytest.mark.parametrize("template", ["<|bos|> $A", "$A"], ids=["bos-from-post-processor", "no-bos"])
def test_bos_from_the_post_processor_is_imported_as_transformers_encodes(tmp_path, tokenizer_path, template):
    """Llama 3 style folders say nothing of add_bos_token in tokenizer_config.json: tokenizer.json's
    TemplateProcessing adds BOS. Imported and exported again, the ids must stay transformers' ids."""
    src = hf_random_folder(tmp_path, tokenizer_path)
    hf = HFTokenizer.from_file(str(src / "tokenizer.json"))
    bos = hf.token_to_id("<|bos|>")
    hf.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<|bos|>", bos)])
    hf.save(str(src / "tokenizer.json"))
    assert "add_bos_token" not in json.loads((src / "tokenizer_config.json").read_text())
    theirs = AutoTokenizer.from_pretrained(src)
    import_hf(src, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "again")
    ours = TextTokenizer.from_folder(tmp_path / "ours")
    again = AutoTokenizer.from_pretrained(tmp_path / "again")
    for doc in [d for docs in sample_texts(3, "valid").values() for d in docs]:
        expected = theirs(doc)["input_ids"]
        assert (expected[0] == bos) == template.startswith("<|bos|>")  # the folder does what the case says
        assert ours.encode(doc, add_bos=ours.info.add_bos_token) == expected
        assert again(doc)["input_ids"] == expected


def test_config_missing_a_required_key_is_refused_naming_file_and_key(tmp_path, tokenizer_path):
    src = hf_random_folder(tmp_path, tokenizer_path)
    config = json.loads((src / "config.json").read_text())
    del config["hidden_size"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError) as err:
        import_hf(src, tmp_path / "ours")
    expected = f"{src / 'config.json'}: field hidden_size: expected a positive integer, got nothing (missing)"
    assert str(err.value) == expected


@pytest.mark.parametrize("edit,field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "model_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_refused_in_one_line_naming_the_field(tmp_path, tokenizer_path, edit, field):
    src = hf_random_folder(tmp_path, tokenizer_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ExportError) as err:
        import_hf(src, tmp_path / "ours")
    message = str(err.value)
    assert field in message and "config.json" in message and "\n" not in message
    assert not (tmp_path / "ours").exists()


def test_missing_files_are_named(tmp_path, tokenizer_path):
    with pytest.raises(ExportError, match="model.json missing"):
        export_hf(tmp_path, tmp_path / "hf")
    src = hf_random_folder(tmp_path, tokenizer_path)
    (src / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="tokenizer.json: missing"):
        import_hf(src, tmp_path / "ours")
