"""Recipes: pydantic models for every stage, loaded from YAML with `--set a.b=value` overrides.

A recipe is one YAML file. Unknown keys are errors (a typo must never be silently ignored), and
every error is reported as one line naming the file, the dotted field and what was expected.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from openmill.align.config import DpoConfig, SftConfig
from openmill.data.curate.config import CurateConfig
from openmill.eval.config import EvalConfig
from openmill.surgery.config import ContinuePretrainConfig, UpscaleConfig
from openmill.train.heurimentor_config import MonitorConfig, PhaseConfig, PolicyConfig, SourceConfig


class RecipeError(ValueError):
    """A recipe that cannot run; the message is one line naming the file or field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------- data


class DomainData(Strict):
    """Documents of one domain. Files are .jsonl (one {"text": ...} a line) or .txt (one document a file)."""

    train: list[Path]
    valid: list[Path]
    text_field: str = "text"


class DataConfig(Strict):
    domains: dict[str, DomainData]

    @model_validator(mode="after")
    def _non_empty(self):
        if not self.domains:
            raise ValueError("at least one domain is required")
        return self


# ----------------------------------------------------------------------------------- tokenizer

# The names of openmill.pretokenizers.PRETOKENIZERS (kept here as a literal: config imports no tokenizer code).
PRETOKENIZERS = ("gpt2", "cl100k", "cl100k_digits", "cjk_runs", "cjk_chars", "cjk_chars_digits")


class TokenizerConfig(Strict):
    vocab_size: int = Field(8192, ge=512)
    # How text is split before BPE merges; see docs/tokenizer.md for the measured comparison.
    pretokenizer: Literal[PRETOKENIZERS] = "cl100k"
    # Relative share of training bytes per domain (missing domains get 0); kept exactly, see tokenizer.training_texts.
    mixture: dict[str, float] = Field(default_factory=dict)
    # Cap on the bytes of text the BPE trainer sees (taken by the mixture), to bound time.
    max_train_bytes: int = Field(20_000_000, gt=0)
    min_frequency: int = Field(2, ge=1)


class TokenizeConfig(Strict):
    workers: int = Field(2, ge=1)
    # Documents per shard file; a shard is the unit of parallelism and of restart.
    docs_per_shard: int = Field(2000, ge=1)
    # A shard also closes once it holds this many bytes of text: memory stays bounded when documents are books.
    max_shard_bytes: int = Field(64_000_000, gt=0)


# --------------------------------------------------------------------------------------- model


