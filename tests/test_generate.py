"""The generation engine against its naive paths: cached vs recomputed greedy (exact), the rolling
buffer vs the full sliding-window forward, batching that changes nothing, streaming and stop
strings, sampling processors against transformers'."""

from pathlib import Path

import pytest
import torch

from openmill.config import GenerateConfig
from openmill.export.folder import TokenizerInfo, write_model_folder
from openmill.generate import Engine, SamplingParams, TextStream, generate, generate_batch
from openmill.generate.sampling import apply_repetition_penalty, sample_next
from openmill.model import KVCache
from openmill.textmodel import load_text_model
from openmill.tokenizer import BOS, EOS
from openmill.train.pretrain import load_model_folder
from tests.test_export_hf import make_model_folder, tokenizer_path  # noqa: F401 (fixture)
from tests.test_model import greedy_recompute, randomised, tiny

GREEDY = SamplingParams(max_new_tokens=16, temperature=0)


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (int(length),), generator=gen).tolist() for length in torch.randint(1, 12, (n,), generator=gen)]


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
def test_batched_greedy_of_different_lengths_equals_recomputed_greedy(window):
    model = randomised(tiny(sliding_window=window), seed=3)
    ps = prompts(4)
    assert len({len(p) for p in ps}) > 2  # really different lengths
    out = generate_batch(model, ps, GREEDY, max_batch=3)  # 3 rows: the 4th request joins mid-flight
    for p, r in zip(ps, out):
        expected = greedy_recompute(model, torch.tensor([p]), 16)[0, len(p) :].tolist()
        assert r.tokens == expected  # token for token, atol = 0
        assert r.finish_reason == "length"
    assert len({tuple(r.tokens) for r in out}) == len(ps)


def test_compiled_decode_step_equals_recomputed_greedy():
    """torch.compile'd steps (all rows, whole cache, static shapes) change nothing: token for token,
    with a request joining mid-flight; a second engine of the same shapes reuses the compiled step."""
    model = randomised(tiny(), seed=3)
    ps = prompts(4)
    for _ in range(2):
        out = generate_batch(model, ps, GREEDY, max_batch=3, compile=True)
        for p, r in zip(ps, out):
            assert r.tokens == greedy_recompute(model, torch.tensor([p]), 16)[0, len(p) :].tolist()


@torch.no_grad()
def test_rolling_buffer_gives_the_logits_of_the_full_sliding_window_forward():
    model = randomised(tiny(sliding_window=4), seed=7)
    seq = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(8))
    cache = KVCache(model.cfg, 2, 30)
    assert cache.rolling and cache.k[0].shape[2] == 1 + 4  # memory: the window, not the sequence
    full = model(seq)  # no cache: the (T, T) causal + window mask
    prefill = model(seq[:, :9], pos=torch.arange(9), cache=cache)  # a chunk longer than the window
    steps = [model(seq[:, p : p + 1], pos=torch.tensor([p]), cache=cache) for p in range(9, 30)]
    rolled = torch.cat([prefill, *steps], dim=1)
    assert (rolled - full).abs().max() <= 1e-5  # same math, different SDPA shapes


def test_sampling_depends_on_the_seed_not_on_the_batch():
    model = randomised(tiny(), seed=4)
    ps = prompts(4, seed=2)
    sampled = [SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=s) for s in range(4)]
    together = [r.tokens for r in generate_batch(model, ps, sampled)]
    alone = [generate_batch(model, [p], q)[0].tokens for p, q in zip(ps, sampled)]
    assert together == alone
    reseeded = generate_batch(model, ps[:1], SamplingParams(max_new_tokens=12, temperature=1.0, seed=99))[0].tokens
    assert reseeded != together[0]


def test_generate_stops_at_a_stop_id_and_keeps_its_old_signature():
    model = randomised(tiny(), seed=3)
    p = prompts(1)[0]
    free = generate(model, p, 16, temperature=0)
    stop = free[5]
    first = free.index(stop)
    assert generate(model, p, 16, temperature=0, stop_ids=(stop,)) == free[: first + 1]


