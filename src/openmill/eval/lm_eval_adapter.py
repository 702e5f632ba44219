"""openmill model folders as an lm-evaluation-harness `LM`, so any lm-eval task runs on them.

    python -m openmill.eval.lm_eval_adapter run --model openmill --model_args path=runs/tiny/pretrain/final \\
        --tasks arc_easy --include_path my_tasks/

(the module registers the "openmill" model, then hands its arguments to lm-eval's own CLI), or
from Python: `lm_eval.simple_evaluate(model=OpenmillLM(path), tasks=[...])`. Requests go through
the same engine as openmill's harness: requests that share a context are scored in one row
(scoring.py), generation is greedy with openmill.generate. Needs the `eval-harness` extra.

Chat mode (`--apply_chat_template`, `simple_evaluate(..., apply_chat_template=True)`) follows
lm-eval's own HF model (HFLM) exactly, so both give the same log-likelihoods and generations on
the same model exported to transformers (`tests/test_eval_lmeval.py`): lm-eval renders the
messages through `apply_chat_template` below (the folder's template, as transformers renders it,
`continue_final_message` included), then this LM encodes each rendered context whole with every
special-token string recognised and tokenizer.json's post-processor applied unless the text
already starts with the prefix token, as HFLM's `tok_encode` does. So marker text inside a
question (`<|im_end|>`) becomes a special token here, as in lm-eval; openmill's own harness
(`openmill eval --chat`, runner.Encoder) instead keeps marker text inside messages as text.
lm-eval's chat contexts already hold the assistant header; its split moves the header's trailing
whitespace (ChatML's newline) into the answer, as scoring.encode_pair does.

A context is encoded this way when it is a string this LM rendered; anything else (the plain
path, empty contexts, loglikelihood_rolling) keeps openmill's plain encoding. lm-eval's
`cache_requests` reuses contexts rendered by an earlier process, which this LM never saw: with it,
pass `chat=true` in `--model_args`, and every context is encoded as chat-rendered.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jinja2.exceptions import TemplateError
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from openmill.eval.runner import Encoder, greedy_until
from openmill.eval.scoring import Group, encode_pair, rolling_nll, score_groups
from openmill.textmodel import load_text_model


@register_model("openmill")
class OpenmillLM(LM):
    def __init__(self, path: str | Path, batch_size: int | str = 16, device: str | None = None,
                 chat: bool | str = False, **_ignored):
        """chat (`--model_args path=...,chat=true`): treat every context as chat-rendered, for
        contexts lm-eval renders without asking this LM (its `cache_requests`)."""
        super().__init__()
        self.all_chat = str(chat).lower() in ("true", "1")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tok = load_text_model(path, device=device)
        self.enc = Encoder(self.tok, chat=False)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.path = str(path)
        self.rendered: set[str] = set()  # every string apply_chat_template returned (~ one per doc)

    # ------------------------------------------------------------------ chat mode (lm-eval's HFLM)

    @property
    def tokenizer_name(self) -> str:
        """Part of lm-eval's request-cache key, as HFLM's (its path with "/" replaced)."""
        return self.path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.info.chat_template  # only recorded by lm-eval's results tracker

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The folder's template applied to lm-eval's messages; without the generation prompt the
        last message (an assistant prefix, lm-eval's gen_prefix) is left open, as HFLM asks
        transformers to (continue_final_message). A template that refuses the messages is retried
        without system messages, as HFLM does."""
        try:
            text = self._render(chat_history, add_generation_prompt)
        except TemplateError:
            text = self._render([m for m in chat_history if m["role"] != "system"], add_generation_prompt)
        self.rendered.add(text)
        return text

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if add_generation_prompt:
            return self.tok.render_chat(messages, add_generation_prompt=True)
        # transformers' continue_final_message: render with a tag after the last message's text,
        # then cut at the tag (and strip trailing whitespace if the template strips messages).
        tag, final = "CONTINUE_FINAL_MESSAGE_TAG ", messages[-1]["content"]
        text = self.tok.render_chat([*messages[:-1], {**messages[-1], "content": final + tag}])
        if final.strip() not in text or tag.strip() not in text:
            raise ValueError("the chat template drops part of the final message, so it cannot be continued")
        at = text.rindex(tag.strip())
        return text[:at] if text[at : at + len(tag)] == tag else text[:at].rstrip()

    def _encode_rendered(self, text: str, prefix: str | None) -> list[int]:
        """HFLM's tok_encode: the whole string, special-token text recognised, the post-processor's
        tokens added unless the text starts with `prefix` (the template wrote BOS itself)."""
        starts = prefix is not None and text.startswith(prefix)
        return self.tok.encode_with_specials(text, add_special_tokens=not starts)

    def _is_chat(self, context: str) -> bool:
        return self.all_chat or context in self.rendered

    def _chat_group(self, context: str, continuations: list[str]) -> Group:
        # lm-eval's prefix token (BOS, else EOS), as text, decides whether the post-processor runs.
        start = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
        prefix = self.tok.decode([start], skip_special=False) if start is not None else None
        pairs = [encode_pair(lambda t: self._encode_rendered(t, prefix), context, c) for c in continuations]
        return Group(pairs[0][0], [p[1] for p in pairs])

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        # Requests with the same context string become one group: its context runs once.
        by_context: dict[str, list[int]] = {}
        for n, r in enumerate(requests):
            by_context.setdefault(r.args[0], []).append(n)
        contexts = list(by_context)
        groups = []
        for c in contexts:
            group = self._chat_group if self._is_chat(c) else self.enc.group
            groups.append(group(c, [requests[n].args[1] for n in by_context[c]]))
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
            # HFLM's tok_batch_encode skips the post-processor when the text starts with BOS
            if self._is_chat(context):
                ids = self._encode_rendered(context, self.tok.info.bos_token)
            else:
                ids = self.enc.prompt(context)
            outputs.append(greedy_until(self.model, self.tok, ids, max_new, until))
        return outputs


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
