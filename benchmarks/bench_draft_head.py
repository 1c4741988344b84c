"""A draft head's acceptance three ways, on the same questions: a draft at every answer position, the
answers walked as the engine's verify steps walk them (`acceptance.heldout_acceptance`, what train-draft
reports), and the engine itself, one request at a time with the head (its metrics).

    python benchmarks/bench_draft_head.py --eagle HEAD_DIR [--questions heldout chat] [--num-questions 32]
                                          [--max-tokens 96] [--k 3] [--lookup-min 2 | none]
                                          [--head-quantization auto | none | int8 | int4]

Question sets: "heldout", train-draft's held-out questions (`prompts.heldout_prompts`, topics no
training question has); "chat", bench_speculative.py's open-chat questions. The answers are the
target's greedy ones (`corpus.answer`); the engine's outputs are checked equal to them. The drafts are
the engine's eagle proposals: prompt lookup's where a suffix of --lookup-min tokens recurs
(`SpeculativeConfig.lookup_min`; "none": the head's alone), else the head's; the head's alone are
walked too. The walk's head is stored as the engine's (`SpeculativeConfig.quantization`, resolved
for this platform: "auto" is int8 on CPU), so the two see the same drafts: k drafts as a chain
(`draft_tree=None`; the engine's CPU default, a tree, reads higher: `speculative.tree`).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eagle", required=True, metavar="HEAD_DIR", help="a head from `jaxinfer train-draft`")
    ap.add_argument("--questions", nargs="+", default=["heldout", "chat"], choices=["heldout", "chat"])
    ap.add_argument("--num-questions", type=int, default=32, help="of each set (at most 8 of chat: it has 8)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--lookup-min", type=lambda v: None if v == "none" else int(v), default=2,
                    help='SpeculativeConfig.lookup_min ("none": the head alone)')
    ap.add_argument("--head-quantization", type=lambda v: None if v == "none" else v, default="auto",
                    help='SpeculativeConfig.quantization ("auto": the platform\'s; "none": float32; "int8"; "int4")')
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from bench_speculative import CHAT

    from jaxinfer.engine import LLMEngine
    from jaxinfer.engine_config import EngineConfig
    from jaxinfer.loader import load_model
    from jaxinfer.model import embedding_arrays
    from jaxinfer.sampling import SamplingParams
    from jaxinfer.speculative import SpeculativeConfig, eagle
    from jaxinfer.speculative.acceptance import heldout_acceptance
    from jaxinfer.speculative.prompts import heldout_prompts
    from jaxinfer.speculative.corpus import answer, build_corpus, encode_question

    loaded = load_model(args.model, dtype="float32", scan_layers=False, progress=False)
    cfg, tok = loaded.config, loaded.tokenizer
    spec = SpeculativeConfig(method="eagle", model=args.eagle, num_speculative_tokens=args.k,
                             disable_by_batch_size=None, min_acceptance=0.0, lookup_min=args.lookup_min,
                             quantization=args.head_quantization, draft_tree=None)  # (the walk's: a chain of k)
    import jax

    quantization = spec.resolve(jax.default_backend()).quantization
    head = eagle.load_head(args.eagle, cfg, loaded.params, tok, quantization=quantization)
    lookup = None if spec.lookup_min is None else (spec.lookup_min, spec.prompt_lookup_max)
    engine = LLMEngine(cfg, loaded.graphdef, loaded.params, tok,
                       EngineConfig.of(max_num_seqs=1, max_model_len=1024, speculative_config=spec))
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    print(f"{args.model}, head {args.eagle} ({quantization or 'float32'}), k = {args.k}, {args.max_tokens} tokens, "
          f"greedy, lookup_min {spec.lookup_min}")
    print("| questions | every position | walked as verify steps | engine, one request at a time "
          "| the head alone, walked |")
    print("|---|---|---|---|---|")
    for name in args.questions:
        texts = heldout_prompts(args.num_questions) if name == "heldout" else CHAT[:args.num_questions]
        prompts = [encode_question(tok, t) for t in texts]
        answers = answer(loaded, prompts, args.max_tokens, batch=min(32, len(prompts)), progress=False)
        corpus = build_corpus(loaded, list(zip(prompts, answers)), args.k, progress=False,
                              context_layer=head.config.cache_layer)
        acc = heldout_acceptance(head, cfg, embedding_arrays(loaded.params), corpus, args.k, args.max_tokens,
                                 lookup=lookup)
        before = engine.stats()
        outputs = []
        for i, p in enumerate(prompts):
            engine.add_request(f"{name}-{i}", p, greedy)
            while engine.has_unfinished_requests():
                outputs += [o.outputs[0].token_ids for o in engine.step() if o.finished]
        after = engine.stats()
        steps = after["spec_num_drafts"] - before["spec_num_drafts"]
        accepted = after["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
        same = "" if outputs == answers else " (outputs differ from corpus.answer's!)"
        print(f"| {name}, {len(prompts)} | {acc.all_positions:.3f} | {acc.mean_accepted_length:.3f} "
              f"(by position {' / '.join(f'{a:.2f}' for a in acc.by_position)}) | "
              f"{1 + accepted / max(steps, 1):.3f} ({steps} verify steps, {accepted} accepted){same} | "
              f"{acc.head_alone:.3f} |", flush=True)


if __name__ == "__main__":
    main()
