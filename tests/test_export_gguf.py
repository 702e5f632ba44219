"""GGUF export/import through the real converter against the real consumers we have on CPU:
transformers' GGUF loader (which undoes llama.cpp's q/k permutation and dequantizes with `gguf`),
and a real llama.cpp-made file (SmolLM2-135M-Instruct Q4_1, marked slow: a 93 MB wheel from PyPI).
llama.cpp itself (llama-cpp-python) is not run here; see docs/export.md.
"""

import json
from pathlib import Path

import pytest
import torch

from openmill.config import ModelConfig
from openmill.export import ExportError, export_gguf, import_gguf
from openmill.export.gguf import permute_rope_rows, unpermute_rope_rows
from openmill.model import apply_rope, rope_tables
from openmill.tokenizer import Tokenizer
from openmill.train.pretrain import load_model_folder

from .conftest import CACHE
from .test_export_hf import VOCAB, ids, make_model_folder, sample_texts, tokenizer_path, train_small_tokenizer  # noqa: F401 (fixture)

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer_path) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("gguf"), tokenizer_path)


@pytest.fixture(scope="module")
def exported(tiny_folder, tmp_path_factory) -> dict[str, Path]:
    """The tiny model in each quantization, and each file re-imported by our importer."""
    root = tmp_path_factory.mktemp("gguf_files")
    out = {}
    for q in ("f16", "q8_0", "q4_0"):
        path = export_gguf(tiny_folder, root / f"tiny-{q}.gguf", q)
        out[q] = path
        import_gguf(path, root / f"imported-{q}")
    return out


# f16 keeps 11 significant bits: each weight is off by at most 2^-11 ~ 4.9e-4 of itself. Through the
# embedding, two layers and the head those errors add up to a few 2^-11 of the largest logit
# (measured 1.3e-3); 4e-3 (~8 x 2^-11) leaves room without hiding a real mistake (those are O(1)).
F16_RTOL = 4e-3


def imported(path: Path):
    return load_model_folder(path.parent / path.stem.replace("tiny-", "imported-"))[0]


# ------------------------------------------------------------------------------ the permutation


def interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's RoPE for the llama architecture: rotate adjacent pairs (x0, x1), (x2, x3), ...

    x: (T, heads, D); pair i at position p turns by p * theta^(-2i/D).
    """
    T, _, d = x.shape
    inv = theta ** (-torch.arange(0, d, 2).float() / d)
    ang = torch.arange(T).float()[:, None] * inv[None, :]  # (T, D/2)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def test_permuted_q_k_under_llamacpp_rope_give_our_attention_scores():
    cfg = ModelConfig(vocab_size=8, dim=32, n_heads=4, n_kv_heads=2, max_seq_len=16).resolved()
    g = torch.Generator().manual_seed(0)
    wq, wk = torch.randn(4 * 8, 32, generator=g), torch.randn(2 * 8, 32, generator=g)
    x = torch.randn(16, 32, generator=g)
    cos, sin = rope_tables(cfg, 16)
    # Ours (rotate-half), shared k head expanded to the 2 query heads that read it.
    q = apply_rope((x @ wq.T).view(16, 4, 8).transpose(0, 1), cos, sin)
    k = apply_rope((x @ wk.T).view(16, 2, 8).transpose(0, 1), cos, sin).repeat_interleave(2, 0)
    ours = q @ k.transpose(1, 2)
    # llama.cpp's: permuted rows, interleaved pairs.
    q2 = interleaved_rope((x @ permute_rope_rows(wq, 4).T).view(16, 4, 8), cfg.rope_theta).transpose(0, 1)
    k2 = interleaved_rope((x @ permute_rope_rows(wk, 2).T).view(16, 2, 8), cfg.rope_theta).transpose(0, 1)
    theirs = q2 @ k2.repeat_interleave(2, 0).transpose(1, 2)
    assert (ours - theirs).abs().max() < 1e-4 * ours.abs().max()
    # Without the permutation the scores are wrong: the test can tell.
    q3 = interleaved_rope((x @ wq.T).view(16, 4, 8), cfg.rope_theta).transpose(0, 1)
    assert (ours - q3 @ k2.repeat_interleave(2, 0).transpose(1, 2)).abs().max() > 0.1 * ours.abs().max()
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(wq, 4), 4), wq)


# ----------------------------------------------------------------------------- tiny round trips


def test_f16_file_reimported_by_us_is_the_f16_rounded_model(tiny_folder, exported):
    model, _ = load_model_folder(tiny_folder)
    back = imported(exported["f16"])
    rounded, _ = load_model_folder(tiny_folder)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:  # matrices are F16 in the file; norm weights stay F32
                p.copy_(p.half().float())
        ours, again, want = model(ids()), back(ids()), rounded(ids())
    assert (again - want).abs().max() <= 1e-4  # the file holds exactly the f16-rounded weights
    assert (again - ours).abs().max() <= F16_RTOL * ours.abs().max()


def test_f32_file_reimported_by_us_is_the_same_model_bit_for_bit(tiny_folder, tmp_path):
    path = export_gguf(tiny_folder, tmp_path / "tiny-f32.gguf", "f32")
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    import_gguf(path, tmp_path / "imported-f32")
    model, _ = load_model_folder(tiny_folder)
    back = imported(path)
    for (name, p), q in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(p, q), name  # the q/k permutation is undone exactly too


@pytest.mark.parametrize("q", ["f16", "q8_0", "q4_0"])
def test_transformers_gguf_loader_matches_our_import(exported, q):
    from transformers import AutoModelForCausalLM

    pytest.importorskip("accelerate")
    path = exported[q]
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs, ours = hf(input_ids=ids()).logits, imported(path)(ids())
    assert ours.abs().max() > 1.0
    assert (theirs - ours).abs().max() <= 1e-4  # same dequantized weights, fp32 kernels on both sides


def test_quantized_files_are_smaller_and_close(tiny_folder, exported):
    model, _ = load_model_folder(tiny_folder)
    sizes = {q: p.stat().st_size for q, p in exported.items()}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]
    with torch.no_grad():
        ref = model(ids())
        err = {q: float((imported(p)(ids()) - ref).abs().max()) for q, p in exported.items()}
    assert err["f16"] < err["q8_0"] < err["q4_0"] < ref.abs().max()
    reader = gguf.GGUFReader(str(exported["q4_0"]))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_embedded_tokenizer_round_trips_and_matches_transformers(tokenizer_path, exported):
    from transformers import AutoTokenizer

    ours = Tokenizer.load(tokenizer_path)
    back = Tokenizer.load(exported["f16"].parent / "imported-f16" / "tokenizer.json")
    path = exported["f16"]
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for domain, docs in sample_texts(20, "valid").items():
        for doc in docs:
            want = ours.encode(doc)
            assert back.encode(doc) == want, domain
            assert theirs(doc, add_special_tokens=False)["input_ids"] == want, domain
    meta = json.loads((path.parent / "imported-f16" / "model.json").read_text())["tokenizer"]
    assert meta["gguf_pre"] == "llama-bpe" and meta["stop_tokens"] == ["<|eos|>", "<|end|>"]
    messages = [{"role": "user", "content": "你好, world"}, {"role": "assistant", "content": "hi"}]
    got = theirs.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=False)
    assert list(got) == ours.encode_chat(messages)[0]
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == ours.end_id


def test_every_vocabulary_token_is_reached_by_its_own_merges(tokenizer_path):
    """llama.cpp's llama-bpe type skips merging a piece that is a whole token (ignore_merges);
    that changes nothing exactly when merging each token's bytes ends in that token."""
    ours = Tokenizer.load(tokenizer_path)
    model = ours.hf.model
    vocab = ours.hf.get_vocab(with_added_tokens=False)
    specials = set(ours.special_ids)
    assert all([t.id for t in model.tokenize(tok)] == [i] for tok, i in vocab.items() if tok not in specials)


def test_exported_ids_tie_and_metadata(tiny_folder, tokenizer_path, tmp_path):
    tied = make_model_folder(tmp_path, tokenizer_path, tie_embeddings=True)
    path = export_gguf(tied, tmp_path / "tied.gguf", "f16")
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    f = reader.fields
    assert f["general.architecture"].contents() == "llama" and f["llama.block_count"].contents() == 2
    assert (f["llama.attention.head_count"].contents(), f["llama.attention.head_count_kv"].contents()) == (4, 2)
    assert len(f["tokenizer.ggml.tokens"].contents()) == VOCAB
    import_gguf(path, tmp_path / "back")
    model, _ = load_model_folder(tied)
    back, cfg = load_model_folder(tmp_path / "back")
    assert cfg.tie_embeddings
    with torch.no_grad():
        ref = model(ids())
        assert (ref - back(ids())).abs().max() <= F16_RTOL * ref.abs().max()


