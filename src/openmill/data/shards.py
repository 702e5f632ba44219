"""Token shards: the on-disk format the tokenize stage writes and training reads.

One folder per domain and split (tokens/<domain>/<split>/):

    shard_00000.bin        raw token ids (dtype in index.json), documents back to back, each followed by EOS
    shard_00000.idx.npy    int64 end offset of every document within its shard (last one = shard length)
    shard_00000.done.json  completion marker, written after the two files above (see data/tokenize.py)
    index.json             {"dtype", "shards": [{"file", "tokens", "docs", "bytes"}], "tokens", "docs", "bytes"}
                           written last; "bytes" counts the UTF-8 bytes of the source text

Readers memory-map the shards, so opening a corpus costs nothing and reading costs only what is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from openmill.data.readers import DataError

INDEX = "index.json"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: uint16 up to 65,536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


class TokenShards:
    """All tokens of one domain and split as one flat sequence, read through memory maps."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        if not index_path.is_file():
            raise DataError(f"{index_path}: not found (run the tokenize stage first)")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        self.dtype = np.dtype(index["dtype"])
        self.shards = index["shards"]
        self.n_docs = int(index["docs"])
        self.n_bytes = int(index["bytes"])
        lengths = np.array([s["tokens"] for s in self.shards], dtype=np.int64)
        # starts[i] = global offset of shard i's first token; starts[-1] = n_tokens.
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.n_tokens = int(self.starts[-1])
        for s in self.shards:  # a truncated or missing file fails here, not in the middle of training
            path = self.folder / s["file"]
            expected = s["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(f"{path}: expected {expected} bytes ({s['tokens']} {self.dtype} tokens)")
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self.n_tokens

    def _map(self, i: int) -> np.memmap:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.folder / self.shards[i]["file"], dtype=self.dtype, mode="r")
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries as needed."""
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(f"{self.folder}: read [{start}, {start + length}) outside [0, {self.n_tokens})")
        out = np.empty(length, dtype=np.int64)
        done = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while done < length:
            offset = start + done - int(self.starts[shard])
            take = min(length - done, int(self.starts[shard + 1]) - (start + done))
            out[done : done + take] = self._map(shard)[offset : offset + take]
            done += take
            shard += 1
        return out

    def doc_ends(self) -> np.ndarray:
        """Global end offset of every document (int64, ascending): document i is [ends[i-1], ends[i])."""
        parts = [
            np.load(self.folder / f"{Path(s['file']).stem}.idx.npy") + self.starts[i] for i, s in enumerate(self.shards)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def __getstate__(self):
        # Memory maps must not travel to DataLoader workers (pickling would copy the data).
        return {**self.__dict__, "_maps": {}}
