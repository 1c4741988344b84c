"""Speculative decoding: proposed tokens verified by the target model in one step.

    SpeculativeConfig(method="ngram", num_speculative_tokens=k)   what `LLM(speculative_config=...)`,
                                                                  `--speculative-config` take
    propose_ngram(tokens, k, min_n, max_n)                        prompt lookup (host, numpy)
    eagle.propose(head, embed, feature, token, k)                 a draft head (device, `train-draft`)
    draft.DraftModel                                              a smaller model of the same vocabulary
                                                                  with its own paged KV (device)
    verify(logits [S, k+1, V], drafts [S, k], num_drafts [S], ...) the target's tokens at every
                                                                  position and how many drafts hold

A request with drafts is scheduled with 1 + d query tokens (its last token and the d drafts); the
forward pass computes the target's logits at all of them; the sampler draws the target's token at
each position with the key plain decoding would use for that output index, and the drafts are
accepted while they equal those tokens. Greedy: the longest prefix equal to the target's argmax,
then the target's token. Sampling: a deterministic draft d (the proposers here propose greedily) is
accepted with probability p(d), and on rejection the token comes from p restricted to tokens != d,
renormalised — exactly the rejection rule min(1, p(d) / q(d)) with q one-hot, so the output has the
target's distribution; and since each position's draw uses plain decoding's key, a seeded request
gives the same text with speculation on and off. Rejected positions' KV slots are simply
overwritten later (`num_computed_tokens` moves back); their pages never enter the prefix cache
(only pages of known tokens do).
"""

from __future__ import annotations

import dataclasses

from jaxinfer.errors import InvalidRequestError
from jaxinfer.speculative.ngram import propose_ngram

__all__ = ["AUTO_DISABLE_BY_BATCH_SIZE", "AUTO_DRAFT_TREE", "METHODS", "MAX_SPECULATIVE_TOKENS", "SPECULATIVE_HELP",
           "SpeculativeConfig", "propose_ngram", "speculative_flag"]

