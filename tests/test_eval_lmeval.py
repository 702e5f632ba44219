"""The lm-evaluation-harness adapter: an openmill folder registered as an lm-eval `LM` runs an
lm-eval task (local JSONL, no hub) and gives the same per-choice log-likelihoods as openmill's
own harness on the same records and prompt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from openmill.eval.runner import Options, run_task
from openmill.eval.tasks import TASK_DIR, load_tasks
from openmill.export.folder import write_model_folder
from openmill.export.hf import export_hf
from openmill.textmodel import TextTokenizer, load_text_model
from openmill.train.pretrain import load_model_folder

from .test_eval_harness import folder  # noqa: F401 (fixture)
from .test_export_hf import tokenizer_path  # noqa: F401 (fixture)
from .test_textmodel import chatml_folder

lm_eval = pytest.importorskip("lm_eval", reason="the eval-harness extra is not installed")

PIQA = f"""task: local_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {TASK_DIR / "data" / "piqa.jsonl"}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_choice: "{{{{[sol1, sol2]}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_openmill_lm_runs_an_lm_eval_task_with_our_loglikelihoods(folder, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(os.environ, "HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    from openmill.eval.lm_eval_adapter import OpenmillLM

    (tmp_path / "piqa.yaml").write_text(PIQA)
    out = lm_eval.simple_evaluate(
        model=OpenmillLM(folder, batch_size=4), tasks=["local_piqa"], limit=6, log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(out["samples"]["local_piqa"], key=lambda s: s["doc_id"])]
    model, tok = load_text_model(folder)
    ours = [r["lls"] for r in run_task(model, tok, load_tasks()["quick_piqa"], Options(limit=6)).records]
    assert len(theirs) == 6
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4)


# ---------------------------------------------------------------------------------- chat mode

PIQA_GEN = """task: local_piqa_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: "{{{{sol1}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


def runnable_chatml_folder(root: Path, tokenizer_path: Path) -> Path:  # noqa: F811
    """chatml_folder with two embedding and output rows added, so its ChatML markers can be run,
    and room for PIQA's chat prompts (512 positions)."""
    folder = chatml_folder(root, tokenizer_path)
    model, cfg = load_model_folder(folder)
    extra = torch.randn(2, cfg.dim, generator=torch.Generator().manual_seed(0)) * 0.02
    state = {k: torch.cat([v, extra]) if k in ("embed_tokens.weight", "lm_head.weight") else v
             for k, v in model.state_dict().items()}
    grown = cfg.model_copy(update={"vocab_size": cfg.vocab_size + 2, "max_seq_len": 512})
    tok = TextTokenizer.from_folder(folder)
    write_model_folder(root / "runnable", grown, state, tok.hf.to_str(), tok.info, {"test": True})
    return root / "runnable"


@pytest.mark.parametrize("template", ["openmill", "chatml"])
def test_chat_template_runs_give_lm_evals_hf_loglikelihoods_and_generations(template, request, tmp_path, monkeypatch):
    """With apply_chat_template=True the adapter gives what lm-eval's own HF model gives on the
    same model exported to transformers: the same rendered contexts, per-choice log-likelihoods
    (1e-4), accuracy and greedy generations. The openmill template starts with BOS and ends in its
    assistant marker; ChatML's header ends in a newline, which lm-eval moves into the answer."""
    pytest.importorskip("transformers")
    monkeypatch.setitem(os.environ, "HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from openmill.eval.lm_eval_adapter import OpenmillLM

    if template == "openmill":
        path = request.getfixturevalue("folder")
    else:
        path = runnable_chatml_folder(tmp_path / "m", request.getfixturevalue("tokenizer_path"))
    export_hf(path, tmp_path / "hf")
    (tmp_path / "piqa.yaml").write_text(PIQA)
    (tmp_path / "piqa_gen.yaml").write_text(PIQA_GEN.format(data=TASK_DIR / "data" / "piqa.jsonl"))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)

    def run(lm):
        out = lm_eval.simple_evaluate(model=lm, tasks=["local_piqa", "local_piqa_gen"], limit=4, log_samples=True,
                                      apply_chat_template=True, task_manager=manager)
        samples = {t: sorted(s, key=lambda s: s["doc_id"]) for t, s in out["samples"].items()}
        return out["results"], samples

    ours, our_samples = run(OpenmillLM(path, batch_size=4))
    theirs, their_samples = run(HFLM(pretrained=str(tmp_path / "hf"), batch_size=4, device="cpu", dtype="float32"))
    mc = our_samples["local_piqa"], their_samples["local_piqa"]
    gen = our_samples["local_piqa_gen"], their_samples["local_piqa_gen"]
    assert len(mc[0]) == len(gen[0]) == 4
    for a, b in zip(*mc):
        assert a["arguments"] == b["arguments"]  # the same rendered context and answers
        assert a["arguments"][0][0].startswith("<|bos|><|user|>" if template == "openmill" else "<|im_start|>")
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in (a, b)]
        assert lls[0] == pytest.approx(lls[1], abs=1e-4)
    assert ours["local_piqa"]["acc,none"] == theirs["local_piqa"]["acc,none"]
    for a, b in zip(*gen):
        assert a["arguments"] == b["arguments"] and a["filtered_resps"] == b["filtered_resps"]
    # Contexts rendered elsewhere (lm-eval's request cache): chat=true encodes them as chat too.
    from types import SimpleNamespace

    requests = [SimpleNamespace(args=tuple(arg)) for s in mc[0] for arg in s["arguments"]]
    expected = [float(r[0]) for s in mc[0] for r in s["filtered_resps"]]
    cached = [ll for ll, _ in OpenmillLM(path, batch_size=4, chat="true").loglikelihood(requests)]
    assert cached == pytest.approx(expected, abs=1e-6)
    plain = [ll for ll, _ in OpenmillLM(path, batch_size=4).loglikelihood(requests)]
    assert plain != pytest.approx(expected, abs=1e-3)  # without it they would be scored as plain text
