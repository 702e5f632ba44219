"""Where openmill and llama.cpp part on SmolLM2-135M-Instruct: the Q4_1 file it comes from vs an
F32 re-export of the same (dequantized) weights, with llama.cpp's K/V cache in f16 or f32.

    python benchmarks/llamacpp_parity.py [--gguf SmolLM2-135M-Instruct.Q4_1.gguf] [--folder DIR]

openmill runs the imported fp32 folder (the Q4_1 weights dequantized exactly). llama.cpp runs
(a) the original Q4_1 file, whose matmuls round activations to Q8_1, and (b) openmill's F32
re-export of the folder (`export_gguf(folder, ..., "f32")`): the same weights, fp32 matmuls. Each
with K/V f16 (llama.cpp's default) and f32. Per prompt: llama.cpp's 32-token greedy continuation,
then both models' logits over prompt + continuation (teacher-forced): KL and max |Δlogit| per
position; and how many of openmill's own 32 greedy tokens equal llama.cpp's. Results:
docs/export.md ("Against llama.cpp itself").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np
import torch
import torch.nn.functional as F

from openmill.export import export_gguf
from openmill.generate import SamplingParams, generate_batch
from openmill.textmodel import load_text_model

CACHE = Path.home() / ".cache" / "openmill-tests"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "中国的首都是", "Once upon a time"]
CHATS = ["What is 2+2?", "Name three colors."]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path, default=CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--folder", type=Path, default=CACHE / "smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    model, tok = load_text_model(args.folder)
    chats = [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True) for q in CHATS]
    prompts = [tok.encode(p) for p in PROMPTS] + chats
    ours_greedy = [generate_batch(model, [p], SamplingParams(max_new_tokens=args.new_tokens, temperature=0))[0].tokens for p in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        f32 = export_gguf(args.folder, Path(tmp) / "smol-f32.gguf", "f32")
        for label, path in (("Q4_1 original", args.gguf), ("F32 re-export", f32)):
            for kv in ("f16", "f32"):
                kv_type = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[kv]
                llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, verbose=False, seed=0,
                                      logits_all=True, type_k=kv_type, type_v=kv_type)
                kls, maxes, equal_runs, equal_tokens = [], [], 0, 0
                for p, ours in zip(prompts, ours_greedy, strict=True):
                    llm.reset()
                    cont = []
                    for t in llm.generate(p, temp=0.0, top_k=1, repeat_penalty=1.0):
                        cont.append(t)
                        if len(cont) == args.new_tokens:
                            break
                    ids = p + cont
                    llm.reset()
                    llm.eval(ids)
                    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)]))
                    with torch.no_grad():
                        mine = model(torch.tensor([ids]))[0]
                    kls.append(float(F.kl_div(mine.log_softmax(-1), theirs.log_softmax(-1), log_target=True, reduction="none").sum(-1).max()))
                    maxes.append(float((mine - theirs).abs().max()))
                    same = next((i for i, (a, b) in enumerate(zip(ours, cont)) if a != b), len(cont))
                    equal_runs += same == len(cont) == len(ours)
                    equal_tokens += same
                del llm
                row = {"file": label, "kv": kv, "prompts": len(prompts), "max_kl": max(kls), "max_abs_dlogit": max(maxes),
                       "max_abs_dlogit_per_prompt": [round(m, 4) for m in maxes],
                       "greedy_runs_equal": f"{equal_runs}/{len(prompts)}",
                       "greedy_tokens_equal_before_first_difference": f"{equal_tokens}/{len(prompts) * args.new_tokens}"}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
