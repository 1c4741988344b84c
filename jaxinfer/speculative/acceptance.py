"""A draft head's held-out acceptance, measured the way the engine's greedy verify steps see it.

    heldout_acceptance(head, cfg, embed_arrays, corpus, k, max_tokens, lookup=None) -> Acceptance

`corpus` is a `corpus.Corpus` (the target's hidden states and tokens of prompt + answer sequences).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.model import embed_tokens, rope_frequencies
from jaxinfer.speculative import eagle
from jaxinfer.speculative.ngram import propose_ngram


@functools.partial(jax.jit, static_argnames=("cfg", "k"))
def _propose(head: eagle.DraftHead, embed_arrays, feature, token, context=None, *, cfg, k: int):
    return eagle.propose(head, functools.partial(embed_tokens, cfg, embed_arrays), feature, token, k, context)


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """A head's held-out figures. `mean_accepted_length` and `by_position` are what the engine's
    greedy verify steps see: each answer walked step by step, a step at position t accepting the m
    drafts that equal the target's next tokens and the next step starting at t + 1 + m (so a step
    often starts right after a token the head missed). `all_positions` is the mean accepted length
    of a draft at every answer position, which counts the easy runs' inner positions too and reads
    higher (SmolLM2's default head: 1.79 against 1.67 walked, and the engine measured 1.67).
    With `lookup` the drafts are the engine's (`SpeculativeConfig.lookup_min`): prompt lookup's
    where a long enough suffix recurs, else the head's; `head_alone` is the walked figure of the
    head's drafts alone either way."""

    mean_accepted_length: float  # tokens per verify step, the target's own included
    by_position: list[float]  # the share of draft j's verified that were accepted
    all_positions: float
    head_alone: float
    lookup_steps: int = 0  # walked verify steps whose drafts were prompt lookup's
    lookup_drafted: int = 0  # their drafts verified
    lookup_accepted: int = 0  # of which accepted


def lookup_drafts(corpus, starts: np.ndarray, k: int, lookup: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Prompt lookup's drafts at each start t (`ngram.propose_ngram` over the sequence's tokens up to
    t + 1, what a request holds then) -> (drafts [n, k] padded with -1, their lengths [n]; 0: none)."""
    lo, hi = lookup
    first = np.zeros(len(corpus.tokens), np.int64)
    for a, _, e in corpus.sequences:
        first[a:e] = a
    drafts, lengths = np.full((len(starts), k), -1, np.int64), np.zeros(len(starts), np.int64)
    for i, t in enumerate(starts):
        d = propose_ngram(corpus.tokens[first[t]:t + 2], k, lo, hi)
        drafts[i, :len(d)], lengths[i] = d, len(d)
    return drafts, lengths


def _walk(match: np.ndarray, lengths: np.ndarray, corpus, k: int, max_tokens: int | None):
    """match [starts, k] (draft j accepted, its run so far too) walked as verify steps -> (mean
    accepted length, acceptance by position, the steps' start indices, their drafts verified and
    accepted)."""
    steps, rooms, at = [], [], 0
    for _, p, e in corpus.sequences:
        t = p - 1  # the first step after the prompt's: the target sampled token p from h_{p - 1}
        while t + 2 < e:
            # drafts the scheduler leaves: max_tokens less the tokens emitted and the target's own
            room = k if max_tokens is None else min(k, max_tokens - (t + 2 - p) - 1)
            if room < 1:
                break  # the last token: a plain decode step
            i = at + t - (p - 1)
            steps.append(i)
            rooms.append(min(room, lengths[i]))
            t += 1 + int(match[i, :rooms[-1]].sum())
        at += max(0, e - 1 - p)
    if not steps:
        return 1.0, [0.0] * k, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    verified = np.arange(k)[None] < np.asarray(rooms)[:, None]  # [steps, k]: draft j was verified
    accepted = match[np.asarray(steps)] * verified
    return (1.0 + float(accepted.sum(1).mean()), (accepted.sum(0) / np.maximum(verified.sum(0), 1)).round(4).tolist(),
            np.asarray(steps), verified.sum(1), accepted.sum(1))


def heldout_acceptance(head: eagle.DraftHead, cfg, embed_arrays, corpus, k: int, max_tokens: int | None = None,
                       batch: int = 512, lookup: tuple[int, int] | None = None) -> Acceptance:
    """Drafts k tokens at every held-out answer position exactly as the engine does (`eagle.propose`
    on the target's hidden state and the token it sampled; with `lookup` = (lookup_min,
    prompt_lookup_max) prompt lookup's drafts where they exist, as `proposers.next_drafts`) and
    compares them with the target's greedy tokens (see `Acceptance`); `max_tokens`: the answers'
    limit, which cuts the last steps' drafts as the scheduler cuts them. `embed_arrays`: the
    target's (`embedding_arrays`)."""
    from jaxinfer.speculative.corpus import context_at

    propose = functools.partial(_propose, head, embed_arrays, cfg=cfg, k=k)
    window, inv_freq = head.config.context_window, rope_frequencies(cfg)
    if window and corpus.keys is None:
        raise ValueError("this head attends over the target's cache: build the corpus with context_layer="
                         f"{head.config.context_layer} (its keys and values)")
    # a verify step at t: the target has emitted token t + 1; drafts are tokens t + 2 .. t + 1 + k
    starts = np.concatenate([np.arange(p - 1, e - 2) for _, p, e in corpus.sequences] + [np.zeros(0, np.int64)])
    ends = np.concatenate([np.full(max(0, e - 1 - p), e) for _, p, e in corpus.sequences] + [np.zeros(0, np.int64)])
    drafts = np.zeros((len(starts), k), np.int64)
    for b in range(0, len(starts), batch):
        s = starts[b:b + batch]
        s_pad = np.concatenate([s, np.repeat(s[:1], batch - len(s))])  # one shape: one compile
        context = context_at(corpus, s_pad, window, inv_freq) if window else None
        drafts[b:b + len(s)] = np.asarray(propose(jnp.asarray(corpus.hidden[s_pad]),
                                                  jnp.asarray(corpus.tokens[s_pad + 1]), context))[:len(s)]
    pos = starts[:, None] + 2 + np.arange(k)[None]
    inside = pos < ends[:, None]  # an answer may end before k more tokens
    truth = corpus.tokens[np.minimum(pos, len(corpus.tokens) - 1)]

    def matched(drafts, lengths):  # [starts, k]: draft j accepted (it and every draft before it right)
        return np.cumprod((drafts == truth) & inside & (np.arange(k)[None] < lengths[:, None]), axis=1)

    lengths = np.full(len(starts), k)
    match = matched(drafts, lengths)
    head_alone, by_position, *_ = _walk(match, lengths, corpus, k, max_tokens)
    mean, lookup_counts = head_alone, (0, 0, 0)
    if lookup is not None:
        found, found_len = lookup_drafts(corpus, starts, k, lookup)
        use = found_len > 0
        lengths = np.where(use, found_len, k)
        match = matched(np.where(use[:, None], found, drafts), lengths)
        mean, by_position, steps, verified, accepted = _walk(match, lengths, corpus, k, max_tokens)
        on = use[steps]
        lookup_counts = (int(on.sum()), int(verified[on].sum()), int(accepted[on].sum()))
    full = starts + 1 + k < ends  # positions with k answer tokens after them (the training starts)
    all_positions = 1.0 + float(match[full].sum(1).mean()) if full.any() else 1.0
    return Acceptance(mean, by_position, all_positions, head_alone, *lookup_counts)
