"""Data: readers, curation, tokenization to shards, mixture sampling."""
