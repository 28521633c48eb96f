"""The benchmark's outputs, all generated from the results JSON: a Markdown table and a PNG plot."""
from __future__ import annotations

from pathlib import Path


def _f(x, fmt="{:.1f}", none="—"):
    return none if x is None else fmt.format(x)


def _med(t, k):
    return (t.get("latency") or {}).get(k, {}).get("median")


def markdown(res: dict) -> str:
    m = res["machine"]
    base = res["baseline"]
    bw = res["bandwidth"]
    lines = [f"# {res['name']}", "",
             f"{m['cpu']}, {m['cores']} cores, {m.get('ram_gib')} GiB RAM; threads {res['config']['threads'] or m['cores']}; "
             f"{res['mode']} runs; {res['config']['runs']} timed runs after {res['config']['warmup']} warm-up; "
             f"{res['config']['max_new_tokens']} new tokens per run (EOS ignored); medians. Memory bandwidth "
             f"{bw['gb_s']} GB/s ({bw['method']}, {bw['threads']} threads). Speed ratios are to **{base}**.",
             "",
             "| target | LLM | bundle MB | vision ms | TTFT ms | prefill tok/s | decode tok/s | e2e ms | "
             "e2e speedup | decode / BW limit | peak RSS MiB | planner | greedy agree | KL | vision cos min | accuracy |",
             "|" + "---|" * 16]
    for t in res["targets"]:
        lat = t.get("latency", {})
        e2e = lat.get("e2e_ms", {})
        fid = t.get("fidelity") or {}
        acc = t.get("accuracy") or {}
        pl = t.get("planner") or {}
        bwf = (t.get("bandwidth_limit") or {}).get("fraction")
        lines.append("| " + " | ".join([
            t["label"], t.get("llm_desc", ""), _f(t.get("bundle_mb")), _f(_med(t, "vision_ms")), _f(_med(t, "ttft_ms")),
            _f(_med(t, "prefill_tok_s")), _f(_med(t, "decode_tok_s"), "{:.2f}"),
            (f"{e2e['median']:.0f} ({e2e['min']:.0f}–{e2e['max']:.0f})" if e2e else "—"),
            _f((t.get("speedup") or {}).get("e2e_ms"), "{:.2f}×"), _f(bwf, "{:.0%}"),
            _f((t.get("memory") or {}).get("peak_rss_mb"), "{:.0f}"),
            _f(pl.get("error_pct"), "{:+.1f}%"),
            _f(fid.get("greedy_agreement"), "{:.0%}"), _f(fid.get("kl_mean"), "{:.4f}"),
            _f(fid.get("vision_cosine_min"), "{:.5f}"),
            (f"{acc['accuracy']:.1%} (n={acc['n']})" if acc else "—")]) + " |")
    lines += ["", "e2e: median (min–max) ms for image + prompt → all new tokens. decode / BW limit: decode tok/s ÷ "
              "(bandwidth ÷ LLM weight bytes). planner: predicted peak RSS vs measured, error in percent. "
              "greedy agree, KL (nats, teacher-forced on the reference's tokens), vision cos: against the "
              "reference on the same inputs.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> Path | None:
    """Left: end-to-end latency vs peak memory. Right: accuracy (or greedy agreement) vs latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [t for t in res["targets"] if t.get("latency")]
    if not ts:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    quality = "accuracy" if any(t.get("accuracy") for t in ts) else "greedy agreement"
    colors = plt.get_cmap("tab10" if len(ts) <= 10 else "tab20")
    for i, t in enumerate(ts):
        color = colors(i % colors.N)
        x = (t.get("memory") or {}).get("peak_rss_mb")
        y = t["latency"]["e2e_ms"]["median"]
        lo, hi = t["latency"]["e2e_ms"]["min"], t["latency"]["e2e_ms"]["max"]
        if x is not None:
            a.errorbar(x / 1024, y, yerr=[[y - lo], [hi - y]], fmt="o", capsize=3, color=color)
            a.annotate(t["label"], (x / 1024, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        q = (t.get("accuracy") or {}).get("accuracy") if quality == "accuracy" else \
            (t.get("fidelity") or {}).get("greedy_agreement", 1.0 if t["kind"] == "reference" else None)
        if q is not None:
            b.plot(y, 100 * q, "o", color=color)
            b.annotate(t["label"], (y, 100 * q), textcoords="offset points", xytext=(5, 4), fontsize=8)
    n = res["config"]["max_new_tokens"]
    a.set(xlabel="peak RSS (GiB, fresh process)", ylabel=f"end-to-end ms (image + {n} tokens)",
          title="latency vs memory (median, min–max)")
    b.set(xlabel=f"end-to-end ms (image + {n} tokens)", ylabel=f"{quality} (%)", title=f"{quality} vs latency")
    e2e = [t["latency"]["e2e_ms"]["median"] for t in ts]
    if max(e2e) > 10 * min(e2e):  # backends differ by orders of magnitude on CPU
        a.set_yscale("log")
        b.set_xscale("log")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{res['name']} — {res['machine']['cpu']}, {res['machine']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
