"""The curate stage: raw text -> normalized, filtered, deduplicated shards + rejects + report.

Entry point: `stage.run_curate(recipe, out_dir)`. Map: config.py (every threshold), text.py and
doc.py (tokens, shared per-document statistics), filters.py / langid.py / quality.py /
repetition.py / c4.py / code.py / pii.py (the rules), pipeline.py (one domain's chain),
minhash.py and dedup.py (exact + MinHash-LSH), shards.py (per-chunk jobs), executor.py and
ray_runner.py (where jobs run), report.py. User docs: docs/curate.md.
"""
