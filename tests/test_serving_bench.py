"""benchmarks/serving.py: metrics on hand-made records, the workload builders, the arrival process,
the streaming client against a scripted SSE server, and one run against the real server."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import serving  # noqa: E402
from serving import Prompt, RequestResult  # noqa: E402

VOCAB = np.arange(3, 259)


# ---- metrics ----------------------------------------------------------------------------------


def _records():
    return [
        RequestResult(input_len=10, success=True, output_tokens=5, ttft=0.1, itl=[0.1, 0.2, 0.3, 0.4], latency=1.1),
        RequestResult(input_len=20, success=True, output_tokens=3, ttft=0.3, itl=[0.05, 0.15], latency=0.5),
        RequestResult(input_len=7, success=True, output_tokens=1, ttft=0.2, itl=[], latency=0.2),
        RequestResult(input_len=30, success=False, error="HTTP 500: boom"),
    ]


def test_metrics_by_hand():
    m = serving.compute_metrics(_records(), duration=2.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (37, 9)  # the failed request counts for nothing
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(23.0)
    # TTFT: 100, 300, 200 ms
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["std_ttft_ms"] == pytest.approx(math.sqrt(20000 / 3))  # population std
    assert m["p99_ttft_ms"] == pytest.approx(200 + 0.98 * 100)  # linear between ranks 1 and 2
    # TPOT: (1.1 - 0.1) / 4 = 250 ms and (0.5 - 0.3) / 2 = 100 ms; the 1-token request has none
    assert m["mean_tpot_ms"] == pytest.approx(175.0)
    assert m["p50_tpot_ms"] == pytest.approx(175.0)
    assert m["p99_tpot_ms"] == pytest.approx(100 + 0.99 * 150)
    # ITL: every gap of every request: 50, 100, 150, 200, 300, 400 ms
    assert m["mean_itl_ms"] == pytest.approx(200.0)
    assert m["median_itl_ms"] == pytest.approx(175.0)
    assert m["p99_itl_ms"] == pytest.approx(300 + 0.95 * 100)
    # E2EL: 1100, 500, 200 ms
    assert m["mean_e2el_ms"] == pytest.approx(600.0)
    assert m["median_e2el_ms"] == pytest.approx(500.0)
    assert m["errors"] == ["", "", "", "HTTP 500: boom"]
    assert m["input_lens"] == [10, 20, 7, 30]
    json.dumps(m)  # serializable as it is


def test_metric_selection_and_percentile_names():
    m = serving.compute_metrics(_records(), 2.0, percentiles=[90, 99.9], selected=["ttft"])
    assert {k for k in m if k.endswith("_ms")} == {"mean_ttft_ms", "median_ttft_ms", "std_ttft_ms",
                                                    "p90_ttft_ms", "p99.9_ttft_ms"}
    table = serving.format_table(m, [90, 99.9], ["ttft"], max_concurrency=4)
    assert "Serving Benchmark Result" in table and "P99.9 TTFT (ms):" in table
    assert "Maximum request concurrency:" in table and "TPOT" not in table
    assert "Successful requests:                     3" in table


def test_metrics_when_everything_failed():
    m = serving.compute_metrics([RequestResult(input_len=5, error="x")], 1.0)
    assert (m["completed"], m["failed"], m["output_throughput"]) == (0, 1, 0.0)
    assert m["mean_ttft_ms"] == 0.0 and m["p99_e2el_ms"] == 0.0


# ---- workload -------------------------------------------------------------------------------


def test_random_dataset_lengths_and_seed():
    ps = serving.random_dataset(VOCAB, 50, input_len=32, output_len=8, prefix_len=5, seed=1)
    assert len(ps) == 50
    assert all(p.input_len == 37 and p.output_len == 8 for p in ps)
    assert all(p.token_ids[:5] == ps[0].token_ids[:5] for p in ps)  # the common prefix
    assert all(3 <= t <= 258 for p in ps for t in p.token_ids)
    assert len({tuple(p.token_ids) for p in ps}) == 50
    assert ps == serving.random_dataset(VOCAB, 50, 32, 8, prefix_len=5, seed=1)
    assert ps != serving.random_dataset(VOCAB, 50, 32, 8, prefix_len=5, seed=2)
    # a variant: the same lengths, other tokens (another run finds nothing of this one in the prefix cache)
    other = serving.random_dataset(VOCAB, 50, 32, 8, prefix_len=5, seed=1, variant=1)
    assert [p.input_len for p in other] == [p.input_len for p in ps]
    assert all(a.token_ids[:5] != b.token_ids[:5] for a, b in zip(ps, other))

    ranged = serving.random_dataset(VOCAB, 400, input_len=100, output_len=20, range_ratio=0.5, seed=0)
    ins, outs = [p.input_len for p in ranged], [p.output_len for p in ranged]
    assert 50 <= min(ins) < 60 and 140 < max(ins) <= 150
    assert 10 <= min(outs) and max(outs) <= 30 and len(set(outs)) > 10
    shifted = serving.random_dataset(VOCAB, 400, input_len=100, output_len=20, range_ratio=0.5, seed=0, variant=3)
    assert [(p.input_len, p.output_len) for p in shifted] == list(zip(ins, outs))
    with pytest.raises(ValueError):
        serving.random_dataset(VOCAB, 4, 10, 10, range_ratio=1.0)


def test_shared_prefix_dataset():
    ps = serving.shared_prefix_dataset(VOCAB, 12, num_prefixes=3, prefix_len=20, suffix_len=6, output_len=4, seed=0)
    assert all(p.input_len == 26 and p.output_len == 4 for p in ps)
    prefixes = [tuple(p.token_ids[:20]) for p in ps]
    for i in range(12):
        assert prefixes[i] == prefixes[i % 3]  # groups really share their prefix
    assert len(set(prefixes)) == 3
    assert len({tuple(p.token_ids[20:]) for p in ps}) == 12  # each with its own suffix
    assert ps == serving.shared_prefix_dataset(VOCAB, 12, 3, 20, 6, 4, seed=0)
    other = serving.shared_prefix_dataset(VOCAB, 12, 3, 20, 6, 4, seed=0, variant=1)
    assert not {tuple(p.token_ids[:20]) for p in other} & set(prefixes)


def test_vocab_of_a_gguf_skips_special_tokens(tmp_path):
    from jaxinfer.testing import tiny_gguf

    tiny_gguf(tmp_path / "tiny.gguf")
    np.testing.assert_array_equal(serving.load_vocab(str(tmp_path / "tiny.gguf")), VOCAB)


def test_arrival_times():
    assert np.all(serving.arrival_times(5, math.inf) == 0)
    t = serving.arrival_times(20000, request_rate=10.0, seed=0)
    gaps = np.diff(t)
    assert t[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: coefficient of variation 1
    bursty = np.diff(serving.arrival_times(20000, request_rate=10.0, burstiness=0.25, seed=0))
    assert bursty.mean() == pytest.approx(0.1, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)  # gamma shape k: CV 1/sqrt(k)
    np.testing.assert_array_equal(t, serving.arrival_times(20000, 10.0, seed=0))


# ---- client against a scripted SSE server ---------------------------------------------------------


async def _with_scripted_server(body):
    """Runs `body(url, stats)` against a local server streaming max_tokens chunks 20 ms apart."""
    from aiohttp import web

    stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0, "payloads": []}

    async def completions(request):
        payload = await request.json()
        stats["requests"] += 1
        stats["payloads"].append(payload)
        if payload["max_tokens"] == 99:
            return web.json_response({"error": {"message": "too long"}}, status=400)
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = payload["max_tokens"]
        for i in range(n):
            await asyncio.sleep(0.02)
            text = "" if i == 1 else "x"  # a token whose text is held back still counts
            choice = {"index": 0, "text": text, "finish_reason": "length" if i == n - 1 else None}
            await resp.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        usage = {"prompt_tokens": len(payload["prompt"]), "completion_tokens": n, "total_tokens": 0}
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
        stats["in_flight"] -= 1
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = serving.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        return await body(f"http://127.0.0.1:{port}/v1/completions", stats)
    finally:
        await runner.cleanup()


def test_client_times_chunks_and_reads_usage():
    prompts = [Prompt([5] * 10, 4), Prompt([6] * 3, 99), Prompt([7] * 4, 2)]

    async def body(url, stats):
        results, duration = await serving.run_workload(url, "m", prompts, ignore_eos=True,
                                                       sampling={"temperature": 0.0})
        return results, duration, stats

    results, duration, stats = asyncio.run(_with_scripted_server(body))
    ok, bad, short = results
    assert ok.success and ok.output_tokens == 4 and len(ok.itl) == 3
    assert 0.02 <= ok.ttft < ok.latency <= duration
    assert all(g >= 0.015 for g in ok.itl)
    assert ok.latency == pytest.approx(ok.ttft + sum(ok.itl))
    assert not bad.success and bad.error.startswith("HTTP 400") and "too long" in bad.error
    assert short.success and short.output_tokens == 2
    p = stats["payloads"][0]
    assert p["prompt"] == [5] * 10 and p["max_tokens"] == 4 and p["stream"] is True and p["ignore_eos"] is True
    assert p["stream_options"] == {"include_usage": True} and p["model"] == "m" and p["temperature"] == 0.0
    assert stats["max_in_flight"] == 2  # all sent at once: both streaming requests overlapped


def test_client_concurrency_limit_and_warmups():
    prompts = [Prompt([5] * 4, 3) for _ in range(8)]

    async def body(url, stats):
        results, _ = await serving.run_workload(url, "m", prompts, max_concurrency=2, warmups=prompts[:3])
        return results, stats

    results, stats = asyncio.run(_with_scripted_server(body))
    assert len(results) == 8 and all(r.success for r in results)
    assert stats["requests"] == 8 + 3  # the warm-ups are sent but not counted
    assert stats["max_in_flight"] == 2


def test_client_paces_arrivals():
    prompts = [Prompt([5] * 4, 1) for _ in range(6)]

    async def body(url, stats):
        return await serving.run_workload(url, "m", prompts, request_rate=20.0, seed=3)

    results, duration = asyncio.run(_with_scripted_server(body))
    assert all(r.success for r in results)
    assert duration >= serving.arrival_times(6, 20.0, seed=3)[-1]


def test_sweep_plot(tmp_path):
    runs = [{"max_concurrency": c, **serving.compute_metrics(_records(), 2.0 / c)} for c in (1, 2, 4)]
    serving.plot_sweep(runs, str(tmp_path / "sweep.png"))
    with open(tmp_path / "sweep.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---- end to end against the real server ---------------------------------------------------------


def _server_exists() -> bool:
    with open(os.path.join(REPO, "server.py"), encoding="utf-8") as f:
        return "create_app" in f.read()


@pytest.mark.skipif(not _server_exists(), reason="server.py does not serve yet")
def test_compare_offline_and_sweep_against_real_server(tmp_path):
    """One run: the offline engine, then server.py launched with the same settings at saturation,
    then a concurrency sweep against it; JSON and PNG written."""
    from jaxinfer.testing import tiny_gguf

    model = str(tmp_path / "tiny.gguf")
    tiny_gguf(model)
    result = serving.main([
        "--compare-offline", "--model", model, "--served-model-name", "tiny", "--dtype", "float32",
        "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--repeats", "2", "--server-timeout", "300",
        "--num-prompts", "8", "--random-input-len", "16", "--random-output-len", "8", "--num-warmups", "1",
        "--sweep-concurrency", "1,8", "--save-result", "--result-dir", str(tmp_path),
        "--result-filename", "bench.json", "--plot", str(tmp_path / "bench.png")])
    with open(tmp_path / "bench.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))
    assert saved["platform"] == "cpu" and saved["order"] == "alternating"
    assert [o["total_output_tokens"] for o in saved["offline"]] == [8 * 8, 8 * 8]
    offline, served = saved["offline_output_throughput"], saved["served_output_throughput"]
    assert offline > 0 and served > 0 and saved["http_overhead"] == pytest.approx(1 - served / offline)
    assert [run["max_concurrency"] for run in saved["sweep"]] == [1, 8]
    for run in saved["served"] + saved["sweep"]:
        assert run["completed"] == 8 and run["failed"] == 0, run["errors"]
        assert run["total_input_tokens"] == 8 * 16 and run["total_output_tokens"] == 8 * 8
        assert run["output_lens"] == [8] * 8
        assert all(0 < ttft for ttft in run["ttfts"])
        assert 0 < run["mean_ttft_ms"] <= run["mean_e2el_ms"] and run["p99_ttft_ms"] <= run["p99_e2el_ms"]
        assert run["mean_tpot_ms"] > 0 and run["median_itl_ms"] > 0
    assert os.path.getsize(tmp_path / "bench.png") > 1000
