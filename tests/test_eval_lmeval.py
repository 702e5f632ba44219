"""The lm-evaluation-harness adapter: an openmill folder registered as an lm-eval `LM` runs an
lm-eval task (local JSONL, no hub) and gives the same per-choice log-likelihoods as openmill's
own harness on the same records and prompt."""

from __future__ import annotations

import os

import pytest

from openmill.eval.runner import Options, run_task
from openmill.eval.tasks import TASK_DIR, load_tasks
from openmill.textmodel import load_text_model

from .test_eval_harness import folder  # noqa: F401 (fixture)
from .test_export_hf import tokenizer_path  # noqa: F401 (fixture)

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
