"""DPO: losses and 10 training steps match TRL's DPOTrainer on the same weights, pairs and
hyperparameters; the step-0 held-out evaluation reused from the reference pass equals a real one;
bad pair files fail naming the file and record, or are skipped and counted."""

import json

import pytest
import torch

from openmill.align.config import DpoConfig
from openmill.align.data import AlignDataError, Pair, load_pairs
from openmill.align.dpo import answer_lengths, pair_batch, preference_eval, reference_logps, run_dpo, tokenize_pairs
from openmill.export import export_hf
from openmill.textmodel import TextTokenizer, load_text_model

from .test_align_templates import answer_runs
from .test_export_hf import make_model_folder, tokenizer_path  # noqa: F401 (fixture)

PAIRS = [
    ("Who are you?", "I am a tiny model.", "A cat."),
    ("你是谁？", "我是一个小模型。", "不知道"),
    ("2+2?", "4", "5, or maybe 22"),
    ("Capital of France?", "Paris.", "Berlin, I think."),
]
STEPS, LR = 10, 1e-3


def write_pairs(path, pairs):
    with path.open("w") as f:
        for prompt, chosen, rejected in pairs:
            f.write(json.dumps({"prompt": [{"role": "user", "content": prompt}],
                                "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}]}, ensure_ascii=False) + "\n")
    return path


def openmill_losses(folder, data, valid, out, loss, beta):
    cfg = DpoConfig(train=[data], valid=[valid], loss=loss, beta=beta, steps=STEPS, batch_size=len(PAIRS), lr=LR,
                    schedule="constant", warmup_steps=0, weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0,
                    seq_len=64, log_every=1, eval_every=100, checkpoint_every=100)
    _, metrics = run_dpo(cfg, folder, out, seed=0, log=lambda *a: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    return [r["loss"] for r in records if "loss" in r], metrics


def trl_losses(hf_dir, data, out, loss, beta):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=len(PAIRS), max_steps=STEPS, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                     adam_epsilon=1e-8, max_grad_norm=1.0, logging_steps=1, beta=beta,
                     loss_type=[{"sigmoid": "sigmoid", "dpo_norm": "sigmoid_norm", "ipo": "ipo"}[loss]],
                     precompute_ref_log_probs=True, report_to="none", use_cpu=True, seed=0, save_strategy="no",
                     max_length=None, bf16=False, fp16=False, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=load_dataset("json", data_files=str(data))["train"])
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ~30 s each on 2 cores: sigmoid runs in the default suite, the other losses with the slow ones.
@pytest.mark.parametrize("loss,beta", [("sigmoid", 0.1), pytest.param("dpo_norm", 5.0, marks=pytest.mark.slow), pytest.param("ipo", 0.1, marks=pytest.mark.slow)])
def test_ten_steps_match_trl(tmp_path, tokenizer_path, loss, beta):
    pytest.importorskip("trl")
    folder = make_model_folder(tmp_path, tokenizer_path)
    export_hf(folder, tmp_path / "hf")
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    ours, metrics = openmill_losses(folder, data, write_pairs(tmp_path / "valid.jsonl", PAIRS[:2]), tmp_path / "ours", loss, beta)
    theirs = trl_losses(tmp_path / "hf", data, tmp_path / "trl", loss, beta)
    assert len(ours) == len(theirs) == STEPS
    if loss != "ipo":  # at step 0 the policy is the reference: d = 0
        assert ours[0] == pytest.approx(0.6931472, abs=1e-6)
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-5)
    assert ours[-1] < ours[0]


def test_step0_evaluation_is_the_reference_pass_and_equals_a_real_evaluation(tmp_path, tokenizer_path):
    folder = make_model_folder(tmp_path, tokenizer_path)
    # Held-out pairs of mixed lengths, more than one evaluation batch (4 pairs): the length-sorted
    # batches must map every result back to its pair.
    valid_rows = PAIRS + [("Count to ten.", "1 2 3 4 5 6 7 8 9 10", "1 2 3"), ("Hi", "Hello! How can I help you today?", "Go away.")]
    valid = write_pairs(tmp_path / "valid.jsonl", valid_rows)
    cfg = DpoConfig(train=[write_pairs(tmp_path / "pairs.jsonl", PAIRS)], valid=[valid], steps=1, batch_size=2, lr=1e-3,
                    seq_len=64, log_every=1, eval_every=100, checkpoint_every=100)
    run_dpo(cfg, folder, tmp_path / "out", seed=0, log=lambda *a: None)
    logged = next(json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open() if "val/loss" in line)
    assert logged["step"] == 0

    model, tok = load_text_model(folder)
    model.eval()
    pairs, _ = tokenize_pairs(load_pairs([valid]).items, tok, cfg, "valid")
    assert len(pairs) == len(valid_rows)
    ref = reference_logps(model, pairs, tok.pad_id)
    with torch.no_grad():
        real = preference_eval(cfg, pairs, ref, tok.pad_id)(model)  # what the engine's evaluation would run at step 0
        # Each pair alone, through full-vocabulary logits: the log-probs the sorted batches must give.
        for (chosen, rejected), got in zip(pairs, ref):
            x, y = pair_batch([(chosen, rejected)], tok.pad_id)
            full = torch.gather(torch.log_softmax(model(x), dim=-1), 2, y.clamp(min=0)[..., None]).squeeze(-1)
            assert got.tolist() == pytest.approx((full * (y != -100)).sum(dim=1).tolist(), abs=1e-4)
    assert {k: v for k, v in logged.items() if k.startswith("val/")} == real
    assert real["val/accuracy"] == 0 and real["val/margin"] == 0 and real["val/loss"] == pytest.approx(0.6931472, abs=1e-7)


def test_multi_turn_prompt_scores_only_the_compared_answers(tmp_path, tokenizer_path):
    # The prompt's own assistant turn is context: were it trained, it would enter both sides'
    # log-probs and token counts, and the length-normalised losses would no longer cancel it.
    tok = TextTokenizer.from_folder(make_model_folder(tmp_path, tokenizer_path))
    pair = Pair(prompt=[{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello! How can I help you today with anything at all?"},
                        {"role": "user", "content": "Say yes."}], chosen="Yes.", rejected="No, I will not.")
    [(chosen, rejected)], _ = tokenize_pairs([pair], tok, DpoConfig(train=[tmp_path / "t.jsonl"], seq_len=256), "t")
    for side, answer in ((chosen, pair.chosen), (rejected, pair.rejected)):
        assert answer_runs(tok, side.targets, [t != -100 for t in side.targets]) == [answer + "<|end|>"]
    # each answer's tokens and its end-of-turn marker, nothing of the prompt
    want = [len(tok.encode(pair.chosen)) + 1, len(tok.encode(pair.rejected)) + 1]
    assert answer_lengths([(chosen, rejected)]).tolist() == [want]


def test_bf16_reference_equals_the_policy_at_step_0(tmp_path, tokenizer_path):
    # The policy runs under the engine's bf16 autocast; a reference computed in fp32 differs from it
    # by ~1e-2 nats per answer, which a large beta turns into a first loss visibly off log(2).
    folder = make_model_folder(tmp_path, tokenizer_path)
    cfg = DpoConfig(train=[write_pairs(tmp_path / "pairs.jsonl", PAIRS)],
                    valid=[write_pairs(tmp_path / "valid.jsonl", PAIRS[:2])], beta=10.0, dtype="bf16", steps=1,
                    batch_size=len(PAIRS), seq_len=64, log_every=1, eval_every=100, checkpoint_every=100)
    run_dpo(cfg, folder, tmp_path / "out", seed=0, log=lambda *a: None)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    first_loss = next(r["loss"] for r in records if "loss" in r)
    assert first_loss == pytest.approx(0.6931472, abs=1e-6)  # at step 0 the policy is the reference: d = 0


def test_bad_pair_records_fail_naming_file_and_record_or_are_counted(tmp_path):
    bad = tmp_path / "bad.jsonl"
    records = [
        {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "hello"}, "rejected": {"from": "gpt", "value": "bye"}},
        {"conversations": [{"value": "no role"}], "chosen": "a", "rejected": "b"},
        {"conversations": [{"from": "human", "value": "hi"}], "chosen": "  ", "rejected": "b"},
        {"question": "?", "answer": "!"},
    ]
    bad.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(AlignDataError, match=r"bad.jsonl: record 1: conversations\[0\]: no 'from' \(role\)"):
        load_pairs([bad])
    loaded = load_pairs([bad], bad_records="skip")
    assert len(loaded.items) == 1
    assert dict(loaded.skipped) == {"missing_role": 1, "empty_answer": 1, "unknown_format": 1}
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(AlignDataError, match=r"broken.jsonl:2: not valid JSON"):  # file:line, as every reader
        load_pairs([broken], bad_records="skip")


def test_no_heldout_set_is_refused_naming_the_fields(tmp_path, tokenizer_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="valid_fraction is 0 and no valid files are given"):
        DpoConfig(train=[tmp_path / "t.jsonl"], valid_fraction=0)
    # A held-out file whose every pair is longer than seq_len leaves nothing to evaluate: an error
    # naming the stage's fields, before any training, instead of held-out metrics over no pairs.
    folder = make_model_folder(tmp_path, tokenizer_path)
    data = write_pairs(tmp_path / "train.jsonl", PAIRS)
    valid = write_pairs(tmp_path / "valid.jsonl", [("Tell me a long story. " * 20, "Once upon a time " * 20, "No.")])
    cfg = DpoConfig(train=[data], valid=[valid], seq_len=64, steps=1, batch_size=2)
    with pytest.raises(ValueError, match=r"dpo: no held-out pairs left: every one is longer than dpo.seq_len 64"):
        run_dpo(cfg, folder, tmp_path / "out", seed=0, log=lambda *a: None)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
