"""Packing: several documents in one row with doc_ids give each document exactly its unpacked result."""

import torch

from openmill.config import ModelConfig
from openmill.model import build_model, document_positions


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, **kw).resolved(vocab_size=97)
    return build_model(cfg).eval()


def test_document_positions_restart():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


def test_packed_logits_equal_unpacked():
    for kw in ({}, {"sliding_window": 3}):
        model = _model(**kw)
        docs = [torch.randint(0, 97, (n,)) for n in (7, 12, 5)]
        packed = torch.cat(docs)[None]
        doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
        with torch.no_grad():
            got = model(packed, doc_ids=doc_ids)[0]
            want = torch.cat([model(d[None])[0] for d in docs])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