def test_engine_refuses_a_prompt_that_fills_the_context():
    engine = Engine(randomised(tiny(max_seq_len=16)), max_batch=1)
    with pytest.raises(ValueError, match="leaves no room"):
        engine.add(list(range(16)), GREEDY)


# ------------------------------------------------------------------- streaming text, stop strings


def byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_stream_waits_for_a_whole_character_and_cuts_at_a_stop_string():
    stream = TextStream(byte_decode, stop=("END",))
    deltas = [stream.push(b) for b in "中 E".encode() + b"NDx"]
    assert deltas[:3] == ["", "", "中"]  # three bytes, one character
    assert "".join(deltas) == "中 " and stream.stopped  # "E" held back, then "END" cuts
    stream = TextStream(byte_decode, stop=("END",))
    assert "".join(stream.push(b) for b in b"an E") + stream.finish() == "an E"  # released at the end


def test_engine_stop_string_ends_with_reason_stop():
    model = randomised(tiny(vocab_size=256), seed=5)
    free = generate_batch(model, [[65, 66]], GREEDY, decode=byte_decode)[0]
    stop = free.text[3:5]
    assert len(stop) == 2
    cut = generate_batch(model, [[65, 66]], SamplingParams(max_new_tokens=16, temperature=0, stop=(stop,)), decode=byte_decode)[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]


# ------------------------------------------------------------------------ processors vs transformers


def test_repetition_penalty_and_top_k_top_p_match_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 3
    seen = torch.tensor([[3, 7, 7, 20]])
    ours = apply_repetition_penalty(logits[0], seen[0], 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())[0]
    assert torch.equal(ours, theirs)
    warped = TopPLogitsWarper(0.8)(seen, TopKLogitsWarper(10)(seen, logits.clone()))
    allowed = torch.isfinite(warped[0])
    draws = torch.cat([sample_next(logits, 1.0, 10, 0.8, torch.Generator().manual_seed(s)) for s in range(300)])
    assert set(draws.tolist()) == set(allowed.nonzero().flatten().tolist())


