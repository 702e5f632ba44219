"""Parity with llama.cpp itself, through llama-cpp-python (compiled from source, so these tests
have their own marker and CI step: `make test-llamacpp`).

- SmolLM2-135M-Instruct (a llama.cpp-made Q4_1 GGUF) imported into openmill gives llama.cpp's
  next-token logits and the same 32-token greedy continuations; re-exported by openmill as F32 (the
  same weights, no Q4_1 arithmetic in llama.cpp) it gives llama.cpp's logits to 1e-3 and the same
  32 greedy tokens on every prompt.
- A GGUF exported by openmill loads in llama.cpp: its tokenizer splits the embedded EN/ZH/code
  sample exactly as openmill does, it generates what openmill generates, and SmolLM2 re-exported
  as F16 has the WikiText-2 perplexity of openmill's fp32 model within 0.5%.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openmill.export import export_gguf
from openmill.generate import SamplingParams, generate_batch
from openmill.textmodel import load_text_model

from .conftest import SHARED
from .test_export_hf import make_model_folder, sample_texts, train_small_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

PROMPTS = ["The capital of France is", "def fibonacci(n):", "中国的首都是", "Once upon a time"]


def load(path: Path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=kw.pop("n_ctx", 512), n_threads=2, verbose=False, seed=0, **kw)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (T, V) for every position of `ids`."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n:
            return out
    return out


# ---------------------------------------------------------------------- SmolLM2: import from llama.cpp


@pytest.fixture(scope="module")
def smol(smollm2, smollm2_folder):
    model, tok = load_text_model(smollm2_folder)
    return model, tok, load(smollm2, logits_all=True)


# Not bit-equal, and why: openmill (like transformers, tested equal to it in test_export_gguf)
# dequantizes the Q4_1 weights exactly and computes in fp32; llama.cpp's Q4_1 dot product first
# rounds each block of 32 activations to 8 bits (Q8_1). Isolated 2026-11-23
# (benchmarks/llamacpp_parity.py, 6 prompts + 32-token continuations, docs/export.md): on the Q4_1
# file, max |Δlogit| 2.59 and KL up to 0.036 nats (2/6 greedy runs equal; 2.58 / 0.027 / 1/6 with
# llama.cpp's K/V in f32, so the f16 K/V cache is not the cause); on openmill's F32 re-export of the
# same weights, max |Δlogit| 0.040 and KL 1.5e-5 with K/V f16, 9.1e-5 and 3.7e-7 with K/V f32, and
# 6/6 greedy runs equal either way: the whole gap is the Q4_1 x Q8_1 arithmetic. Measured on Q4_1:
# per-position mean |Δlogit| up to 1.06 on logits of std ~3 (max single |Δ| 1.0-2.6), KL per
# position up to 0.036 nats. Held, with some margin: KL <= 0.05 nats and mean |Δlogit| <= 1.5 at
# every position (a real mistake, e.g. a wrong permutation, norm or RoPE base, gives KL of several
# nats), and the same argmax wherever llama.cpp's top-1 leads its runner-up by more than twice that
# position's max |Δlogit| (near-ties can flip either way, so whole greedy runs can part there).
KL_MAX, MEAN_ABS_MAX = 0.05, 1.5


def compare(model, llm, ids: list[int]) -> dict:
    """openmill vs llama.cpp logits at every position of `ids`."""
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    theirs = torch.from_numpy(llama_logits(llm, ids))
    diff = (ours - theirs).abs()
    top2 = theirs.topk(2, dim=-1).values
    return {
        "kl": F.kl_div(ours.log_softmax(-1), theirs.log_softmax(-1), log_target=True, reduction="none").sum(-1),
        "mean_abs": diff.mean(dim=-1),
        "max_abs": diff.max(dim=-1).values,
        "clear": (top2[:, 0] - top2[:, 1]) > 2 * diff.max(dim=-1).values,  # llama.cpp's top-1 is no near-tie
        "ours_argmax": ours.argmax(-1),
        "their_argmax": theirs.argmax(-1),
    }


def test_smollm2_logits_and_greedy_continuations_match_llamacpp(smol):
    """Each prompt: llama.cpp's 32-token greedy continuation, then both models' logits over prompt +
    continuation (teacher-forced). Every position within the bounds above; openmill's argmax equals
    llama.cpp's next token wherever that is no near-tie; openmill's own greedy run equals llama.cpp's
    at least up to the first near-tie."""
    model, tok, llm = smol
    chats = [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True) for q in ("What is 2+2?", "Name three colors.")]
    prompts = [tok.encode(p) for p in PROMPTS] + chats
    for p in prompts:
        assert llm.tokenize(tok.decode(p, skip_special=False).encode(), add_bos=False, special=True) == p  # same tokens in
        cont = llama_greedy(llm, p, 32)
        c = compare(model, llm, p + cont)
        steps = slice(len(p) - 1, len(p) - 1 + len(cont))  # positions whose next token is the continuation
        print(f"{tok.decode(p)!r}: max KL {c['kl'].max():.4f}, mean |diff| {c['mean_abs'].mean():.3f}, "
              f"max |diff| {c['max_abs'].max():.3f}, clear steps {int(c['clear'][steps].sum())}/{len(cont)}")
        assert c["kl"].max() <= KL_MAX and c["mean_abs"].max() <= MEAN_ABS_MAX
        clear = c["clear"][steps]
        assert torch.equal(c["ours_argmax"][steps][clear], torch.tensor(cont)[clear])
        ours = generate_batch(model, [p], SamplingParams(max_new_tokens=32, temperature=0))[0].tokens
        same = next((i for i, (a, b) in enumerate(zip(ours, cont)) if a != b), len(cont))
        first_tie = next((i for i, ok in enumerate(clear.tolist()) if not ok), len(cont))
        print(f"  free-running greedy: equal for {same}/32 tokens (first near-tie at step {first_tie})")
        assert same >= first_tie  # the runs can only part at a near-tie


# F32 re-export, llama.cpp's K/V in f32: both sides compute the same fp32 model and differ only in
# summation order. Measured max |Δlogit| 9.1e-5 (logits up to ~30), KL 3.7e-7 nats over 6 prompts +
# 32-token continuations; held at 1e-3 and 1e-5 (10x and 27x margin; the Q4_1 file's gap is 2.6 and
# 0.036). With K/V f16 (llama.cpp's default) it is 0.040 / 1.5e-5, still 6/6 greedy runs equal.
F32_MAX_ABS, F32_KL_MAX = 1e-3, 1e-5


def test_smollm2_f32_reexport_matches_llamacpp_tightly_and_greedy_runs_are_equal(smol, smollm2_folder, tmp_path):
    model, tok, _ = smol
    path = export_gguf(smollm2_folder, tmp_path / "smol-f32.gguf", "f32")
    f32 = llama_cpp.GGML_TYPE_F32
    llm = load(path, logits_all=True, type_k=f32, type_v=f32)
    chats = [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True) for q in ("What is 2+2?", "Name three colors.")]
    for p in [tok.encode(p) for p in PROMPTS] + chats:
        cont = llama_greedy(llm, p, 32)
        ours = generate_batch(model, [p], SamplingParams(max_new_tokens=32, temperature=0))[0].tokens
        c = compare(model, llm, p + cont)
        print(f"{tok.decode(p)!r}: max KL {c['kl'].max():.2e}, max |diff| {c['max_abs'].max():.2e}")
        assert ours == cont  # every prompt, all 32 tokens
        assert c["max_abs"].max() <= F32_MAX_ABS and c["kl"].max() <= F32_KL_MAX
    del llm


# ----------------------------------------------------------------------- openmill's export in llama.cpp


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")
    folder = make_model_folder(root, train_small_tokenizer(root / "tok"), seed=3, max_seq_len=128)
    return folder, export_gguf(folder, root / "tiny-f16.gguf", "f16")


def test_llamacpp_tokenizes_the_sample_exactly_as_openmill(tiny_gguf):
    folder, path = tiny_gguf
    _, tok = load_text_model(folder)
    llm = load(path, vocab_only=True)
    texts = [t for ts in sample_texts(40, split="valid").values() for t in ts]
    assert {"en", "zh", "code"} <= set(sample_texts(1))
    mismatched = [t[:60] for t in texts if llm.tokenize(t.encode(), add_bos=False, special=False) != tok.encode(t)]
    assert not mismatched, f"{len(mismatched)}/{len(texts)} documents tokenized differently, e.g. {mismatched[:3]}"


def test_openmill_gguf_generates_in_llamacpp_as_in_openmill(tiny_gguf):
    folder, path = tiny_gguf
    model, tok = load_text_model(folder)
    llm = load(path, logits_all=True, n_ctx=128)
    ids = tok.document_prefix() + tok.encode("Alice was beginning to")
    ours = model(torch.tensor([ids]))[0].detach().numpy()
    theirs = llama_logits(llm, ids)
    # F16 weights: 11 significant bits, as in test_export_gguf's F16_RTOL (4e-3 of the largest logit).
    assert np.abs(ours - theirs).max() <= 4e-3 * np.abs(ours).max()
    ours_greedy = generate_batch(model, [ids], SamplingParams(max_new_tokens=16, temperature=0))[0].tokens
    assert llama_greedy(llm, ids, 16) == ours_greedy


def wikitext_windows(tok, n: int, size: int = 512) -> list[list[int]]:
    path = SHARED / "wikitext2" / "test.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ids = tok.encode(path.read_text(encoding="utf-8"))
    bos = tok.bos_id if tok.bos_id is not None else tok.eos_id
    return [[bos] + ids[i * (size - 1) : (i + 1) * (size - 1)] for i in range(n)]


def nll(logits: np.ndarray | torch.Tensor, ids: list[int]) -> float:
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()


def test_smollm2_f16_export_keeps_wikitext2_perplexity_within_half_a_percent(smol, smollm2_folder, tmp_path):
    model, tok, _ = smol
    windows = wikitext_windows(tok, 4)
    count = sum(len(w) - 1 for w in windows)
    with torch.no_grad():
        ours = math.exp(sum(nll(model(torch.tensor([w]))[0], w) for w in windows) / count)
    results = {}
    for qtype in ("f16", "q8_0", "q4_0"):
        llm = load(export_gguf(smollm2_folder, tmp_path / f"smol-{qtype}.gguf", qtype), logits_all=True)
        results[qtype] = math.exp(sum(nll(llama_logits(llm, w), w) for w in windows) / count)
        del llm
    print(f"WikiText-2 ({count} tokens): openmill fp32 {ours:.3f}; llama.cpp " + ", ".join(f"{q} {p:.3f} ({100 * (p / ours - 1):+.2f}%)" for q, p in results.items()))
    assert abs(results["f16"] / ours - 1) <= 0.005
