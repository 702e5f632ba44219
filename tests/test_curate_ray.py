"""The same stage on Ray (local mode): identical outputs to the local executor, duplicates found across shards."""

import pytest

from openmill.data.curate.stage import run_curate

from .conftest import DEFAULT_DATA
from .test_curate_stage import _outputs_bytes, dropped, read_jsonl, recipe_for, write_jsonl


@pytest.mark.slow
def test_ray_matches_local_and_dedups_across_shards(tmp_path):
    pytest.importorskip("ray")
    en = [x["text"] for x in read_jsonl(DEFAULT_DATA / "en" / "train.jsonl")[:30]]
    # copies of early documents placed in another file and in later shards: found only by global dedup
    files = {
        "en": {
            "train": [
                write_jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "text": t} for i, t in enumerate(en)]),
                write_jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "text": t} for i, t in enumerate(en[:3])]),
            ],
            "valid": [write_jsonl(tmp_path / "v.jsonl", [{"id": "v", "text": en[29] + " The end."}])],
        }
    }
    local = recipe_for(tmp_path / "local", files, docs_per_shard=5)
    ray_r = recipe_for(tmp_path / "ray", files, docs_per_shard=5, executor="ray", workers=2)
    _, m_local = run_curate(local, local.root / "curate")
    _, m_ray = run_curate(ray_r, ray_r.root / "curate")
    assert dropped(m_ray, "en")[("dedup", "exact_duplicate")] == 3
    assert dropped(m_ray, "en")[("dedup", "valid_duplicates_train")] == 1
    assert m_ray["by_domain"] == m_local["by_domain"]
    assert _outputs_bytes(ray_r.root / "curate") == _outputs_bytes(local.root / "curate")
