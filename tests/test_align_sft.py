"""SFT: packed and one-per-row batches give the same loss; the stage lowers held-out loss."""


import pytest
import torch

from openmill.align.config import SftConfig
from openmill.align.sft import collate, pack, sft_loss, tokenize
from openmill.textmodel import TextTokenizer
from openmill.train.pretrain import load_model_folder

from .test_export_hf import make_model_folder, tokenizer_path  # noqa: F401 (fixture)

CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am a tiny model."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是一个小模型。"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}],
]


def test_packed_and_padded_batches_give_the_same_loss(tmp_path, tokenizer_path):
    folder = make_model_folder(tmp_path, tokenizer_path)
    model, _ = load_model_folder(folder)
    tok = TextTokenizer.from_folder(folder)
    examples, dropped = tokenize(CONVERSATIONS, tok, SftConfig(seq_len=model.cfg.max_seq_len), "test")
    assert not dropped
    packed = pack(examples, model.cfg.max_seq_len)
    assert len(packed) < len(examples)  # at least two conversations share a row
    with torch.no_grad():
        got = sft_loss(model, *collate(packed, tok.pad_id))
        want = sft_loss(model, *collate([[ex] for ex in examples], tok.pad_id))
        # and the per-row padded batch is plain causal attention: no document mask needed
        x, y, _ = collate([[ex] for ex in examples], tok.pad_id)
        plain = model(x, targets=y)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plain, want, atol=1e-6, rtol=1e-6)


def test_too_long_is_dropped_and_counted_or_fails(tmp_path, tokenizer_path):
    tok = TextTokenizer.from_folder(make_model_folder(tmp_path, tokenizer_path))
    examples, dropped = tokenize(CONVERSATIONS, tok, SftConfig(seq_len=12), "t")
    assert dropped["too_long"] == 3 - len(examples) > 0
    with pytest.raises(ValueError, match="t: conversation 0 has .* tokens, more than seq_len 12"):
        tokenize(CONVERSATIONS, tok, SftConfig(seq_len=12, too_long="fail"), "t")
    # max_examples counts usable examples: the too-long ones before the cap do not use it up
    full = tokenize(CONVERSATIONS, tok, SftConfig(seq_len=1000), "t")[0]
    longest_first = sorted(range(3), key=lambda i: -len(full[i].inputs))
    shortest = len(full[longest_first[-1]].inputs)
    capped, capped_drop = tokenize([CONVERSATIONS[i] for i in longest_first], tok, SftConfig(seq_len=shortest), "t", limit=1)
    assert [ex.inputs for ex in capped] == [full[longest_first[-1]].inputs]
    assert capped_drop["too_long"] == 2  # both longer ones looked at, dropped, and not counted against the cap


def test_sft_stage_lowers_heldout_loss_on_the_embedded_sample(tmp_path, tokenizer_path):
    from pathlib import Path

    from openmill.align.sft import run_sft
    from openmill.textmodel import load_text_model

    data = Path(__file__).resolve().parents[1] / "data" / "align" / "identity_sft.jsonl"
    folder = make_model_folder(tmp_path, tokenizer_path)
    cfg = SftConfig(train=[data], valid_fraction=0.1, seq_len=64, steps=20, batch_size=4, lr=3e-3, warmup_steps=2,
                    eval_every=20, checkpoint_every=20, chat_prompts=["Who are you?"], chat_max_new_tokens=4)
    outputs, metrics = run_sft(cfg, folder, tmp_path / "sft", seed=0, log=lambda *a: None)
    assert metrics["val_loss"]["final"] < metrics["val_loss"]["step0"]
    assert metrics["dropped_too_long"]["too_long"] > 0  # seq_len 64 is short for the Chinese answers: counted
    assert metrics["train_conversations"] + metrics["valid_conversations"] + metrics["dropped_too_long"]["too_long"] == 91
    assert len(metrics["chat"]) == 1
    model, tok = load_text_model(tmp_path / "sft" / "final")  # a plain model folder with the template trained on
    assert tok.info.chat_template == TextTokenizer.from_folder(folder).info.chat_template

    # A run that died after its last checkpoint (before the final folder) resumes at its last step,
    # even with other chat prompts and threads (they do not change what is trained): nothing to
    # train, and the summary still has both evaluations, the same numbers.
    import shutil

    shutil.rmtree(tmp_path / "sft" / "final")
    told = []
    changed = cfg.model_copy(update={"chat_prompts": ["你是谁？"], "threads": 1})
    _, again = run_sft(changed, folder, tmp_path / "sft", seed=0, log=told.append)
    assert any(line.startswith("resuming from") and "step_000020" in line for line in told)
    assert again["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert [c["user"] for c in again["chat"]] == ["你是谁？"]
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file()


def test_epoch_order_visits_every_example_once_per_epoch_and_is_a_function_of_the_step():
    from openmill.align.train import epoch_order

    n, batch = 13, 4  # steps straddle epochs
    drawn = [i for step in range(13) for i in epoch_order(step, batch, n, seed=5)]  # 52 = 4 epochs
    for epoch in range(4):
        assert sorted(drawn[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert drawn[:n] != drawn[n : 2 * n]  # a fresh order each epoch
    assert epoch_order(7, batch, n, seed=5) == drawn[28:32]  # asked alone, out of order: the same
