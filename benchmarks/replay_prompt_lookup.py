"""Prompt lookup ("ngram") replayed offline: how many steps each drafting policy would take to
produce the benchmark's greedy outputs, and what that costs given measured step times.

Greedy output does not depend on speculation, and prompt lookup's drafts depend only on the tokens
so far, so one plain generation per prompt fixes everything: at each step the policy proposes (or
not), the drafts that equal the output's next tokens are accepted, and the step costs what a step
of its rows costs. This separates what the drafts can give (tokens per step) from what the engine
pays for a step, and lets policies the engine does not have yet be measured before building them.

    python benchmarks/replay_prompt_lookup.py [--prompts 4 8] [--max-tokens 96]
                                              [--step-ms 1:37.4 2:35.1 4:39.0 8:56.0]

Policies (rows of the printed table):
    k=3 min=M    the engine's proposer (`propose_ngram`, suffixes of M..prompt_lookup_max tokens) and
                 its verify steps: pow2(1 + k) rows whatever the drafts
    sized ...    the same drafts, each verify step sized by the drafts it carries (pow2(1 + d) rows)
    adaptive     sized; 1 draft when only a one-token suffix matches, 3 on a two-token match, 7 on
                 a longer one (suffixes of up to 8 tokens)
    free         adaptive with every step costing a one-token step: what the drafts alone could give

Printed per workload and prompt count: tokens per step and the ratio to plain decoding's cost
(decoding only: prefill, which speculation does not shorten, is left out).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, nargs="+", default=[4, 8], help="first N prompts of each workload")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--workloads", nargs="+", default=["grounded", "chat"])
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--problem-chars", type=int, default=0,
                    help="cut each HumanEval problem's code to this many characters (0: whole)")
    ap.add_argument("--step-ms", nargs="+", default=["1:37.4", "2:35.1", "4:39.0", "8:56.0"],
                    help="ms per step at each row count (ROWS:MS; the engine's, measured: docs/BENCHMARKS.md)")
    return ap.parse_args(argv)


def replay(examples, propose, rows_for, cost) -> tuple[float, float]:
    """examples: [(prompt ids, output ids)]; propose(tokens so far) -> drafts; rows_for(drafts) -> rows
    of the step (1 when none) -> (tokens per step, plain decoding's cost / this policy's)."""
    plain = spent = steps = tokens = 0.0
    for prompt, output in examples:
        i = 1  # the first output token comes from prefill in both
        while i < len(output):
            proposal = propose(prompt + output[:i])
            accepted = 0
            while accepted < len(proposal) and i + accepted < len(output) \
                    and proposal[accepted] == output[i + accepted]:
                accepted += 1
            spent += cost(rows_for(len(proposal)))
            steps += 1
            tokens += accepted + 1
            i += accepted + 1
        plain += cost(1) * (len(output) - 1)
    return tokens / max(steps, 1), plain / max(spent, 1e-9)


def pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def adaptive(tokens) -> list[int]:
    """1 draft after a one-token match, 3 after two, 7 after a longer one (suffixes up to 8)."""
    from jaxinfer.speculative.ngram import longest_suffix_match

    t = np.asarray(tokens)
    end, n = longest_suffix_match(t, 8)
    d = 0 if end < 0 else 1 if n == 1 else 3 if n == 2 else 7
    return t[end + 1:end + 1 + d].tolist()


def policies(cost):
    """name -> (propose, rows_for, cost)."""
    from jaxinfer.speculative import SpeculativeConfig
    from jaxinfer.speculative.ngram import propose_ngram

    top = SpeculativeConfig.prompt_lookup_max
    out = {}
    for lo in (1, 2):
        engine = lambda t, lo=lo: propose_ngram(t, 3, lo, max(lo, top))  # noqa: E731  (the engine's proposer)
        out[f"k=3 min={lo}"] = (engine, lambda d: pow2(1 + 3) if d else 1, cost)
        out[f"sized k=3 min={lo}"] = (engine, lambda d: pow2(1 + d), cost)
    out["adaptive"] = (adaptive, lambda d: pow2(1 + d), cost)
    out["free"] = (adaptive, lambda d: pow2(1 + d), lambda rows: cost(1))
    return out


def main(argv=None):
    args = parse_args(argv)
    table = {int(r): float(ms) for r, ms in (x.split(":") for x in args.step_ms)}
    cost = lambda rows: table[min(r for r in table if r >= rows)]  # noqa: E731

    from bench_speculative import CHAT, grounded_prompts

    from jaxinfer import LLM, SamplingParams

    llm = LLM(args.model, dtype="float32", max_num_seqs=max(args.prompts), max_model_len=args.max_model_len,
              progress=False, warmup=False)
    n = max(args.prompts)
    texts = {"grounded": grounded_prompts(n, args.problem_chars), "chat": (CHAT * (1 + n // len(CHAT)))[:n]}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    print(f"{args.model}, greedy, {args.max_tokens} new tokens, step ms by rows: {table}\n")
    print("| workload | prompts | policy | tokens per step | vs plain (decoding) |\n|---|---|---|---|---|")
    for w in args.workloads:
        prompts = llm.chat_prompts([[{"role": "user", "content": t}] for t in texts[w]])
        outs = llm.generate(prompts, params, use_tqdm=False)
        examples = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]
        for count in args.prompts:
            for name, (propose, rows_for, c) in policies(cost).items():
                per_step, ratio = replay(examples[:count], propose, rows_for, c)
                print(f"| {w} | {count} | {name} | {per_step:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
