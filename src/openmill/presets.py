"""Named model shapes of published models (fields of ModelConfig), each with its published size.

Every field is copied from the model's Hugging Face `config.json` (hidden_size -> dim,
intermediate_size -> ffn_dim, num_hidden_layers -> n_layers, num_attention_heads -> n_heads,
num_key_value_heads -> n_kv_heads, max_position_embeddings -> max_seq_len, rms_norm_eps -> norm_eps,
tie_word_embeddings -> tie_embeddings; a config without rope_theta means transformers' default
10000.0). `PUBLISHED` holds the parameter count the owners (or their released weights) state, with
where it is stated; tests/test_presets.py checks our meta-device count against it (within 0.5%)
and against transformers' own count of the same config (exactly).

Where a report gives only the size in the model's name ("7B"), the figure comes from the released
checkpoint: bytes of an unquantized or Q8_0 file / bytes per weight (F32 4, F16 2, Q8_0 34/32),
to the three digits the hub shows.
"""

from __future__ import annotations

from typing import NamedTuple


class Published(NamedTuple):
    params: float  # parameter count as published (rounded as published)
    source: str


PRESETS: dict[str, dict] = {}
PUBLISHED: dict[str, Published] = {}

# Llama-2-7B: meta-llama/Llama-2-7b-hf config.json (rms_norm_eps 1e-5 in the current config).
PRESETS["llama2-7b"] = dict(
    vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
    max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
)
PUBLISHED["llama2-7b"] = Published(6.74e9, "meta-llama/Llama-2-7b-hf model card, safetensors size: 6.74B params")

# Mistral-7B v0.1: mistralai/Mistral-7B-v0.1 config.json; sliding window 4096 (Mistral 7B paper, sec. 2).
PRESETS["mistral-7b"] = dict(
    vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
    max_seq_len=32768, rope_theta=10000.0, norm_eps=1e-5, sliding_window=4096, tie_embeddings=False,
)
PUBLISHED["mistral-7b"] = Published(
    7.24e9, "mistralai/Mistral-7B-v0.1 model card, safetensors size: 7.24B params (the launch post rounds to 7.3B)"
)

# Moxin-7B (Moxin-LLM, arXiv 2412.06845): Mistral-7B extended from 32 to 36 blocks. Fields from the
# moxin-org/moxin-llm-7b / moxin-chat-7b config.json (MistralForCausalLM, 36 layers, sliding_window 4096).
PRESETS["moxin-7b"] = dict(
    vocab_size=32000, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=14336,
    max_seq_len=32768, rope_theta=10000.0, norm_eps=1e-5, sliding_window=4096, tie_embeddings=False,
)
PUBLISHED["moxin-7b"] = Published(
    8.1e9, "released weights: moxin-chat-7b-f16.gguf (second-state/moxin-chat-7b-GGUF) is 16.2 GB = 8.1B x 2 bytes;"
    " the report names it 7B",
)

# Aquila2-7B: the 2023 release the Aquila2 report (arXiv 2408.07410) describes, 100k-token BPE vocabulary:
# BAAI/Aquila2-7B / AquilaChat2-7B config.json (vocab 100008, MHA, 2048 positions, no rope_theta).
# BAAI later re-uploaded Aquila2 weights with a 143973-token vocabulary, 8192 positions and rope_theta 1e6.
PRESETS["aquila2-7b"] = dict(
    vocab_size=100008, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
    max_seq_len=2048, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
)
PUBLISHED["aquila2-7b"] = Published(
    7.30e9, "released weights: AquilaChat2-7B-16K.F32.gguf (mzwing/AquilaChat2-7B-16K-GGUF, same shape) is"
    " 29.2 GB = 7.30B x 4 bytes; the report names it 7B",
)

# Aquila2-34B: BAAI/Aquila2-34B config.json of the 2023 release (commit 356733c; LlamaForCausalLM shape, GQA 48/8,
# vocab 100008, 4096 positions, no rope_theta).
PRESETS["aquila2-34b"] = dict(
    vocab_size=100008, dim=6144, n_layers=60, n_heads=48, n_kv_heads=8, ffn_dim=24576,
    max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
)
PUBLISHED["aquila2-34b"] = Published(
    33.7e9, "released weights: AquilaChat2-34B-16K.Q8_0.gguf (mradermacher/AquilaChat2-34B-16K-GGUF, same shape)"
    " is 35.8 GB = 33.7B x 34/32 bytes; the report names it 34B",
)

# SOLAR-10.7B: upstage/SOLAR-10.7B-v1.0 config.json. Depth up-scaled Mistral-7B (32 -> 48 layers) run as
# LlamaForCausalLM: full attention over 4096 positions, no sliding window.
PRESETS["solar-10.7b"] = dict(
    vocab_size=32000, dim=4096, n_layers=48, n_heads=32, n_kv_heads=8, ffn_dim=14336,
    max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
)
PUBLISHED["solar-10.7b"] = Published(10.7e9, "SOLAR 10.7B paper (arXiv 2312.15166) and model card: 10.7B parameters")
