"""The orchestrator: one worker process per target, runs interleaved A B A B, everything collected
into one results dict (written as JSON, Markdown and PNG by `write`)."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edge_vlm.bench import summary
from edge_vlm.bench.config import BenchConfig, TargetSpec
from edge_vlm.errors import BadInput, EdgeVLMError
from edge_vlm.limits import absolute_path

RAM_SHARE = 0.8  # interleave only when the predicted peaks of all targets fit in this share of free RAM


class BenchError(EdgeVLMError):
    exit_code = 5


class Worker:
    """A target in its own process (edge_vlm.bench.worker). Its stderr goes to a log file whose
    tail is quoted when it fails."""

    def __init__(self, spec: TargetSpec, log_dir: Path):
        self.spec = spec
        self.log_path = log_dir / f"worker-{abs(hash(spec.label)) % 10**8}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_vlm.bench.worker", json.dumps(asdict(spec))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     bufsize=1)
        self.info = self._read()

    def _tail(self) -> str:
        self._log.flush()
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-3:])

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            why = " (killed: out of memory? try --mode sequential or fewer targets)" if rc in (-9, 137) else ""
            raise BenchError(f"{self.spec.label}: the worker process ended with exit code {rc}{why}; "
                             f"its last output: {self._tail() or '(none)'}")
        msg = json.loads(line)
        if "error" in msg:
            self.kill()
            err = BenchError(f"{self.spec.label}: {msg['error']}" + (f"\n{msg['trace']}" if msg.get("trace") else ""))
            err.exit_code = msg.get("exit_code", 5)  # the worker's edge-vlm error keeps its exit code
            raise err
        return msg

    def call(self, op: str, **kw) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the read below reports how the process ended
        return self._read()

    def close(self) -> dict:
        out = self.call("exit")
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.kill()
        self._log.close()
        return out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def default_image(tmp: Path) -> str:
    from edge_vlm.export.run import _sample_image

    img = _sample_image()
    if isinstance(img, Path):
        return str(img)
    p = tmp / "image.png"
    img.save(p)
    return str(p)


def targets_for(cfg: BenchConfig) -> list[TargetSpec]:
    from edge_vlm.manifest import load_manifest

    out = []
    if cfg.reference:
        dt = {"float32": "fp32", "float16": "fp16"}[cfg.reference_dtype]
        where = ", CPU" if cfg.device != "cpu" else ""  # the torch reference always runs on the CPU
        out.append(TargetSpec(f"torch {dt} ({Path(cfg.reference).name}{where})", "reference", cfg.reference,
                              cfg.device, cfg.threads, cfg.n_ctx, cfg.vision_device, cfg.reference_dtype))
    labels = list(cfg.labels) or [Path(b).name for b in cfg.bundles]
    if len(labels) != len(cfg.bundles):
        raise BadInput(f"{len(labels)} labels for {len(cfg.bundles)} bundles: give one --label per bundle")
    for b, label in zip(cfg.bundles, labels):
        load_manifest(Path(b))  # a wrong folder fails here, before anything starts
        # absolute: the results name the bundle wherever the bench was run from
        out.append(TargetSpec(label, "bundle", absolute_path(b, "bundle"), cfg.device, cfg.threads, cfg.n_ctx,
                              cfg.vision_device))
    if not out:
        raise BadInput("nothing to measure: give one or more bundles and/or --reference SOURCE")
    if len({t.label for t in out}) != len(out):
        raise BadInput("two targets have the same name: give --label for each bundle")
    return out


def predict(spec: TargetSpec, tokens: int, resident: bool = False) -> dict:
    """The planner's peak RSS for this target as the bench runs it (CPU), or None if it cannot say."""
    from edge_vlm.plan import memory, shapes

    try:
        if spec.kind == "bundle":
            shape = shapes.from_bundle(Path(spec.path))
            choice = memory.RunChoice(shape.bundle["backend"], shape.bundle["bits"] or 16,
                                      shape.bundle["vision_precision"], spec.n_ctx or 2048, 1, tokens,
                                      resident=resident)
        else:
            shape = shapes.from_source(spec.path)
            bits = 16 if spec.llm_dtype == "float16" else 32
            choice = memory.RunChoice("torch", bits, "fp32", spec.n_ctx or 2048, 1, tokens, resident=resident)
        return memory.peak_rss_prediction(shape, choice)
    except (EdgeVLMError, KeyError, TypeError, ValueError, OSError) as e:
        return {"predicted_mb": None, "why": str(e)}


def choose_mode(cfg: BenchConfig, predictions: dict) -> tuple[str, str]:
    if cfg.mode in ("interleaved", "sequential"):
        return cfg.mode, "asked for"
    from edge_vlm.bench.machine import available_ram_bytes

    need = [p.get("predicted_mb") for p in predictions.values()]
    free = available_ram_bytes()
    if None in need or free is None:
        return "sequential", "the planner could not predict every target's memory"
    if sum(need) * 2**20 <= RAM_SHARE * free:
        return "interleaved", f"all targets fit in RAM at once (planner: {sum(need) / 1024:.1f} GiB)"
    return "sequential", (f"the targets together would need {sum(need) / 1024:.1f} GiB (planner), more than "
                          f"{RAM_SHARE:.0%} of the {free / 2**30:.1f} GiB free: one at a time, not interleaved")


