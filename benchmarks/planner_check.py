"""The planner against measurement: for every target of the given `edge-vlm bench` results, the
current planner's predicted peak RSS (as the bench ran it: the tokens it used, resident memory)
next to the measured peak RSS of its fresh process. Writes benchmarks/results/NAME.{json,md} (default planner-check).

    python benchmarks/planner_check.py benchmarks/results/nano-backends.json benchmarks/results/tinygpt-v-full.json

The bench records the prediction of the planner it ran with; this re-predicts with today's, so
that one table shows the calibrated model's error on every bundle measured (bundles must still exist).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write_json  # noqa: E402


def main(argv=None):
    from edge_vlm.bench.config import TargetSpec
    from edge_vlm.bench.run import predict

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--name", default="planner-check", help="output name under benchmarks/results/")
    a = ap.parse_args(argv)
    rows = []
    for f in a.results:
        res = json.loads(Path(f).read_text())
        for t in res["targets"]:
            spec = TargetSpec(label=t["label"], kind=t["kind"],
                              path=t["path"], n_ctx=res["config"]["n_ctx"],
                              llm_dtype=res["config"].get("reference_dtype", "float32"))
            used = max(r["prompt_tokens"] + r["generated_tokens"] for r in t["runs"])
            if res.get("fidelity_inputs"):
                used = max(used, t["runs"][0]["prompt_tokens"] + res["config"]["fidelity_tokens"])
            p = predict(spec, used, resident=True)
            measured = t["memory"]["peak_rss_mb"]
            row = {"results": Path(f).name, "target": t["label"], "measured_mb": measured,
                   "predicted_mb": p.get("predicted_mb"), "why": p.get("why")}
            if row["predicted_mb"]:
                row["error_pct"] = round(100 * (row["predicted_mb"] - measured) / measured, 1)
            rows.append(row)
    write_json(a.name, {"machine": machine(), "results": [Path(f).name for f in a.results], "rows": rows})
    errs = [abs(r["error_pct"]) for r in rows if "error_pct" in r]
    lines = ["| results | target | measured peak RSS (MiB) | predicted (MiB) | error |", "|---|---|---|---|---|"]
    lines += [f"| {r['results']} | {r['target']} | {r['measured_mb']:.0f} | "
              + (f"{r['predicted_mb']:.0f} | {r['error_pct']:+.1f} % |" if "error_pct" in r else f"— | {r['why']} |")
              for r in rows]
    if errs:
        lines += ["", f"{len(errs)} targets; mean |error| {sum(errs) / len(errs):.1f} %, max {max(errs):.1f} %."]
    (RESULTS / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
