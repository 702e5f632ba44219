"""Tasks as data: each benchmark is a YAML entry (data file, prompt template, choices, target,
few-shot rule, metrics), validated here into a `TaskSpec`. No task has code of its own.

Fields that produce text (`text`, `continuation`, `description`, `fewshot_target`) are Jinja
templates ("Question: {{question}}\nAnswer:"); fields that produce values (`choices`, `target`)
are Jinja expressions over the record ("[sol1, sol2]", "'ABCD'.index(answer)"). Both run in a
sandbox, as lm-evaluation-harness renders its templates, so a task YAML can never run code.

Every problem is one line naming the task file, the task and the field (or file:line for data).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TASK_DIR = Path(__file__).parent / "tasks"

KINDS = ("multiple_choice", "cloze", "generate", "perplexity", "strict_choice")
METRICS = {
    "multiple_choice": {"acc", "acc_norm", "acc_bytes", "mc2"},
    "cloze": {"acc", "perplexity"},
    "generate": {"exact_match_strict", "exact_match_flexible"},
    "perplexity": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
    "strict_choice": {"exact_letter"},
}


class TaskError(ValueError):
    """A task that cannot run; one line naming the task file, task and field, or data file:line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    """Where a task's records live. `{data_dir}` in `path` is the eval config's shared-data folder;
    other relative paths are relative to the task YAML (data embedded in the package)."""

    path: str  # a file, or a glob (one record set per matching file, e.g. MMLU's 57 subjects)
    format: Literal["jsonl", "json", "csv", "lines", "text"] | None = None  # None: from the suffix
    member: str | None = None  # a glob inside a .zip archive (C-Eval)
    fields: list[str] | None = None  # `lines`: names of the consecutive lines of one record
    labels: str | None = None  # a file with one label a line, joined to the records as `label`
    split_on: str | None = None  # `text`: a regex of lines that start a new document (WikiText articles)
    file_field: str | None = None  # store each record's file stem (minus `strip_suffix`) under this name
    strip_suffix: str = ""


class FewShot(_Strict):
    count: int = Field(0, ge=0)
    data: DataSpec | None = None  # default: the task's own records, the current one excluded
    sampler: Literal["first", "random"] = "random"
    match: str | None = None  # draw only examples whose field equals the current record's (MMLU's subject)
    delimiter: str = "\n\n"


class TaskSpec(_Strict):
    name: str
    kind: Literal[KINDS]
    data: DataSpec
    text: str  # template: the prompt (a perplexity task: the document)
    choices: str | None = None  # expression: the list of answer strings (multiple_choice, strict_choice)
    target: str | None = None  # expression: gold index (choice tasks), gold labels (mc2) or answer (generate)
    continuation: str | None = None  # template: cloze continuation; in a choice task the shared
    # continuation scored after each choice placed in the context (WinoGrande's partial scoring)
    target_delimiter: str = " "
    description: str = ""  # template: text before the few-shot examples
    fewshot_target: str | None = None  # template: an example's answer as shown in few-shot (generate)
    fewshot: FewShot = Field(default_factory=FewShot)
    metrics: list[str]
    until: list[str] = Field(default_factory=lambda: ["\n\n"])  # generation stops at any of these
    max_new_tokens: int = Field(256, gt=0)
    extract: dict[str, str] = Field(default_factory=dict)  # generate: metric -> regex (last match, group 1 if any)
    ignore: list[str] = Field(default_factory=list)  # generate: regexes removed before comparing
    license: str = ""
    source: str = ""  # the YAML file it came from (filled by the loader)

    @model_validator(mode="after")
    def _consistent(self):
        unknown = [m for m in self.metrics if m not in METRICS[self.kind]]
        if unknown:
            raise ValueError(f"metrics: unknown metric {unknown[0]!r} for kind {self.kind}; choices: {', '.join(sorted(METRICS[self.kind]))}")
        needs = {
            "multiple_choice": ("choices", "target"),
            "strict_choice": ("choices", "target"),
            "cloze": ("continuation",),
            "generate": ("target",),
            "perplexity": (),
        }[self.kind]
        for field in needs:
            if getattr(self, field) is None:
                raise ValueError(f"{field}: required for kind {self.kind}")
        if self.kind == "generate":
            missing = [m for m in self.metrics if m.startswith("exact_match_") and m.removeprefix("exact_match_") not in self.extract]
            if missing:
                raise ValueError(f"extract: {missing[0]} needs an extract.{missing[0].removeprefix('exact_match_')} regex")
        for name, template in (("text", self.text), ("continuation", self.continuation), ("description", self.description)):
            if template is not None:
                _check_template(name, template)
        for name, expr in (("choices", self.choices), ("target", self.target)):
            if expr is not None:
                _check_expression(name, expr)
        return self

    def resolve(self, path: str, data_dir: Path) -> Path:
        """A data path from this task's YAML as a real path (see DataSpec)."""
        if "{data_dir}" in path:
            return Path(path.replace("{data_dir}", str(data_dir)))
        return Path(self.source).parent / path


# ------------------------------------------------------------------------------ templates


@lru_cache(maxsize=1)
def _env():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(keep_trailing_newline=True)


@lru_cache(maxsize=None)
def template(source: str):
    return _env().from_string(source)


@lru_cache(maxsize=None)
def expression(source: str):
    return _env().compile_expression(source)


def _check_template(field: str, source: str) -> None:
    from jinja2 import TemplateSyntaxError

    try:
        template(source)
    except TemplateSyntaxError as e:
        raise ValueError(f"{field}: not a valid template ({e.message})") from None


def _check_expression(field: str, source: str) -> None:
    from jinja2 import TemplateSyntaxError

    try:
        expression(source)
    except TemplateSyntaxError as e:
        raise ValueError(f"{field}: not a valid expression ({e.message})") from None


# -------------------------------------------------------------------------------- loading


def load_task_file(path: Path) -> dict[str, TaskSpec]:
    """A YAML file holding a list of task entries (or one entry)."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    entries = tree if isinstance(tree, list) else [tree]
    tasks = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise TaskError(f"{path}: entry {n}: expected a mapping with name, kind, data, text, metrics")
        where = f"{path}: task {entry.get('name', f'#{n}')}"
        try:
            spec = TaskSpec.model_validate({**entry, "source": str(path)})
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])  # empty for _consistent: its message names the field
            message = "required field missing" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown field"
            raise TaskError(f"{where}: {field + ': ' if field else ''}{message}") from None
        if spec.name in tasks:
            raise TaskError(f"{where}: name: defined twice in this file")
        tasks[spec.name] = spec
    return tasks


def load_tasks(extra_files: list[Path] = ()) -> dict[str, TaskSpec]:
    """Every built-in task (src/openmill/eval/tasks/*.yaml) plus the tasks of `extra_files`;
    an extra task with a built-in name replaces it."""
    tasks: dict[str, TaskSpec] = {}
    for path in sorted(TASK_DIR.glob("*.yaml")):
        if path.name != "presets.yaml":
            tasks.update(load_task_file(path))
    for path in extra_files:
        tasks.update(load_task_file(Path(path)))
    return tasks


def load_presets() -> dict[str, dict[str, int | None]]:
    """preset name -> {task name: few-shot count (None = the task's own)}."""
    tree = yaml.safe_load((TASK_DIR / "presets.yaml").read_text(encoding="utf-8"))
    presets = {}
    for name, entries in tree.items():
        presets[name] = {}
        for entry in entries:
            task, shots = (entry, None) if isinstance(entry, str) else next(iter(entry.items()))
            presets[name][task] = shots
    return presets
