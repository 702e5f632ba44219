"""openmill model folders as an lm-evaluation-harness `LM`, so any lm-eval task runs on them.

    python -m openmill.eval.lm_eval_adapter run --model openmill --model_args path=runs/tiny/pretrain/final \\
        --tasks arc_easy --include_path my_tasks/

(the module registers the "openmill" model, then hands its arguments to lm-eval's own CLI), or
from Python: `lm_eval.simple_evaluate(model=OpenmillLM(path), tasks=[...])`. Requests go through
the same engine as openmill's harness: requests that share a context are scored in one row
(scoring.py), generation is greedy with openmill.generate. Needs the `eval-harness` extra.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from openmill.eval.runner import Encoder, greedy_until
from openmill.eval.scoring import rolling_nll, score_groups
from openmill.textmodel import load_text_model


@register_model("openmill")
class OpenmillLM(LM):
    def __init__(self, path: str | Path, batch_size: int | str = 16, device: str | None = None, **_ignored):
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tok = load_text_model(path, device=device)
        self.enc = Encoder(self.tok, chat=False)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        # Requests with the same context string become one group: its context runs once.
        by_context: dict[str, list[int]] = {}
        for n, r in enumerate(requests):
            by_context.setdefault(r.args[0], []).append(n)
        contexts = list(by_context)
        groups = [self.enc.group(c, [requests[n].args[1] for n in by_context[c]]) for c in contexts]
        scores = score_groups(self.model, groups, self.tok.pad_id, batch_size=self.batch_size)
        out: list = [None] * len(requests)
        for context, group_scores in zip(contexts, scores):
            for n, (ll, greedy) in zip(by_context[context], group_scores):
                out[n] = (ll, greedy)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [-rolling_nll(self.model, self.tok.encode(r.args[0]), self.enc.start_id) for r in requests]

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            max_new = int(kwargs.get("max_gen_toks", 256))
            outputs.append(greedy_until(self.model, self.tok, self.enc.prompt(context), max_new, until))
        return outputs


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