METHODS = ("ngram", "draft", "eagle")
MAX_SPECULATIVE_TOKENS = 8
# disable_by_batch_size="auto": from 2 running requests on, a verify step of 2 x (1 + k) rows costs
# about what its accepted drafts save on a 2-core CPU, and more from 4 (docs/BENCHMARKS.md, 2026-12-05,
# with the native float kernel that made one request's verify step cheap: prompt lookup 1.48x plain
# at 1 request, 0.99x / 0.81x grounded / chat at 2, 0.73x / 0.55x at 4, f32); accelerators verify a
# few rows per sequence at the cost of one (memory-bound), so no limit there until measured otherwise.
AUTO_DISABLE_BY_BATCH_SIZE = {"cpu": 2}
# quantization="auto": an eagle head stored int8 on CPU, where a draft step reads its ~32 MB of
# float32 weights from memory (docs/BENCHMARKS.md, "The head's weights in int8"); elsewhere the target's dtype.
AUTO_HEAD_QUANTIZATION = {"cpu": "int8"}
HEAD_QUANTIZATIONS = ("int8", "int4")
# draft_tree="auto": an eagle head's k = 3 as the tree t0 -> a1 -> b1, t0 -> a2 on CPU, where a verify
# step of 4 rows costs the same whatever they hold and the chain's third draft was right 6% of the
# time: 1.66 tokens a verify step on chat against 1.58, a head step fewer, 1.36x plain against 1.21x
# (docs/BENCHMARKS.md, "Draft trees"); other k, and platforms whose kernels do not mask rows: a chain.
AUTO_DRAFT_TREE = {("cpu", 3): ((0,), (0, 0), (1,))}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeculativeConfig:
    """Attributes:
      method: "ngram" (prompt lookup: drafts copied from earlier in the request's own tokens),
        "draft" (a smaller model of the same vocabulary decodes k tokens greedily; see `draft`) or
        "eagle" (a draft head over the target's hidden state, `jaxinfer train-draft`; see `eagle`).
      model: draft: the draft model (a registered name, a .gguf file, a HF or jaxinfer checkpoint
        directory); eagle: the draft head's directory (what `jaxinfer train-draft MODEL OUT_DIR` wrote).
      num_speculative_tokens: k, most drafts a request verifies per step (1..MAX_SPECULATIVE_TOKENS).
      prompt_lookup_min, prompt_lookup_max: ngram: the suffix lengths matched (longest first).
      lookup_min: draft, eagle: where a suffix of at least this many of a request's tokens (up to
        prompt_lookup_max) occurred earlier in it, the tokens that followed propose instead of the
        model (prompt lookup where its match is long enough to trust; answers repeat their own and
        the prompt's phrases, which a small draft predicts worse: SmolLM2's default head accepts
        1.67 tokens per verify step on held-out chat alone, 1.89 with this at 2); None: the model alone.
      min_acceptance: a request whose mean accepted drafts per verified draft falls below this (after
        `probe_drafts` drafts) stops proposing: speculation that does not pay turns itself off.
      probe_drafts: drafts verified before `min_acceptance` is judged.
      disable_by_batch_size: no drafts in steps with at least this many running requests (a large
        batch is compute-bound: verifying k more tokens per sequence costs more than it saves); None:
        any batch; "auto": the measured limit of the platform the engine runs on
        (`AUTO_DISABLE_BY_BATCH_SIZE`; resolved by the engine, `resolve`).
      quantization: eagle: the head's weights, "int8" (stored so at load: a draft step reads a
        quarter of the bytes; drafts may change where logits nearly tie, the output never does),
        "int4" (groups of 32 inputs: an eighth of the bytes, fewer drafts accepted) or None (the
        target's dtype); "auto": the platform's (`AUTO_HEAD_QUANTIZATION`: int8 on CPU).
        draft: "auto" only (the draft model takes the target's weight quantization).
      draft_tree: eagle: None (a chain of k drafts) or the k nodes of a draft tree, each the path
        of sibling ranks from the request's last token, e.g. [[0], [0, 0], [1]]: the head's top
        two guesses for the next token and the top one's next (`speculative.tree`); verified on
        the decode path's attention (CPU); "auto": the platform's (`AUTO_DRAFT_TREE`).
    """

    method: str = "ngram"
    model: str | None = None
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    lookup_min: int | None = 2
    min_acceptance: float = 0.0
    probe_drafts: int = 32
    disable_by_batch_size: int | None | str = "auto"
    quantization: str | None = "auto"
    draft_tree: tuple[tuple[int, ...], ...] | str | None = "auto"

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise InvalidRequestError(msg)

        check(self.method in METHODS, f"speculative method must be one of {list(METHODS)}, got {self.method!r}")
        check(self.model is None or isinstance(self.model, str),
              f"speculative_config.model must be a path or model name, got {self.model!r}")
        check(self.method != "eagle" or self.model,
              'method "eagle" needs model=<the draft head directory> (write one with `jaxinfer train-draft MODEL '
              'OUT_DIR`)')
        check(self.method != "draft" or self.model,
              'method "draft" needs model=<a smaller model with the same tokenizer> (a registered name, a .gguf '
              'file or a checkpoint directory)')
        check(self.method != "ngram" or self.model is None,
              f"speculative_config.model is the draft model or the eagle head's directory; method {self.method!r} "
              "takes none")
        k = self.num_speculative_tokens
        check(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_SPECULATIVE_TOKENS,
              f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        check(all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) and 1 <= lo <= hi,
              f"prompt_lookup_min / prompt_lookup_max must be integers with 1 <= min <= max, got {lo!r} / {hi!r}")
        m = self.lookup_min  # (methods draft and eagle only: ngram's own lookup has prompt_lookup_min)
        check(self.method == "ngram" or m is None or (isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= hi),
              f"lookup_min must be None (the draft model or head alone) or an integer in [1, prompt_lookup_max="
              f"{hi!r}], got {m!r}")
        check(isinstance(self.min_acceptance, (int, float)) and 0 <= self.min_acceptance <= 1,
              f"min_acceptance must be in [0, 1] (0: never turn speculation off), got {self.min_acceptance!r}")
        check(isinstance(self.probe_drafts, int) and self.probe_drafts >= 1,
              f"probe_drafts must be a positive integer, got {self.probe_drafts!r}")
        b = self.disable_by_batch_size
        check(b is None or b == "auto" or (isinstance(b, int) and not isinstance(b, bool) and b >= 1),
              f'disable_by_batch_size must be "auto", None or a positive integer, got {b!r}')
        q = self.quantization
        check(q == "auto" or (self.method == "eagle" and (q is None or q in HEAD_QUANTIZATIONS)),
              f'quantization must be "auto", None or one of {list(HEAD_QUANTIZATIONS)} for method "eagle" (the '
              f'head\'s weights) and "auto" for methods "ngram" and "draft" (a draft model takes the target\'s), got '
              f'{q!r} for method {self.method!r}')
        if self.draft_tree not in (None, "auto"):
            from jaxinfer.speculative.tree import paths_of

            check(self.method == "eagle", f"draft_tree is for method \"eagle\" (a head proposes a tree), not "
                                          f"{self.method!r}; leave it None")
            object.__setattr__(self, "draft_tree", paths_of(self.draft_tree, k))

    def resolve(self, platform: str, tree_rows: bool = True) -> SpeculativeConfig:
        """This config with "auto" settings replaced by `platform`'s ("cpu", "gpu", "tpu");
        `tree_rows`: the engine's attention masks a draft tree's rows (else "auto" is a chain)."""
        b, q, tree = self.disable_by_batch_size, self.quantization, self.draft_tree
        if b == "auto":
            b = AUTO_DISABLE_BY_BATCH_SIZE.get(platform)
        if q == "auto" and self.method == "eagle":
            q = AUTO_HEAD_QUANTIZATION.get(platform)
        if tree == "auto":
            tree = AUTO_DRAFT_TREE.get((platform, self.num_speculative_tokens)) if (
                self.method == "eagle" and tree_rows) else None
        return dataclasses.replace(self, disable_by_batch_size=b, quantization=q, draft_tree=tree)

    def drafts_at(self, num_running: int) -> bool:
        """Whether a step with `num_running` running requests verifies drafts (`disable_by_batch_size`,
        resolved)."""
        b = self.disable_by_batch_size
        if b == "auto":
            raise ValueError('disable_by_batch_size "auto" is resolved by the engine (SpeculativeConfig.resolve)')
        return b is None or num_running < b

    @classmethod
    def of(cls, value) -> SpeculativeConfig | None:
        """From a SpeculativeConfig, a dict of its fields (the JSON of `--speculative-config`), or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise InvalidRequestError(f"unknown speculative_config fields {unknown}; the fields are "
                                          f"{[f.name for f in dataclasses.fields(cls)]}")
            return cls(**value)
        raise InvalidRequestError(f"speculative_config must be a SpeculativeConfig, a dict or None, got {value!r}")


SPECULATIVE_HELP = ('speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 3}, '
                    '{"method": "draft", "model": "DRAFT_MODEL", "num_speculative_tokens": 3} or '
                    '{"method": "eagle", "model": "HEAD_DIR", "num_speculative_tokens": 3} '
                    '(fields of jaxinfer.speculative.SpeculativeConfig)')


def speculative_flag(text: str) -> SpeculativeConfig:
    """`--speculative-config`'s argparse type: JSON of SpeculativeConfig's fields."""
    import argparse
    import json

    try:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise InvalidRequestError(f"expected a JSON object of SpeculativeConfig fields, got {text!r}")
        return SpeculativeConfig.of(value)
    except (json.JSONDecodeError, InvalidRequestError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def load_proposer(spec: SpeculativeConfig | None, config, params, tokenizer, max_model_len: int, mesh=None):
    """(draft model, draft head) for `spec`'s method, each checked against the target (`config`,
    `params`, `tokenizer`; typed errors): method "draft" loads a draft model (one device in one
    process), "eagle" a draft head; (None, None) otherwise."""
    if spec is None or spec.method == "ngram":
        return None, None
    if spec.method == "eagle":
        from jaxinfer.speculative.eagle import load_head

        return None, load_head(spec.model, config, params, tokenizer, quantization=spec.quantization)
    import jax

    if mesh is not None or jax.process_count() > 1:
        raise InvalidRequestError('speculative method "draft" runs on one device in one process: leave '
                                  'parallelism at 1, or use method "ngram" or "eagle"')
    from jaxinfer.speculative.draft import load_draft

    return load_draft(spec.model, config, tokenizer, max_model_len), None