def test_fused_projections_decode_the_same_tokens_without_adding_memory():
    """fuse_projections (inference): one q/k/v and one gate/up matrix per layer, the parameters
    views of them. Greedy tokens equal the unfused model's recomputed greedy, the state_dict keeps
    its names and values, and quantizing a fused model is refused."""
    from openmill.generate.quantize import quantize_model

    model = randomised(tiny(), seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ps = prompts(3, seed=2)
    expected = [greedy_recompute(model, torch.tensor([p]), 16)[0, len(p) :].tolist() for p in ps]
    model.fuse_projections()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    assert [r.tokens for r in generate_batch(model, ps, GREEDY)] == expected
    with pytest.raises(ValueError, match="fused"):
        quantize_model(model, "int8")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_packed_weights_give_the_same_logits_and_tokens_eager_and_compiled(tie):
    """pack_weights (CPU inference): every projection and the output head in oneDNN's layout.
    Logits of a prefill and of cached decode steps (1 to 4 rows) match the plain model's to 1e-5,
    batched greedy of different lengths equals the plain recomputed greedy token for token, eagerly
    and through a compiled engine (the packed products stay opaque ops in the traced step), the
    plain copies are released (nothing left on the CPU but the embedding, norms and packed
    matrices), and what a packed model cannot give (state_dict, a loss) fails with a message."""
    from openmill.generate.quantize import quantize_model
    from openmill.model import _onednn_linear_works
    from openmill.packed import PackedWeight

    if not _onednn_linear_works():
        pytest.skip("this PyTorch build has no usable oneDNN linear")
    model = randomised(tiny(tie_embeddings=tie), seed=6)
    seq = torch.randint(0, 97, (4, 20), generator=torch.Generator().manual_seed(9))
    ps = prompts(4, seed=3)
    with torch.no_grad():
        plain = model(seq)
        expected = [greedy_recompute(model, torch.tensor([p]), 16)[0, len(p) :].tolist() for p in ps]
        assert model.pack_weights() and model.is_packed and model.pack_weights()  # a second call is a no-op
        assert (model(seq) - plain).abs().max() <= 1e-5
        for rows in (1, 2, 4):  # decode steps of different row counts
            cache = KVCache(model.cfg, rows, 20)
            model(seq[:rows, :12], pos=torch.arange(12), cache=cache)
            step = model(seq[:rows, 12:13], pos=torch.tensor([12]), cache=cache)
            assert (step[:, 0] - plain[:rows, 12]).abs().max() <= 1e-5
    assert [r.tokens for r in generate_batch(model, ps, GREEDY, max_batch=3)] == expected
    assert [r.tokens for r in generate_batch(model, ps, GREEDY, max_batch=3, compile=True)] == expected
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    packed = (attn.qkv_weight, attn.o_proj.weight, mlp.gate_up_weight, mlp.down_proj.weight, model.lm_head.weight)
    assert all(isinstance(w, PackedWeight) and w.tensor.is_mkldnn for w in packed)
    assert attn.q_proj.weight.is_meta and mlp.up_proj.weight.is_meta  # released, shapes kept
    assert model.embed_tokens.weight.device.type == "cpu" and not model.embed_tokens.weight.is_mkldnn
    with pytest.raises(ValueError, match="packed"):
        model.state_dict()
    with pytest.raises(ValueError, match="packed"):
        model(seq, targets=seq)
    quantized = quantize_model(randomised(tiny(tie_embeddings=tie, vocab_size=128), seed=6), "int4", group_size=32)
    assert not quantized.is_packed  # an int4 head has no `weight`: still answers


def test_packed_weights_are_freed_with_their_model():
    """The packed tensors live in their handles; the slot table that compiled steps read holds
    them weakly, so dropping a packed model frees its weights and its slots."""
    import gc

    from openmill.model import _onednn_linear_works
    from openmill.packed import _SLOTS

    if not _onednn_linear_works():
        pytest.skip("this PyTorch build has no usable oneDNN linear")
    model = randomised(tiny(), seed=1)
    model.pack_weights()
    slots = {block.mlp.gate_up_weight.slot for block in model.layers} | {model.lm_head.weight.slot}
    assert len(slots) == len(model.layers) + 1 and slots <= set(_SLOTS)
    del model
    gc.collect()
    assert not slots & set(_SLOTS)


# ------------------------------------------------------------------- failures leave the engine usable


def test_a_tiny_temperature_decodes_greedily_instead_of_failing():
    """logits / 1e-40 overflows to inf and softmax gives nan; below 1e-5 the engine decodes greedily."""
    model = randomised(tiny(), seed=3)
    ps = prompts(2)
    tiny_temperature = SamplingParams(max_new_tokens=16, temperature=1e-40, seed=7)
    greedy = [r.tokens for r in generate_batch(model, ps, GREEDY)]
    assert [r.tokens for r in generate_batch(model, ps, tiny_temperature)] == greedy


def test_a_request_whose_sampling_fails_frees_its_row(monkeypatch):
    """If a first token cannot be sampled, add_many frees every row it took before raising: a row
    left holding a request without tokens would fail every later step()."""
    import openmill.generate.engine as engine_module

    model = randomised(tiny(), seed=3)
    engine = Engine(model, max_batch=2, max_len=32)
    ps = prompts(2)
    real_choose, calls = engine_module.choose, []

    def second_choice_fails(*args):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real_choose(*args)

    monkeypatch.setattr(engine_module, "choose", second_choice_fails)
    with pytest.raises(RuntimeError, match="nan"):
        engine.add_many(ps, [GREEDY, GREEDY])  # the first request got its token, the second failed
    assert engine.free_rows == 2 and engine.step() == []
    monkeypatch.undo()
    seq = engine.add(ps[0], GREEDY)
    while not seq.done:
        engine.step()
    assert seq.tokens == greedy_recompute(model, torch.tensor([ps[0]]), 16)[0, len(ps[0]) :].tolist()


def test_add_many_wants_one_sampling_params_per_prompt():
    engine = Engine(randomised(tiny()), max_batch=2, max_len=32)
    with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
        engine.add_many(prompts(2), [GREEDY])
    assert engine.free_rows == 2


def test_generate_batch_of_no_prompts_is_empty():
    assert generate_batch(randomised(tiny()), [], GREEDY) == []


def test_quantizing_a_packed_model_is_refused_with_the_order_to_follow():
    from openmill.generate.quantize import quantize_model
    from openmill.model import _onednn_linear_works

    if not _onednn_linear_works():
        pytest.skip("this PyTorch build has no usable oneDNN linear")
    model = randomised(tiny(), seed=1)
    assert model.pack_weights()
    with pytest.raises(ValueError, match="quantize before packing"):
        quantize_model(model, "int8")


# ------------------------------------------------------------------- the generate stage and CLI verb


def imported_folder(root: Path, tokenizer_path: Path) -> Path:
    """A folder as an import writes it for a model with its own specials: <s> / </s> instead of
    openmill's, BOS added before a document, </s> the only stop, no chat template."""
    text = tokenizer_path.read_text(encoding="utf-8").replace(BOS, "<s>").replace(EOS, "</s>")
    model, _ = load_model_folder(make_model_folder(root / "base", tokenizer_path))
    info = TokenizerInfo(
        bos_token="<s>", eos_token="</s>", pad_token=None, stop_tokens=["</s>"], chat_template=None, add_bos_token=True
    )
    write_model_folder(root / "imported", model.cfg, dict(model.state_dict()), text, info, {"test": True})
    return root / "imported"


def test_generate_stage_completes_from_an_imported_folder_with_its_own_bos(tmp_path, tokenizer_path):
    from openmill.sample import complete

    folder = imported_folder(tmp_path, tokenizer_path)
    model, tok = load_text_model(folder)
    prompt = "Alice was beginning to"
    [sample] = complete(folder, [prompt], GenerateConfig(max_new_tokens=12, temperature=0), seed=0)
    greedy = SamplingParams(12, temperature=0)
    expected = generate_batch(model, [[tok.bos_id, *tok.encode(prompt)]], greedy, stop_ids=tok.stop_ids)[0].tokens
    assert sample == {"prompt": prompt, "completion": tok.decode([t for t in expected if t not in tok.stop_ids])}


def test_generate_stage_on_an_openmill_folder_starts_after_eos_and_is_seeded(tmp_path, tokenizer_path):
    """Unchanged for openmill runs: a document starts after EOS (as in the shards), sampling is
    seeded by the recipe's seed plus the prompt's index, special tokens stay in the text."""
    from openmill.sample import complete

    folder = make_model_folder(tmp_path, tokenizer_path)
    model, tok = load_text_model(folder)
    cfg = GenerateConfig(prompts=["Alice was", "中华"], max_new_tokens=12)
    samples = complete(folder, cfg.prompts, cfg, seed=5)
    assert complete(folder, cfg.prompts, cfg, seed=5) == samples
    for i, (prompt, sample) in enumerate(zip(cfg.prompts, samples)):
        ids = generate(
            model, [tok.eos_id, *tok.encode(prompt)], 12, cfg.temperature, cfg.top_k, cfg.top_p, seed=5 + i, stop_ids=tok.stop_ids
        )
        assert sample["completion"] == tok.decode([t for t in ids if t not in tok.stop_ids], skip_special=False)
