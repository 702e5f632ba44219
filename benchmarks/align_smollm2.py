"""SFT then DPO on SmolLM2-135M-Instruct (imported), on CPU: held-out loss and preference accuracy
before and after. Data are read from ../shared/data (non-commercial sets: never embedded).

    nice -n 10 .venv/bin/python benchmarks/align_smollm2.py MODEL_FOLDER OUT_DIR [SHARED_DATA]

MODEL_FOLDER: `openmill import SmolLM2-135M-Instruct.Q4_1.gguf --out ...` (tests/conftest.py caches
one in ~/.cache/openmill-tests/smollm2-135m-instruct). Prints one JSON line of results.
"""

import json
import sys
import time
from pathlib import Path

import torch

from openmill.align.config import DpoConfig, SftConfig
from openmill.align.dpo import run_dpo
from openmill.align.sft import run_sft

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "llamafactory_demo"


def main(model: Path, out: Path, data: Path = DATA) -> None:
    global DATA
    DATA = data
    if not DATA.is_dir():
        sys.exit(f"skipped: {DATA} not found")
    torch.set_num_threads(2)
    common = dict(seq_len=192, batch_size=4, warmup_steps=2, schedule="constant", log_every=1, checkpoint_every=1000)
    sft = SftConfig(train=[DATA / "alpaca_en_demo.json", DATA / "alpaca_zh_demo.json"], valid_fraction=0.02,
                    max_examples=64, steps=12, lr=5e-5, eval_every=12, **common)
    dpo = DpoConfig(train=[DATA / "dpo_en_demo.json", DATA / "dpo_zh_demo.json"], valid_fraction=0.05, max_examples=48,
                    loss="sigmoid", beta=0.1, steps=12, lr=2e-5, eval_every=12, **common)
    t0 = time.time()
    _, s = run_sft(sft, model, out / "sft", seed=0)
    t1 = time.time()
    _, d = run_dpo(dpo, out / "sft" / "final", out / "dpo", seed=0)
    t2 = time.time()
    print(json.dumps({"sft": {k: s[k] for k in ("val_loss", "train_conversations", "valid_conversations", "dropped_too_long")},
                      "sft_seconds": round(t1 - t0), "dpo": {k: d[k] for k in ("val_accuracy", "val_margin", "train_pairs", "valid_pairs", "dropped_too_long")},
                      "dpo_seconds": round(t2 - t1), "torch": torch.__version__}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *(Path(a) / "llamafactory_demo" for a in sys.argv[3:4]))
