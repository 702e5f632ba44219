"""Named model shapes of published models (fields of ModelConfig).

Parameter counts are checked against the published figures in tests/test_presets.py.
"""

PRESETS: dict[str, dict] = {
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                      max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5),
}