def fidelity_inputs(cfg: BenchConfig, image: str) -> list[tuple[str, str]]:
    from edge_vlm.data import load_questions

    try:
        qs = load_questions(cfg.dataset or "easy-vqa", cfg.split, cfg.fidelity_cases, seed=1)
        return [(str(q.image), q.text) for q in qs]
    except EdgeVLMError:  # no dataset installed: the fixed image with a few prompts
        prompts = [cfg.prompt, "What shape is in the image?", "What color is the shape?", "Is there a circle?"]
        return [(image, prompts[i % len(prompts)]) for i in range(cfg.fidelity_cases)]


def run(cfg: BenchConfig, progress: bool = True) -> dict:
    from edge_vlm.data import load_questions

    if cfg.runs < 1 or cfg.warmup < 0 or cfg.max_new_tokens < 2:
        raise BadInput("--runs must be >= 1, --warmup >= 0 and --max-new-tokens >= 2 (decode speed needs 2 tokens)")
    if cfg.fidelity_cases < 0 or cfg.fidelity_tokens < 1 or (cfg.dataset and cfg.limit < 1):
        raise BadInput("--fidelity-cases must be >= 0, --fidelity-tokens >= 1 and --limit >= 1")
    if cfg.mode not in ("auto", "interleaved", "sequential"):
        raise BadInput(f"--mode {cfg.mode!r}: use auto, interleaved or sequential")
    specs = targets_for(cfg)
    questions = load_questions(cfg.dataset, cfg.split, cfg.limit, seed=0) if cfg.dataset else []
    if cfg.image and not Path(cfg.image).is_file():
        raise BadInput(f"--image {cfg.image}: no such file")
    tmp = Path(tempfile.mkdtemp(prefix="edge-vlm-bench-"))
    try:
        return _run(cfg, specs, questions, tmp, progress)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _run(cfg: BenchConfig, specs, questions, tmp: Path, progress: bool) -> dict:
    from tqdm import tqdm

    from edge_vlm.bench import bandwidth

    image = cfg.image or default_image(tmp)
    cases = fidelity_inputs(cfg, image) if cfg.reference and cfg.fidelity_cases else []
    tokens = 64 + 256 + cfg.max_new_tokens  # an upper bound on the tokens a run uses (text + image + new)
    predictions = {s.label: predict(s, tokens) for s in specs} if cfg.planner else {}
    mode, why = choose_mode(cfg, predictions) if cfg.planner or cfg.mode != "auto" else ("sequential", "no planner")
    groups = [specs] if mode == "interleaved" else [[s] for s in specs]
    per_target = 2 + cfg.warmup + cfg.runs + len(cases) + len(questions)
    bar = tqdm(total=1 + per_target * len(specs), desc="bench", unit="step", disable=not progress)
    bar.set_postfix_str("memory bandwidth")
    bw = bandwidth.measure(threads=cfg.threads)
    bar.update(1)
    raw = {s.label: {"spec": asdict(s), "runs": [], "warmup": [], "fidelity_tokens": [], "answers": []}
           for s in specs}
    ref_label = specs[0].label if cfg.reference else None
    ref_cases: list[dict] = []
    fidelity: dict[str, dict] = {}
    try:
        for group in groups:
            workers = []
            try:
                for s in group:
                    bar.set_postfix_str(f"load {s.label}")
                    w = Worker(s, tmp)
                    workers.append(w)
                    raw[s.label]["load"] = w.info
                    bar.update(1)
                for r in range(cfg.warmup + cfg.runs):
                    for w in workers:  # A B A B ...: drift of the machine hits every target alike
                        bar.set_postfix_str(f"{'warm-up' if r < cfg.warmup else 'run'} {w.spec.label}")
                        res = w.call("latency", image=image, prompt=cfg.prompt, max_new_tokens=cfg.max_new_tokens)
                        raw[w.spec.label]["warmup" if r < cfg.warmup else "runs"].append(res)
                        bar.update(1)
                for w in workers:
                    mine = []
                    for i, (img, prompt) in enumerate(cases):
                        bar.set_postfix_str(f"fidelity {w.spec.label}")
                        teacher = None if w.spec.label == ref_label else ref_cases[i]["tokens"]
                        res = w.call("fidelity", image=img, prompt=prompt, n_tokens=cfg.fidelity_tokens,
                                     teacher=teacher, out=str(tmp / f"{abs(hash(w.spec.label))}-{i}"))
                        mine.append({"tokens": res["tokens"], "logits": np.load(res["logits"]),
                                     "embeds": np.load(res["vision"])})
                        bar.update(1)
                    raw[w.spec.label]["fidelity_tokens"] = [c["tokens"] for c in mine]
                    if w.spec.label == ref_label:
                        ref_cases = mine
                    elif mine:
                        from edge_vlm.bench.fidelity import compare

                        if any(r["embeds"].shape != t["embeds"].shape for r, t in zip(ref_cases, mine)):
                            raise BadInput(f"{w.spec.label}'s image embeddings have shape {mine[0]['embeds'].shape}, "
                                           f"the reference's {ref_cases[0]['embeds'].shape}: the bundle was not "
                                           "exported from --reference's source")
                        fidelity[w.spec.label] = compare([
                            {"ref_tokens": r["tokens"], "test_tokens": t["tokens"], "ref_logits": r["logits"],
                             "test_logits": t["logits"], "ref_embeds": r["embeds"], "test_embeds": t["embeds"]}
                            for r, t in zip(ref_cases, mine)])
                for w in workers:
                    for q in questions:
                        bar.set_postfix_str(f"accuracy {w.spec.label}")
                        text = w.call("answer", image=str(q.image), prompt=q.text, max_tokens=6)["text"]
                        raw[w.spec.label]["answers"].append(text)
                        bar.update(1)
                for w in workers:
                    raw[w.spec.label]["exit"] = w.close()
                    bar.update(1)
            finally:
                for w in workers:
                    w.kill()
    finally:
        bar.close()
    return assemble(cfg, specs, raw, fidelity, questions, bw, predictions, mode, why, image, cases)


