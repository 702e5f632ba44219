"""Weight-only quantization: the packed kernels against the dequantized matmul, the error bound of
each format, and a quantized model that still decodes like its full-precision self."""

import pytest
import torch
from torch import nn

from openmill.generate import SamplingParams, generate_batch
from openmill.generate.quantize import Int4Linear, Int8Linear, _dequantized_reference, quantize_model
from tests.test_model import randomised, tiny


@pytest.mark.parametrize("make", [lambda l: Int8Linear(l), lambda l: Int4Linear(l, 32), lambda l: Int4Linear(l, 128)], ids=["int8", "int4-g32", "int4-g128"])
@torch.no_grad()
def test_packed_kernel_equals_dequantized_matmul(make):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=False)
    q = make(linear)
    x = torch.randn(3, 5, 256)  # 15 rows: the packed kernel (decoding)
    assert (q(x) - _dequantized_reference(q, x)).abs().max() <= 1e-4
    long = torch.randn(2, 40, 256)  # 80 rows: the dequantized matmul (prefill)
    assert (q(long) - _dequantized_reference(q, long)).abs().max() <= 1e-4
    # The rounding error is at most half a step: scale/2 per weight.
    err = (q.dequantized() - linear.weight).abs()
    if isinstance(q, Int8Linear):
        assert (err <= q.scale[:, None] / 2 + 1e-7).all()
    else:
        step = q.scales_zeros[..., 0].transpose(0, 1).repeat_interleave(q.group_size, dim=1)
        assert (err <= step / 2 + 1e-6).all()


@torch.no_grad()
def test_int8_model_decodes_like_the_full_precision_model():
    model = randomised(tiny(dim=128, ffn_dim=256), seed=2)
    prompt = [[5, 17, 3, 80]]
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    full = generate_batch(model, prompt, greedy)[0].tokens
    idx = torch.tensor(prompt)
    ref = model(idx)
    quantize_model(model, "int8")
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 7 + 1  # every block linear + head
    assert (model(idx) - ref).abs().max() / ref.abs().max() < 0.02
    assert generate_batch(model, prompt, greedy)[0].tokens[:4] == full[:4]


def test_int4_refuses_a_group_that_does_not_divide_the_features():
    with pytest.raises(ValueError, match="not a multiple of group_size 64"):
        quantize_model(randomised(tiny(dim=96, ffn_dim=96)), "int4", group_size=64)
