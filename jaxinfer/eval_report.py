"""`jaxinfer eval`'s outputs: the markdown table, the plot (accuracy against tokens per problem and
against latency) and the JSON of the rows (`jaxinfer.evaluate.run_config` makes a row)."""

from __future__ import annotations

import json
import os

COLUMNS = [("config", "config", "{}"), ("accuracy", "accuracy", "{:.3f}"),
           ("latency_mean_s", "mean latency s", "{:.2f}"), ("latency_p50_s", "p50 s", "{:.2f}"),
           ("latency_p99_s", "p99 s", "{:.2f}"), ("ttft_mean_s", "TTFT s", "{:.2f}"),
           ("tokens_per_problem", "tokens / problem", "{:.1f}"), ("tokens_per_s", "tokens/s", "{:.1f}"),
           ("kv_pages_peak", "peak KV pages", "{}"), ("model_bytes", "params + KV MiB", "{:.0f}"),
           ("host_peak_bytes", "host peak MiB", "{:.0f}"), ("fallback", "fallback", "{}")]


def markdown_table(rows: list[dict]) -> str:
    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return "-"
        if key.endswith("_bytes"):
            value = value / 2**20
        return fmt.format(value)
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> bool:
    """accuracy against tokens per problem and against p50 latency, one labelled point per row ->
    a PNG at `path`; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "tokens_per_problem", "generated tokens per problem (cost)"),
                           (axes[1], "latency_p50_s", "p50 latency per request (s)")):
        near: dict[tuple, int] = {}  # labels of points that (nearly) coincide are stacked, not overprinted
        span = max((r[key] for r in rows if r.get(key) is not None), default=1) or 1
        for r in rows:
            if r.get(key) is not None:
                ax.scatter(r[key], r["accuracy"])
                spot = (round(r[key] / span * 8), round(r["accuracy"] * 50))
                near[spot] = near.get(spot, -1) + 1
                ax.annotate(r["config"], (r[key], r["accuracy"]), textcoords="offset points",
                            xytext=(4, 4 + 10 * near[spot]), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(rows: list[dict], out_dir: str, title: str) -> dict[str, str]:
    """results.json, results.md (the table) and plot.png under `out_dir` -> their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "table": os.path.join(out_dir, "results.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"title": title, "rows": rows}, f, indent=1)
    with open(paths["table"], "w", encoding="utf-8") as f:
        f.write(f"{title}\n\n{markdown_table(rows)}")
    png = os.path.join(out_dir, "plot.png")
    if plot(rows, png, title):
        paths["plot"] = png
    return paths
