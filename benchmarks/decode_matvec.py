"""The matrix-vector products of one SmolLM2-135M decode step (batch 1, projections fused), alone.

Random fp32 weights of the step's shapes (per layer: q/k/v 960x576, o 576x576, gate/up 3072x576,
down 576x1536; 30 layers; output head 49152x576): 121 products, 538 MB read per step. Times, median
of 5 after one warm-up: MKL (`F.linear`) and oneDNN (`openmill.model.linear`'s kernel) at 1 and 2
threads, and each product split in two halves run on two inter-op threads (1 intra-op thread each),
to see whether two cores can stream the weights faster than one product call does.

    .venv/bin/python benchmarks/decode_matvec.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 2] * 1e3


def main():
    torch.manual_seed(0)
    weights = [torch.randn(out, inp) for out, inp in SHAPES]
    halves = [(w[: w.shape[0] // 2].contiguous(), w[w.shape[0] // 2 :].contiguous()) for w in weights]
    x = {n: torch.randn(1, n) for n in (576, 1536)}

    def mkl():
        for w in weights:
            F.linear(x[w.shape[1]], w)

    def onednn():
        for w in weights:
            torch.ops.mkldnn._linear_pointwise(x[w.shape[1]], w, None, "none", [], "")

    def two_halves():
        for a, b in halves:
            future = torch.jit.fork(F.linear, x[a.shape[1]], a)
            torch.cat([torch.jit.wait(future), F.linear(x[b.shape[1]], b)], -1)

    mb = sum(w.numel() for w in weights) * 4 / 1e6
    print(f"{len(weights)} products, {mb:.0f} MB of fp32 weights")
    with torch.no_grad():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            print(f"{threads} thread(s): MKL {median_ms(mkl):.1f} ms, oneDNN {median_ms(onednn):.1f} ms")
        torch.set_num_threads(1)
        print(f"two halves on {torch.get_num_interop_threads()} inter-op threads: {median_ms(two_halves):.1f} ms")


if __name__ == "__main__":
    main()
