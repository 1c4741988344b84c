"""`jaxinfer train-draft`'s data stage, side by side: the target's greedy answers from the paged
engine in waves (`speculative.corpus.answer`, what train-draft runs) against the static-batch
`ReferenceGenerator` (what it ran before), on the same questions, rounds interleaved; and the
hidden-state pass's padded positions with length buckets of 32 (now) against powers of two (before).

    python benchmarks/bench_train_data.py [--num-prompts 128] [--batch 64] [--max-tokens 128] [--rounds 2]

Printed: answer tokens per second of each (median over rounds), whether their answers are equal,
and the positions each bucketing computes for those answers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64, help="prompts answered at once (train-draft's --generate-batch)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from jaxinfer.loader import load_model
    from jaxinfer.reference import ReferenceGenerator, next_power_of_two
    from jaxinfer.sampling import SamplingParams
    from jaxinfer.speculative.prompts import chat_prompts, vocabulary_words
    from jaxinfer.speculative.corpus import answer, corpus_length, encode_question

    loaded = load_model(args.model, dtype="float32", scan_layers=False, progress=False)
    cfg, tok = loaded.config, loaded.tokenizer

    questions = chat_prompts(args.num_prompts, 0, vocabulary_words(tok, cfg.vocab_size))
    prompts = [encode_question(tok, t) for t in questions]
    gen = ReferenceGenerator(cfg, loaded.graphdef, loaded.params)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    def reference():
        out = []
        for b in range(0, len(prompts), args.batch):
            chunk = prompts[b:b + args.batch]
            out += [g.token_ids for g in gen.generate(chunk, [greedy] * len(chunk), eos_token_ids=tok.eos_token_ids)]
        return out

    def engine():
        return answer(loaded, prompts, args.max_tokens, args.batch, progress=False)

    runs = {"engine waves (corpus.answer)": engine, "ReferenceGenerator": reference}
    # one untimed pass each: compiles (the engine's compile on first use, like train-draft's)
    outputs = {name: fn() for name, fn in runs.items()}
    rates = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            out = fn()
            rates[name].append(sum(map(len, out)) / (time.perf_counter() - t0))
    a, b = outputs.values()
    print(f"{args.model}, {len(prompts)} questions, waves / static batches of {args.batch}, "
          f"max_tokens {args.max_tokens}, {args.rounds} rounds")
    print("| generator | answer tokens/s (median) | rounds |")
    print("|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.1f} | {' '.join(f'{x:.1f}' for x in r)} |")
    first = list(rates)
    print(f"ratio: {statistics.median(rates[first[0]]) / statistics.median(rates[first[1]]):.2f}x; "
          f"answers equal: {sum(x == y for x, y in zip(a, b))} / {len(a)}")
    lengths = sorted(len(p) + len(o) for p, o in zip(prompts, a))
    batches = [lengths[i:i + 16] for i in range(0, len(lengths), 16)]  # build_corpus's batches of 16
    pow2 = sum(16 * next_power_of_two(max(x), 16) for x in batches)
    by32 = sum(16 * corpus_length(max(x)) for x in batches)  # what build_corpus computes
    print(f"hidden-state pass: {sum(lengths)} real positions; padded to powers of two {pow2}, "
          f"to multiples of 32 {by32} ({by32 / pow2:.2f}x)")


if __name__ == "__main__":
    main()
