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


def longest_suffix_match(tokens, max_n: int) -> tuple[int, int]:
    """(j, n): the longest suffix of `tokens` (n <= max_n tokens) that also ends earlier, at position
    j (its most recent earlier occurrence); (-1, 0) when even the last token never occurred before."""
    t = np.asarray(tokens)
    L = len(t)
    if L < 2:
        return -1, 0
    ends = np.flatnonzero(t[:L - 1] == t[L - 1])  # earlier positions j with t[j] == the last token
    best, n, length = None, 1, 0
    while len(ends):
        best, length = ends, n
        if n == max_n:
            break
        back = ends - n
        ends = ends[(back >= 0) & (t[np.maximum(back, 0)] == t[L - 1 - n])]
        n += 1
    return (-1, 0) if best is None else (int(best[-1]), length)


def propose_ngram(tokens, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` draft tokens for a request whose tokens (prompt + output) are `tokens`, or [] when
    no suffix of at least `min_n` tokens occurs earlier."""
    if k <= 0:
        return []
    j, n = longest_suffix_match(tokens, max_n)
    if n < min_n or j < 0:
        return []
    return np.asarray(tokens)[j + 1:j + 1 + k].tolist()  # what followed the suffix's most recent occurrence