def assemble(cfg, specs, raw, fidelity, questions, bw, predictions, mode, why, image, cases) -> dict:
    from edge_vlm.bench import machine
    from edge_vlm.data import normalize_answer
    from edge_vlm.eval import question_kind

    out = []
    for s in specs:
        r = raw[s.label]
        t = {"label": s.label, "kind": s.kind, "path": s.path, "load": r.get("load"), "runs": r["runs"],
             "warmup": r["warmup"], "latency": summary.spread(r["runs"]), "memory": r.get("exit"),
             "fidelity": fidelity.get(s.label), "fidelity_tokens": r["fidelity_tokens"]}
        if s.kind == "bundle":
            from edge_vlm.manifest import load_manifest

            m = load_manifest(Path(s.path))
            t["files_mb"] = {f: round(x.bytes / 1e6, 2) for f, x in m.files.items()}
            t["bundle_mb"] = round(sum(x.bytes for x in m.files.values()) / 1e6, 1)
            q = m.llm.quant
            t["llm_desc"] = f"{m.llm.backend} {q.method or ''}".strip() + f"; vision {m.vision.precision}"
            t["vision_precision"] = m.vision.precision
            t["bits_per_weight"] = q.bits_per_weight
        else:
            t["llm_desc"] = f"torch {'fp16' if s.llm_dtype == 'float16' else 'fp32'}"
        if questions:
            ok = [normalize_answer(a) == q.answer for a, q in zip(r["answers"], questions)]
            kinds = {}
            for q, o in zip(questions, ok):
                kinds.setdefault(question_kind(q.answer), []).append(o)
            t["accuracy"] = {"n": len(ok), "correct": sum(ok), "accuracy": sum(ok) / len(ok),
                             "by_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
                             "answers": r["answers"]}
        dec = t["latency"].get("decode_tok_s", {}).get("median")
        t["bandwidth_limit"] = summary.bandwidth_fraction(dec, (r.get("load") or {}).get("llm_weight_bytes", 0),
                                                          bw["gb_s"])
        used = max([x["prompt_tokens"] + x["generated_tokens"] for x in r["runs"]] +
                   [x["prompt_tokens"] + cfg.fidelity_tokens for x in r["runs"][:1] if cases], default=0)
        p = predict(s, used, resident=True) if cfg.planner and used else None  # what peak RSS measures
        if p:
            t["planner"] = dict(p)
            if p.get("predicted_mb") and t["memory"]:
                t["planner"]["error_pct"] = summary.planner_error(p["predicted_mb"], t["memory"]["peak_rss_mb"])
        out.append(t)
    base = out[0]
    for t in out:
        t["speedup"] = summary.speedups(t["latency"], base["latency"])
    if questions and cfg.reference:
        ref_ok = out[0]["accuracy"]["answers"]
        for t in out[1:]:
            t["accuracy"]["same_answer_as_reference"] = float(np.mean(
                [normalize_answer(a) == normalize_answer(b) for a, b in zip(t["accuracy"]["answers"], ref_ok)]))
    return {"name": cfg.name, "config": asdict(cfg), "machine": machine.describe(), "bandwidth": bw,
            "mode": mode, "mode_reason": why, "baseline": base["label"], "image": image,
            "fidelity_inputs": [{"image": i, "prompt": p} for i, p in cases], "targets": out}


def write(res: dict, out_dir: Path) -> dict:
    from edge_vlm.bench import report

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{res['name']}.json", "md": out_dir / f"{res['name']}.md",
             "png": out_dir / f"{res['name']}.png"}
    paths["json"].write_text(json.dumps(res, indent=2, default=float) + "\n")
    paths["md"].write_text(report.markdown(res))
    if report.plot(res, paths["png"]) is None:
        del paths["png"]
    return {k: str(v) for k, v in paths.items()}