class ModelConfig(Strict):
    """One decoder-only transformer: RMSNorm, SwiGLU, RoPE, GQA, optional sliding window.

    Derived fields (`head_dim`, `ffn_dim`, `vocab_size` from the tokenizer) are filled only when unset.
    """

    preset: str | None = None  # a name from openmill.presets; explicit fields override it
    vocab_size: int | None = None
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (multi-head attention)
    head_dim: int | None = None  # None = dim // n_heads
    ffn_dim: int | None = None  # None = SwiGLU 8/3 * dim rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    sliding_window: int | None = None  # Mistral-style local attention span, in tokens
    tie_embeddings: bool = False
    init_std: float = 0.02

    @model_validator(mode="after")
    def _shape(self):
        # Check the shape the model will have: the preset's fields under the explicit ones.
        f = self._merged_fields()
        n_heads, dim = f.get("n_heads", self.n_heads), f.get("dim", self.dim)
        kv = f.get("n_kv_heads") or n_heads
        if n_heads <= 0 or kv <= 0 or n_heads % kv != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({kv})")
        if f.get("head_dim") is None and dim % n_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads}) or head_dim given")
        window = f.get("sliding_window")
        if window is not None and window <= 0:
            raise ValueError(f"sliding_window must be positive, got {window}")
        return self

    def _merged_fields(self) -> dict:
        from openmill.presets import PRESETS

        fields = self.model_dump(exclude_unset=True)
        if self.preset is None:
            return fields
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choices: {', '.join(PRESETS)}")
        return {**PRESETS[self.preset], **fields}

    def resolved(self, vocab_size: int | None = None) -> "ModelConfig":
        """A copy with every derived field filled.

        Precedence: explicit fields > the tokenizer's vocab_size (when given) > the preset.
        A preset's published vocab_size only applies without a tokenizer (e.g. parameter counts).
        """
        fields = self._merged_fields()
        if vocab_size is not None and "vocab_size" not in self.model_fields_set:
            fields["vocab_size"] = vocab_size
        cfg = ModelConfig(**{k: v for k, v in fields.items() if k != "preset"})
        if cfg.vocab_size is None:
            raise RecipeError("model.vocab_size: not set and no tokenizer to take it from")
        if cfg.n_kv_heads is None:
            cfg.n_kv_heads = cfg.n_heads
        if cfg.head_dim is None:
            cfg.head_dim = cfg.dim // cfg.n_heads
        if cfg.ffn_dim is None:
            hidden = int(8 * cfg.dim / 3)
            cfg.ffn_dim = cfg.ffn_multiple_of * ((hidden + cfg.ffn_multiple_of - 1) // cfg.ffn_multiple_of)
        return cfg


# ------------------------------------------------------------------------------------ pretrain


class PretrainConfig(Strict):
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(16, gt=0)  # sequences per optimizer step, summed over processes
    grad_accum: int = Field(1, gt=0)  # micro-batches per optimizer step (batch_size must divide)
    seq_len: int = Field(256, gt=0)
    # Sampling weight of each domain (renormalised); missing domains are not trained on.
    mixture: dict[str, float] = Field(default_factory=dict)

    # muon: Muon on the blocks' matrices + AdamW on embeddings/head/norms (train/muon.py), one lr.
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(50, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd: last fraction of steps that decays
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping

    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"  # used when launched under torchrun
    threads: int | None = None  # CPU intra-op threads; None = torch default

    log_every: int = Field(10, gt=0)
    eval_every: int = Field(100, gt=0)
    eval_tokens: int = Field(16384, gt=0)  # validation tokens per domain per evaluation
    checkpoint_every: int = Field(200, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    tensorboard: bool = True
    init_from: Path | None = None  # start from these weights (fresh optimizer); for continued pretraining

    # HeuriMentor (docs/heurimentor.md): training phases, per-source rules, mixture policy, monitor.
    # Without phases the run is one implicit phase of the fields above.
    phases: list[PhaseConfig] = Field(default_factory=list)
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @model_validator(mode="after")
    def _batch(self):
        if self.batch_size % self.grad_accum != 0:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise ValueError("optimizer muon needs whole matrices to orthogonalize; use parallel ddp (or auto), not fsdp")
        if self.phases and self.steps < len(self.phases):
            raise ValueError(f"steps ({self.steps}) must be at least the number of phases ({len(self.phases)})")
        for phase in self.phases:
            if (phase.batch_size or self.batch_size) % self.grad_accum:
                raise ValueError(f"phases.{phase.name}.batch_size must be divisible by grad_accum ({self.grad_accum})")
        return self

    def window_lengths(self) -> list[tuple[str, int]]:
        """(recipe field, training window length) of the run and of each phase that sets its own."""
        own = [(f"pretrain.phases.{p.name}.seq_len", p.seq_len) for p in self.phases if p.seq_len]
        return [("pretrain.seq_len", self.seq_len), *own]


class GenerateConfig(Strict):
    prompts: list[str] = Field(default_factory=lambda: ["Alice was beginning to", "中华人民共和国"])
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.8, ge=0)
    top_k: int | None = Field(50, gt=0)
    top_p: float | None = Field(0.95, gt=0, le=1)


class ExportConfig(Strict):
    """What the export stage writes from the newest model before it (stages.model_before; docs/export.md)."""

    formats: list[Literal["hf", "gguf"]] = Field(default_factory=lambda: ["hf", "gguf"])
    hf_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: as trained
    max_shard_bytes: int = Field(2_000_000_000, gt=0)
    gguf_qtypes: list[Literal["f32", "f16", "q8_0", "q4_0"]] = Field(default_factory=lambda: ["f16", "q8_0"])


STAGES = ("curate", "tokenizer", "tokenize", "pretrain", "upscale", "continue_pretrain", "generate", "export", "sft", "dpo", "eval")
# Stages a recipe lists explicitly (they need inputs no default can give: raw-text rules, chat data,
# a decision to grow the model).
OPT_IN_STAGES = ("curate", "upscale", "continue_pretrain", "sft", "dpo")


class Recipe(Strict):
    name: str
    seed: int = 1337
    run_dir: Path | None = None  # default: runs/<name>
    stages: list[
        Literal["curate", "tokenizer", "tokenize", "pretrain", "upscale", "continue_pretrain", "generate", "export",
                "sft", "dpo", "eval"]
    ] = Field(default_factory=lambda: [s for s in STAGES if s not in OPT_IN_STAGES])
    data: DataConfig
    curate: CurateConfig = Field(default_factory=CurateConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    upscale: UpscaleConfig = Field(default_factory=UpscaleConfig)
    continue_pretrain: ContinuePretrainConfig = Field(default_factory=ContinuePretrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _mixtures_name_domains(self):
        mixtures = [("tokenizer.mixture", self.tokenizer.mixture), ("pretrain.mixture", self.pretrain.mixture)]
        mixtures += [(f"pretrain.phases.{p.name}.mixture", p.mixture) for p in self.pretrain.phases]
        mixtures += [("pretrain.sources", {name: 1.0 for name in self.pretrain.sources})]
        mixtures += [("pretrain.policy.reference", self.pretrain.policy.reference)]
        for section, mix in mixtures:
            for name, weight in mix.items():
                if name not in self.data.domains:
                    raise ValueError(f"{section}.{name}: unknown domain; choices: {', '.join(self.data.domains)}")
                if weight < 0:
                    raise ValueError(f"{section}.{name}: weight must be >= 0, got {weight}")
        return self

    @property
    def root(self) -> Path:
        return self.run_dir if self.run_dir is not None else Path("runs") / self.name

    def domain_weights(self, mixture: dict[str, float]) -> dict[str, float]:
        """Normalised weights over all domains; an empty mixture means uniform."""
        raw = {d: (mixture.get(d, 0.0) if mixture else 1.0) for d in self.data.domains}
        total = sum(raw.values())
        if total <= 0:
            raise RecipeError("mixture: all weights are zero")
        return {d: w / total for d, w in raw.items()}


# ------------------------------------------------------------------------------------- loading


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so 3 is an int and [1, 2] a list)."""
    if "=" not in text:
        raise RecipeError(f"--set {text}: expected key=value, e.g. pretrain.steps=100")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"--set {text}: the value is not valid YAML ({problem}); quote it to pass a string") from None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (to list valid keys)."""
    node: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int) or node is None:
            return None
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            # dict[str, Model]: the key is a user name; the value type is the model.
            args = getattr(node, "__args__", None)
            node = args[-1] if args else None
            continue
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (args[-1] if args else None)
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def format_error(err: ValidationError, source: str) -> str:
    """One line per problem: `source: dotted.field: what was expected`."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after",))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{source}: {dotted}: unknown key{hint}; valid keys: {', '.join(valid)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {dotted}: {msg}")
    return "\n".join(lines)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError(format_error(e, str(path))) from None
