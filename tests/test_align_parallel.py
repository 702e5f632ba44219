"""SFT and DPO under torchrun: 2 CPU processes on gloo, each on a disjoint half of every global
batch, follow the single-process trajectory (training and held-out losses, final weights), write
one output, and resume from a single process's checkpoint."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from openmill.align.config import SftConfig
from openmill.align.train import epoch_order, eval_share, step_share
from openmill.config import load_recipe
from openmill.model import build_model
from openmill.stages import run_recipe
from openmill.train.metrics import read_metrics
from openmill.train.parallel import World
from openmill.train.pretrain import save_trained_model

from .conftest import REPO
from .test_export_hf import VOCAB, tokenizer_path  # noqa: F401 (fixture)
from .test_model import tiny

TINY = REPO / "recipes" / "tiny.yaml"
DATA = REPO / "data" / "align"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tokenizer_path):  # noqa: F811 (fixture)
    """A tiny tied-embedding model as initialised for training (losses near ln(vocab)); the export
    tests' O(1)-logit weights take first steps large enough to amplify rounding."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("align_parallel") / "model"
    save_trained_model(folder, build_model(tiny(vocab_size=VOCAB, max_seq_len=192, tie_embeddings=True)), tokenizer_path, {})
    return folder


def settings(stage: str, model, root, parallel: str) -> list[str]:
    """4 steps of 4 rows/pairs in 2 micro-batches (2 processes: one each), held out every 2 steps."""
    return [
        f"run_dir={root}", f"stages=[{stage}]", f"{stage}.init_from={model}",
        f"{stage}.train=[{DATA / f'identity_{stage}.jsonl'}]", f"{stage}.valid_fraction=0.2", f"{stage}.seq_len=192",
        f"{stage}.steps=4", f"{stage}.batch_size=4", f"{stage}.grad_accum=2", f"{stage}.lr=3e-3",
        f"{stage}.warmup_steps=1", f"{stage}.log_every=1", f"{stage}.eval_every=2", f"{stage}.checkpoint_every=2",
        f"{stage}.keep_checkpoints=2", f"{stage}.chat_prompts=[]", f"{stage}.parallel={parallel}",
    ]  # fmt: skip


def torchrun(stage: str, overrides: list[str]) -> None:
    """The stage in 2 processes, as tests/test_pretrain.py launches pretraining."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "openmill.cli", stage, str(TINY), *[f"--set={s}" for s in overrides],
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]


def assert_same_numbers(a: list[dict], b: list[dict], steps: list[int]) -> None:
    """Training and held-out losses of the same steps, to float tolerance."""
    a, b = [r for r in a if r["step"] in steps], [r for r in b if r["step"] in steps]
    assert [(r["step"], sorted(r)) for r in a] == [(r["step"], sorted(r)) for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val/loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (key, ra["step"], ra[key], rb[key])


def files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_match_one(chat_model, tmp_path, stage, parallel):
    """~10 s each on 2 cores. SFT's rows keep different numbers of answer tokens on the two
    processes: an average of per-process token means misses rel 1e-5 at step 1 (1e-4 off)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_recipe(load_recipe(TINY, settings(stage, chat_model, one, parallel)))
    torchrun(stage, settings(stage, chat_model, two, parallel))

    a, b = read_metrics(one / stage / "metrics.jsonl"), read_metrics(two / stage / "metrics.jsonl")
    assert [r["step"] for r in a if "loss" in r] == [1, 2, 3, 4]
    assert_same_numbers(a, b, steps=list(range(5)))  # and every record once: process 1 wrote none of its own
    heldout = [r["val/loss"] for r in a if "val/loss" in r]
    assert abs(heldout[-1] - heldout[0]) > 1e-3  # it trained: not a match of two idle runs

    assert files(two / stage) == files(one / stage)  # one final folder, one set of checkpoints, one manifest
    assert [json.loads((root / stage / "manifest.json").read_text())["metrics"]["processes"] for root in (one, two)] == [1, 2]
    # the final folder holds the whole trained weights (gathered from FSDP2's shards)
    wa, wb = (load_file(str(root / stage / "final" / "model.safetensors")) for root in (one, two))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-4)


def test_two_processes_resume_from_a_one_process_checkpoint(chat_model, tmp_path):
    """A checkpoint holds whole weights and optimizer state: 2 processes resume one process's
    step-2 checkpoint and take the same steps 3 and 4."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_recipe(load_recipe(TINY, settings("sft", chat_model, one, "fsdp")))
    shutil.copytree(one / "sft" / "checkpoints" / "step_000002", two / "sft" / "checkpoints" / "step_000002")
    torchrun("sft", settings("sft", chat_model, two, "fsdp"))
    b = read_metrics(two / "sft" / "metrics.jsonl")
    assert [r["step"] for r in b if "loss" in r] == [3, 4]
    assert_same_numbers(read_metrics(one / "sft" / "metrics.jsonl"), b, steps=[3, 4])


def test_processes_split_every_global_batch_and_every_heldout_pass():
    cfg = SftConfig(batch_size=8, grad_accum=2)
    for step in range(3):
        shares = [step_share(step, cfg, 13, 0, World(rank=r, size=2)) for r in range(2)]
        assert shares[0] + shares[1] == epoch_order(step, 8, 13, 0) and len(shares[0]) == 4
    # 5 batches on 2 processes: 3 forwards each, batch 0 repeated (uncounted) to keep them in step
    passes = [eval_share(5, World(rank=r, size=2)) for r in range(2)]
    assert passes == [[(0, True), (2, True), (4, True)], [(1, True), (3, True), (0, False)]]


def test_tokens_are_counted_over_every_process(chat_model, tmp_path):
    """Rows are padded per micro-batch: one process in 2 micro-batches and 2 processes in one each
    pad the same rows alike, so the logged tokens must agree (process 0's count x 2 does not)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_recipe(load_recipe(TINY, settings("sft", chat_model, one, "ddp")))
    torchrun("sft", [*settings("sft", chat_model, two, "ddp"), "sft.grad_accum=1"])
    a, b = (read_metrics(root / "sft" / "metrics.jsonl") for root in (one, two))
    tokens = [[r["tokens"] for r in m if "loss" in r] for m in (a, b)]
    assert tokens[0] == tokens[1] and len(set(tokens[0])) == 4
    assert_same_numbers(a, b, steps=list(range(5)))