# ------------------------------------------------------------------------------------- refusals


def test_refusals_are_one_line_naming_the_field(tiny_folder, tokenizer_path, tmp_path):
    window = make_model_folder(tmp_path / "w", tokenizer_path, sliding_window=8)
    with pytest.raises(ExportError, match="sliding_window"):
        export_gguf(window, tmp_path / "w.gguf")
    with pytest.raises(ExportError, match="qtype"):
        export_gguf(tiny_folder, tmp_path / "x.gguf", "q5_k")
    cjk = make_model_folder(tmp_path / "c", train_small_tokenizer(tmp_path / "ctok", "cjk_chars"))
    with pytest.raises(ExportError, match="cjk_chars.*gguf_pre is None") as err:
        export_gguf(cjk, tmp_path / "c.gguf")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "w.gguf").exists() and not (tmp_path / "c.gguf").exists()
    not_gguf = tmp_path / "bad.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(ExportError, match="bad.gguf"):
        import_gguf(not_gguf, tmp_path / "out")


def test_other_architectures_are_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ExportError, match="general.architecture 'qwen2'"):
        import_gguf(tmp_path / "qwen.gguf", tmp_path / "out")


# ----------------------------------------------------------------------- a real llama.cpp file

PROMPT = "The capital of France is Paris. 北京是中国的首都。 In 2024, 12345 people said: def f(x): return x"


@pytest.fixture(scope="session")
def smollm2_reference(smollm2) -> dict:
    """transformers' logits and token ids for the same file, computed once (the load takes ~24 s).

    Token ids come twice: from transformers' GGUF tokenizer as loaded, and with SmolLM2's own
    pre-tokenizer put back (each digit alone, then GPT-2's byte-level rule: what llama.cpp's
    "smollm" type does). transformers 5.x knows no split for "smollm" and falls back to GPT-2's,
    so on whitespace before a digit it cuts differently from llama.cpp and from SmolLM2 itself.
    """
    cached = CACHE / "smollm2_reference.pt"
    if not cached.is_file():
        pytest.importorskip("accelerate")
        from tokenizers import pre_tokenizers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
        texts = [PROMPT] + [t for ts in sample_texts(10, "valid").values() for t in ts]
        as_loaded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        smollm = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        hf = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32).eval()
        x = torch.tensor([smollm[0]])
        with torch.no_grad():
            logits = hf(input_ids=x).logits
        torch.save({"ids": x, "logits": logits, "texts": texts, "as_loaded": as_loaded, "smollm": smollm}, cached)
    return torch.load(cached)


@pytest.mark.slow
def test_smollm2_imports_with_transformers_logits_and_tokenizer(smollm2, smollm2_reference, tmp_path):
    import_gguf(smollm2, tmp_path / "smol")
    model, cfg = load_model_folder(tmp_path / "smol")
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (30, 9, 3, True)
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(tmp_path / "smol" / "tokenizer.json"))
    ref = smollm2_reference
    ours = [tok.encode(t, add_special_tokens=False).ids for t in ref["texts"]]  # the prompt, en, zh, code
    assert ours == ref["smollm"]
    # transformers as loaded agrees wherever no digit is involved (see smollm2_reference).
    for text, mine, theirs in zip(ref["texts"], ours, ref["as_loaded"]):
        if not any(c.isdigit() for c in text):
            assert mine == theirs
    with torch.no_grad():
        logits = model(ref["ids"])
    # Both sides dequantize the same Q4_1 blocks with `gguf` to fp32 and run fp32 math: only kernel
    # summation order differs (measured 0.0 here; logits reach ~33, fp32 noise would be ~1e-5 of that).
    assert (logits - ref["logits"]).abs().max() <= 1e-3
    meta = json.loads((tmp_path / "smol" / "model.json").read_text())["tokenizer"]
    assert (meta["bos_token"], meta["eos_token"], meta["gguf_pre"]) == ("<|im_start|>", "<|im_end|>", "smollm")
    assert "<|im_start|>" in meta["chat_template"]
