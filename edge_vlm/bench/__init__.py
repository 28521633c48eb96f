"""`edge-vlm bench`: what a bundle gains (latency, memory) and what it loses (fidelity, accuracy).

    config.py     BenchConfig and TargetSpec: what to measure, on what
    worker.py     one target (bundle or torch reference) in its own fresh process, driven by JSON lines
    run.py        the orchestrator: starts workers, interleaves runs, collects everything
    fidelity.py   greedy agreement, teacher-forced KL, vision-embedding cosine (pure numpy)
    bandwidth.py  memory bandwidth of this machine: the ceiling for decode tokens/s
    machine.py    CPU, cores, package versions
    summary.py    medians, ratios, bandwidth fraction, planner error
    report.py     the results JSON, a Markdown table and a PNG plot

The protocol is benchmarks.md's: medians of several runs after a warm-up, targets interleaved
A B A B in one run, a fresh process per target for memory, full-size shapes for speed.
"""
