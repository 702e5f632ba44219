"""The matrix products of one SmolLM2-135M decode step (projections fused), alone, by row count.

Random fp32 weights of the step's shapes (per layer: q/k/v 960x576, o 576x576, gate/up 3072x576,
down 576x1536; 30 layers; output head 49152x576): 121 products, 538 MB read per step. For 1, 2, 4,
8 and 64 input rows (batch-1 and batch-8 decoding, a short prefill), ms per step, median of 5
after one warm-up, 2 threads: MKL (`F.linear`), oneDNN on the plain row-major weights (what
`openmill.model.linear` runs for <= 16 rows of an unpacked model) and oneDNN on weights packed into
its blocked layout (`Transformer.pack_weights`). With --halves, also each product split in two
halves on two inter-op threads (1 intra-op thread each), a way of streaming with two cores that
lost (benchmarks/inference.md). A plain sum over as many bytes is the reading floor.

    .venv/bin/python benchmarks/decode_matvec.py [--halves]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
ROWS = (1, 2, 4, 8, 64)


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 2] * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--halves", action="store_true", help="also time products split across two inter-op threads")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    weights = [torch.randn(out, inp) for out, inp in SHAPES]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    flat = torch.cat([w.flatten() for w in weights])
    onednn = torch.ops.mkldnn._linear_pointwise
    print(f"{len(weights)} products, {flat.numel() * 4 / 1e6:.0f} MB of fp32 weights; plain sum over them {median_ms(flat.sum):.1f} ms")
    print("| rows | MKL | oneDNN, plain weights | oneDNN, packed weights |" + (" two halves (MKL) |" if args.halves else ""))
    print("|---:|---:|---:|---:|" + ("---:|" if args.halves else ""))
    with torch.no_grad():
        for rows in ROWS:
            x = {n: torch.randn(rows, n) for n in (576, 1536)}
            cells = [
                median_ms(lambda: [F.linear(x[w.shape[1]], w) for w in weights]),
                median_ms(lambda: [onednn(x[w.shape[1]], w, None, "none", [], "") for w in weights]),
                median_ms(lambda: [onednn(x[w.shape[1]], p, None, "none", [], "") for w, p in zip(weights, packed)]),
            ]
            if args.halves:
                halves = [(w[: w.shape[0] // 2].contiguous(), w[w.shape[0] // 2 :].contiguous()) for w in weights]

                def two_halves():
                    torch.set_num_threads(1)
                    for a, b in halves:
                        future = torch.jit.fork(F.linear, x[a.shape[1]], a)
                        torch.cat([torch.jit.wait(future), F.linear(x[b.shape[1]], b)], -1)
                    torch.set_num_threads(2)

                cells.append(median_ms(two_halves))
            print(f"| {rows} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
