"""Engine logprobs (`{token id: Logprob}` per position) in OpenAI's two response shapes: the
legacy completions form (tokens, token_logprobs, top_logprobs, text_offset) and the chat form
(content: [{token, logprob, bytes, top_logprobs}])."""

from __future__ import annotations

from jaxinfer.outputs import CompletionOutput, Logprob, RequestOutput
from jaxinfer.protocol_responses import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from jaxinfer.tokenizer import Tokenizer


def ranked(d: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely entries of one position's logprob dict, best first."""
    ranked = sorted(((i, lp) for i, lp in d.items() if lp.rank is not None), key=lambda x: x[1].rank)
    return ranked[:k]


def top_dict(d: dict[int, Logprob], k: int, token_id: int, text: str) -> dict[str, float]:
    """The legacy {token text: logprob} map: the k best and the sampled token. Tokens whose texts
    collide (e.g. partial UTF-8 bytes all decode to U+FFFD) keep the best one's logprob."""
    top: dict[str, float] = {}
    for _, lp in ranked(d, k):
        top.setdefault(lp.decoded_token or "", lp.logprob)
    if token_id in d:
        top.setdefault(text, d[token_id].logprob)
    return top


def token_text(d: dict[int, Logprob], token_id: int) -> str:
    lp = d.get(token_id)
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else ""


def completion_logprobs(token_ids, logprobs: list[dict[int, Logprob]], k: int, offset: int) -> CompletionLogprobs:
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, d in zip(token_ids, logprobs):
        text = token_text(d, tid)
        tokens.append(text)
        token_lps.append(d[tid].logprob if tid in d else None)
        tops.append(top_dict(d, k, tid, text))
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)


def prompt_logprobs(out: RequestOutput, k: int, tokenizer: Tokenizer) -> CompletionLogprobs:
    """Echoed prompt tokens: the first has no log-probability (nothing precedes it)."""
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    plps = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    for tid, d in zip(out.prompt_token_ids, plps):
        text = tokenizer.decode([tid], skip_special_tokens=False)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if d is None:
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(d[tid].logprob if tid in d else None)
            tops.append(top_dict(d, k, tid, text))
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)


def join(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)


def utf8_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(c: CompletionOutput, k: int) -> ChatLogprobs:
    content = []
    for tid, d in zip(c.token_ids, c.logprobs or []):
        text = token_text(d, tid)
        top = [TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob, bytes=utf8_bytes(lp.decoded_token or ""))
               for _, lp in ranked(d, k)]
        content.append(TokenLogprob(token=text, logprob=d[tid].logprob if tid in d else float("-inf"),
                                    bytes=utf8_bytes(text), top_logprobs=top))
    return ChatLogprobs(content=content)
