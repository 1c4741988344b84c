"""Prompt lookup ("ngram"): drafts copied from earlier in a request's own tokens (host side, numpy).

The longest suffix of the tokens (n in [min_n, max_n]) that also occurs earlier proposes the tokens
that followed its most recent earlier occurrence. Input-grounded outputs (code edits, summaries,
extraction, chat that quotes its context) repeat spans of the prompt, so the drafts are often right,
and proposing costs no model at all.

Vectorised: the candidates are the earlier positions of the last token; each round keeps those whose
previous token also matches the suffix's, so the work is the number of candidates, not L * n.
"""

from __future__ import annotations

import numpy as np


def propose_ngram(tokens, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` draft tokens for a request whose tokens (prompt + output) are `tokens`, or [] when
    no suffix of at least `min_n` tokens occurs earlier."""
    t = np.asarray(tokens)
    L = len(t)
    if L < min_n + 1 or k <= 0:
        return []
    ends = np.flatnonzero(t[:L - 1] == t[L - 1])  # earlier positions j with t[j] == the last token
    best, n = None, 1
    while len(ends):
        if n >= min_n:
            best = ends
        if n == max_n:
            break
        back = ends - n
        ends = ends[(back >= 0) & (t[np.maximum(back, 0)] == t[L - 1 - n])]
        n += 1
    if best is None:
        return []
    j = int(best[-1])  # the most recent occurrence of the longest matched suffix
    return t[j + 1:j + 1 + k].tolist()
