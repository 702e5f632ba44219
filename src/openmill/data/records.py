"""Records of a JSON-lines text or of one JSON array, with errors naming file:line.

Task data (eval/data.py) and conversation/preference files (align/data.py) parse through here, so
a broken file reads the same everywhere: `FILE:LINE: not valid JSON (why)`. Callers open the file
(their own compressions and encodings) and turn `DataError` into their own error type.
"""

from __future__ import annotations

import json

from openmill.data.readers import DataError


def parse_json_records(text: str, where: str, lines: bool, objects: bool) -> list:
    """One record per non-blank line (lines=True) or the items of one JSON array. objects=True
    requires every record to be a JSON object; False leaves that to the caller, which may skip
    and count such records instead of failing."""
    if lines:
        records = []
        # split on "\n" only: str.splitlines also breaks on U+2028 and the like, legal inside JSON strings
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}:{n}: not valid JSON ({e.msg})") from None
                if objects and not isinstance(record, dict):
                    raise DataError(f"{where}:{n}: expected a JSON object")
                records.append(record)
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(records, list) or (objects and not all(isinstance(r, dict) for r in records)):
        raise DataError(f"{where}: expected a JSON array of {'objects' if objects else 'records'}")
    return records
