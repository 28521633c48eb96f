"""The `edge-vlm` command. Thin: parses flags into config objects, calls the library, formats
results and turns edge-vlm errors into messages and exit codes. Heavy imports happen inside
the subcommands, so `edge-vlm --help` is instant and never imports torch."""
from __future__ import annotations

import argparse
import json
import os
import sys

EPILOG = """examples:
  edge-vlm export --bits 4 -o nano-q4            # built-in model -> 4-bit bundle (backend auto: gguf)
  edge-vlm export --backend onnx --bits 4 -o nano-onnx4   # ONNX int4 decoder (any architecture)
  edge-vlm export --family minigpt4 --vit eva_vit_g.pth --qformer blip2_pretrained_flant5xxl.pth \
      --ckpt pretrained_minigpt4_7b.pth --llm ./vicuna-7b --bits 4 -o minigpt4-7b-q4
  edge-vlm export --recipe export/tinygpt-v-stage3.toml --bits 4 -o tinygpt-v-q4  # files named in the recipe
  edge-vlm synth --family tinygpt-v -o synth/tinygpt-v   # full-size random weights in the upstream layout
  edge-vlm backends                              # what each LLM backend can do on this machine
  edge-vlm run nano-q4 --image shape.png --prompt "what color is the shape?"
  edge-vlm eval nano-q4 --limit 200              # easy-VQA accuracy of the bundle
  edge-vlm eval nano --limit 200                 # ... and of the unquantized torch reference
  edge-vlm inspect nano-q4                       # manifest + sha256 of every file
  edge-vlm bench nano-q4 nano-q8 --reference nano --dataset easy-vqa   # latency, memory, fidelity, accuracy
  edge-vlm plan minigpt4-7b --device rtx-4060    # will it fit? component by component

  edge-vlm serve nano-q4 --port 8080             # OpenAI-compatible API + chat page at http://127.0.0.1:8080/

exit codes: 0 ok, 2 bad input, 3 bad bundle, 4 bad source, 5 export failed, 6 device unavailable"""


SERVE_HELP = """Serve a bundle over HTTP, as llama.cpp's server, ollama and vLLM do:

  POST /v1/chat/completions   OpenAI's chat API: text and image_url parts (data: URIs), stream, usage
  GET  /v1/models             the bundle, with its manifest summary and how it batches
  GET  /health                {"status": "loading" | "ready"}
  GET  /metrics               Prometheus text: requests by outcome, queue, tokens, TTFT and latency
  GET  /                      a chat page: drop an image, ask, watch the answer stream

gguf bundles batch the decode steps of up to --parallel requests through one llama.cpp context
(continuous batching); other backends answer one request at a time. The server uses --threads
cores in all (default: every core), never more.

example:
  edge-vlm serve nano-q4 --port 8080
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "nano-q4", "messages": [{"role": "user", "content": "hello"}]}'"""


def _int_in(lo: int, hi: int | None = None, what: str = ""):
    """An argparse type: a whole number in [lo, hi], said plainly when it is not."""

    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: use {lo} to {hi}" if hi is not None
                                             else f"{v} is out of range: use {lo} or more" + what)
        return v

    return parse


def _float_in(lo: float, hi: float, lo_open: bool = False):
    def parse(text: str) -> float:
        import math

        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(f"{text[:40]} is out of range: use a number in "
                                             f"{'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return v

    return parse


POSITIVE = _int_in(1)
COUNT = _int_in(0)
THREADS = _int_in(0, 1 << 20)  # more than the cores is capped with a note (limits.threads)
SEED = _int_in(-1, 2 ** 63 - 1)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (what and where to look), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_runtime_flags(p):
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: GPU when onnxruntime-gpu / a CUDA llama.cpp are installed, else CPU (says so)")
    p.add_argument("--n-ctx", type=POSITIVE, default=None,
                   help="LLM context size in tokens (default 2048, or the model's trained context if smaller; "
                        "at most the model's)")
    p.add_argument("--threads", type=THREADS, default=0,
                   help="CPU threads (default 0: all cores; more than the cores is capped, with a note)")
    p.add_argument("--vision-device", choices=["same", "cpu"], default="same",
                   help="cpu: run the vision model on the CPU while the LLM uses the GPU (leaves the VRAM to the "
                        "LLM; `edge-vlm plan` says when that is what makes a model fit)")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="edge-vlm", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Export MiniGPT-4-family vision-language models to small, "
                                             "validated bundles and run them on CPUs, 8 GB GPUs and Jetsons.",
                                 epilog=EPILOG)
    from edge_vlm import __version__

    ap.add_argument("--version", action="version", version=f"edge-vlm {__version__}")
    ap.add_argument("--verbose", dest="all_logs", action="store_true",
                    help="keep dependencies' warnings, logs and progress bars (same as EDGE_VLM_VERBOSE=1)")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("export", help="source model -> bundle (vision ONNX + quantized LLM + manifest)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Convert a model to a bundle. The vision encoder + projection become one ONNX "
                                   "file (validated against torch at batch sizes other than the traced one); the "
                                   "LLM is quantized by one of the backends below and validated against torch on a "
                                   "real image. The bundle appears only when everything passed.",
                       epilog="""LLM backends (--backend; `edge-vlm backends` says which work here):
  gguf   llama.cpp: --bits 4 Q4_K_M, 8 Q8_0, 16 F16, or --quant TYPE. Llama architecture. No torch at runtime.
  onnx   ONNX decoder + KV cache on onnxruntime: --bits 4/8 MatMulNBits (4: --int4-method hqq|rtn;
         --group-size, default 32; --accuracy-level), 16 fp16 weights. Llama and TinyGPT-V's Phi-2 get a
         fused graph (GroupQueryAttention, KV cache written in place; fp16 activations with --device cuda)
         built layer by layer; other decoders are traced. No torch at runtime.
  gptq   GPTQModel: --bits 4/8, --group-size (default: the largest of 128/64/32 dividing the layer
         widths), calibrated on --calibration image (image embeddings + prompt + answer, the
         default) or text sequences (--calibration-data DIR). Runs through torch.
  bnb    bitsandbytes: --bits 4 nf4 + double quant, 8 int8. Any transformers decoder. Runs through torch.
  auto   (default) the first of gguf, onnx, gptq, bnb that can take the model's architecture and bits
         and is installed; prints why.""")
    p.add_argument("source", nargs="?", default=None,
                   help="built-in model name or folder with edge-vlm-source.json (default: nano, the built-in model)")
    p.add_argument("--recipe", help="TOML export recipe (see export/); flags given here override its fields")
    from edge_vlm.backends import BACKENDS

    p.add_argument("--backend", choices=["auto", *BACKENDS], default=None,
                   help="how the LLM is quantized and run (default auto; see below)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--bits", type=int, choices=[4, 8, 16], default=None, help="LLM weight bits (default 4)")
    q.add_argument("--quant", help="gguf only: any llama.cpp type instead of --bits (Q4_0, Q4_1, Q5_K_M, Q6_K, F32, ...)")
    p.add_argument("--group-size", type=_int_in(1, 4096), default=None,
                   help="onnx: MatMulNBits block size (default 32); gptq: group size (default: largest of 128/64/32 dividing the layer widths)")
    p.add_argument("--accuracy-level", type=_int_in(0, 4), default=None,
                   help="onnx: MatMulNBits compute type 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (default 4: "
                        "onnxruntime's fast CPU kernels; 0 = its default, slower on a CPU; ignored on CUDA)")
    p.add_argument("--int4-method", choices=["hqq", "rtn"], default=None,
                   help="onnx --bits 4: hqq (default; optimized zero points, split exactly into integer ones plus a "
                        "small correction so the fast kernel runs) or rtn (round to nearest)")
    p.add_argument("--calibration", choices=["image", "text"], default=None,
                   help="gptq: calibrate on image-conditioned sequences (default) or on text alone")
    p.add_argument("--calibration-data", default=None,
                   help="gptq: calibration folder in easy-VQA's format (default calibration_data/easy-vqa-sample)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="device the bundle is for (backend auto skips backends that cannot run there; onnx: cuda "
                        "or auto on a machine with onnxruntime-gpu gives fp16 activations and KV cache)")
    p.add_argument("--vision-precision", choices=["fp32", "fp16", "int8", "auto"], default=None,
                   help="the vision model's precision, held to a cosine floor against torch fp32 on held-out "
                        "images: fp16 (a true fp16 graph with --device cuda; fp16 weights cast at load on a CPU), "
                        "int8 (linear layers int8, dynamic activations; CPU), auto (the smallest that validates for "
                        "--device). Default: auto for a CUDA bundle (fp16), fp32 for a CPU bundle")
    p.add_argument("--vision-calibration", default=None, metavar="DIR",
                   help="images that choose what stays fp32 in an int8 vision model (a folder of PNG/JPEG/WebP, or "
                        "easy-VQA's format; default calibration_data/easy-vqa-sample)")
    p.add_argument("--min-agreement", type=_float_in(0, 1), default=None,
                   help="replace the backend's floor on quantized agreement with torch (recorded in the manifest); "
                        "for models whose logits carry no signal, such as edge-vlm synth's random weights")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start the prompt with the tokenizer's BOS token or not (default: what the family's "
                        "prompt style does; recorded in the manifest)")
    p.add_argument("-o", "--out", required=True, help="bundle folder to create")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--threads", type=THREADS, default=0, help="threads for quantization (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON when done")
    from edge_vlm.families.minigpt import FAMILIES as UPSTREAM_FAMILIES

    u = p.add_argument_group("upstream families (MiniGPT-4, MiniGPT-v2, TinyGPT-V) from their released files",
                             "paths are relative to SOURCE when it is a folder, else to the current directory")
    u.add_argument("--family", choices=["auto", *UPSTREAM_FAMILIES],
                   help="auto: detect from --ckpt's keys and shapes (and say what was found)")
    u.add_argument("--vit", help="EVA ViT-g weights (eva_vit_g.pth)")
    u.add_argument("--qformer", help="BLIP-2 Q-Former checkpoint (blip2_pretrained_flant5xxl.pth; Q-Former families)")
    u.add_argument("--ckpt", help="the family's training checkpoint (pretrained_minigpt4_7b.pth, TinyGPT-V_for_Stage3.pth, ...)")
    u.add_argument("--llm", help="LLM folder in transformers format (vicuna-7b, Llama-2-7b-chat-hf, old-format phi-2)")
    u.add_argument("--prompt-style", choices=["inference", "training"], default=None,
                   help="inference (default): the prompt upstream's own demo renders (system text, BOS as its "
                        "tokenizer adds it); training: the template the checkpoint was trained with")
    u.add_argument("--template", help="prompt template override: {prompt} for the question, <ImageHere> for the image")
    u.add_argument("--stop", action="append", help="stop string override (repeat for several); matched on text")
    u.add_argument("--lora-alpha", type=_float_in(0, 1e6, lo_open=True), help="LoRA alpha of the checkpoint (default 16, as upstream)")
    u.add_argument("--tokenizer-pre", help="gguf: llama.cpp pre-tokenizer name of a byte-level BPE tokenizer")
    u.add_argument("--llm-dtype", choices=["float32", "float16"], default=None,
                   help="dtype the LLM is loaded and validated in (default float32, the exact reference); float16 "
                        "halves export memory (a 7B needs 13.5 GB instead of 27) and is how the upstream demos run it")
    u.add_argument("--trust-checkpoint", action="store_true", default=None,
                   help="allow checkpoints that need full unpickling (can run code from the file; default: "
                        "weights_only loading, which refuses them)")

    p = sub.add_parser("synth", help="write an upstream family's files with seeded random weights (benchmarks, tests)",
                       description="Write a model in its upstream layout (eva_vit_g.pth, blip2 Q-Former, training "
                                   "checkpoint, HF LLM folder) with seeded random weights, plus an "
                                   "edge-vlm-source.json: `edge-vlm export DIR` then exports it. Full size for speed "
                                   "and memory measurements (shapes, not values, decide those); mini for tests.")
    from edge_vlm.families.synth import SHAPES

    p.add_argument("--family", required=True, choices=list(SHAPES), help="which model's shapes")
    p.add_argument("--size", choices=["full", "mini"], default="full")
    p.add_argument("--seed", type=_int_in(0, 2 ** 32 - 1), default=0)
    p.add_argument("-o", "--out", required=True, help="folder to write (must not exist, or be empty)")

    p = sub.add_parser("run", help="answer a question about an image with a bundle (streams tokens)")
    p.add_argument("bundle")
    p.add_argument("--image", required=True, help="image file (PNG/JPEG/...; any mode, converted to RGB)")
    p.add_argument("--prompt", required=True, help="question or instruction about the image")
    p.add_argument("--max-tokens", type=POSITIVE, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=_float_in(0, 100), default=0.0, help="0 = greedy (default), up to 100")
    p.add_argument("--top-p", type=_float_in(0, 1, lo_open=True), default=1.0, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=SEED, default=0,
                   help="sampling seed (with --temperature > 0); -1 = a random seed each run")
    p.add_argument("--verify", choices=["once", "sha256", "size"], default="once",
                   help="once (default): sha256 of each file the first time it is loaded, then size+mtime; "
                        "sha256: hash every time; size: sizes only")
    _add_runtime_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with the answer and timings")

    p = sub.add_parser("serve", help="serve a bundle: OpenAI-compatible API, chat page, several clients at once",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=SERVE_HELP)
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface, "
                        "then set --api-key)")
    p.add_argument("--port", type=_int_in(1, 65535), default=8080, help="TCP port (default 8080)")
    p.add_argument("--api-key", default=os.environ.get("EDGE_VLM_API_KEY"),
                   help="clients must send 'Authorization: Bearer KEY' to /v1/* (default: $EDGE_VLM_API_KEY, or "
                        "no key)")
    p.add_argument("--parallel", type=_int_in(1, 256), default=4,
                   help="gguf: requests decoded together in one llama.cpp context (continuous batching; each "
                        "holds --n-ctx positions of KV cache). Other backends answer one at a time (default 4)")
    p.add_argument("--max-queue", type=_int_in(0, 1_000_000), default=256,
                   help="requests that may wait for a slot (each holds its preprocessed image); beyond that 429 "
                        "(default 256)")
    p.add_argument("--max-tokens", type=POSITIVE, default=256,
                   help="answer length when a request names no max_tokens (default 256, or what the context holds)")
    p.add_argument("--temperature", type=_float_in(0, 2), default=0.0,
                   help="temperature when a request names none (default 0: greedy, reproducible)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the bundle folder's name)")
    p.add_argument("--image-cache", type=_int_in(0, 1_000_000), default=64,
                   help="image embeddings kept by the image's sha256: a second question about the same image skips "
                        "the vision model (default 64; 0: off)")
    p.add_argument("--max-request-mb", type=_float_in(0, 4096, lo_open=True), default=20.0,
                   help="largest request body, images included (default 20 MB; larger: 413)")
    p.add_argument("--max-image-pixels", type=POSITIVE, default=16_000_000,
                   help="largest image, width x height, checked before decoding (default 16,000,000; larger: 413)")
    p.add_argument("--allow-local-images", metavar="FOLDER", default=None,
                   help="let requests name image files (a path or file:// URL) inside FOLDER (default: off)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let the server fetch http(s) image URLs (default: off; data: URIs always work)")
    p.add_argument("--verbose", action="store_true", help="uvicorn's access log and llama.cpp's log on stderr")
    _add_runtime_flags(p)

    p = sub.add_parser("backends", help="the LLM backends: bits, devices, architectures, installed and usable here")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inspect", help="print a bundle's manifest and verify every file's sha256")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("eval", help="exact-match accuracy of a bundle or the torch reference on a VQA set")
    p.add_argument("target", nargs="?", default=None,
                   help="bundle folder, or a source (built-in name / folder) to evaluate the fp32 torch reference")
    p.add_argument("--dataset", default="easy-vqa", help="easy-vqa, or a folder with questions.json + images/")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=POSITIVE, help="first N questions of a fixed seeded shuffle")
    p.add_argument("--seed", type=_int_in(0, 2 ** 63 - 1), default=0, help="shuffle seed for question order")
    p.add_argument("--threads", type=THREADS, default=0)
    p.add_argument("--out", help="also write the full result (with every answer) to this JSON file")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="measure bundles side by side: latency, memory, fidelity, accuracy",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Measure what bundles gain (latency, peak memory) and lose (fidelity to the "
                                   "unquantized reference, task accuracy), side by side in one run. Each target "
                                   "runs in its own fresh process (so its peak RSS is its own); timed runs are "
                                   "interleaved A B A B after a warm-up and reported as medians with min/max.",
                       epilog="""figures:
  vision_ms       preprocess + vision model, one image (preprocess also on its own)
  ttft_ms         request in -> first generated token (image + prompt prefill included)
  prefill_tok_s   prompt tokens (text + image) / prefill time
  decode_tok_s    tokens after the first / their time (greedy, EOS ignored, --max-new-tokens)
  e2e_ms          image + prompt -> all new tokens
  peak_rss_mb     the target's process, loading included; peak VRAM on CUDA (NVML, torch)
  decode / limit  decode_tok_s / (measured memory bandwidth / LLM weight bytes)
  fidelity        with --reference: greedy token agreement, mean KL (teacher-forced on the
                  reference's tokens), vision-embedding cosine (mean, min)
  accuracy        with --dataset: exact match, every target on the same questions
  planner         `edge-vlm plan`'s predicted peak RSS vs measured, in percent

examples:
  edge-vlm bench bundles/nano-q4 bundles/nano-q8 --reference nano --dataset easy-vqa --limit 200
  edge-vlm bench /synth/tinygpt-v-bnb4 --reference /synth/tinygpt-v --runs 3 --name tinygpt-v
outputs: OUT_DIR/NAME.json (every raw run, medians, machine, versions), NAME.md, NAME.png""")
    p.add_argument("bundles", nargs="*", help="bundle folders (measured in this order)")
    p.add_argument("--reference", help="source (built-in name or folder) run by the fp32 torch reference: measured "
                                       "first; the baseline for ratios, fidelity and accuracy")
    p.add_argument("--reference-dtype", choices=["float32", "float16"], default="float32",
                   help="the reference's LLM dtype: float32 (default) or float16, as the upstream demos run it "
                        "(for models whose fp32 copy does not fit in RAM)")
    p.add_argument("--label", action="append", help="display name per bundle, in order (default: folder names)")
    p.add_argument("--dataset", help="task accuracy on easy-vqa or a folder in its format (questions.json + images/)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=POSITIVE, default=100, help="questions for --dataset (default 100)")
    p.add_argument("--runs", type=_int_in(1, 1000), default=5, help="timed runs per target (default 5), after --warmup")
    p.add_argument("--warmup", type=_int_in(0, 100), default=1)
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32, help="tokens generated per timed run (default 32)")
    p.add_argument("--prompt", default=None, help="prompt of the timed runs")
    p.add_argument("--image", help="image of the timed runs (default: a fixed easy-VQA test image)")
    p.add_argument("--fidelity-cases", type=_int_in(0, 10_000), default=4,
                   help="inputs for fidelity (default 4; needs --reference)")
    p.add_argument("--fidelity-tokens", type=POSITIVE, default=32)
    p.add_argument("--mode", choices=["auto", "interleaved", "sequential"], default="auto",
                   help="auto (default): interleaved when the planner says every target fits in RAM at once")
    p.add_argument("--name", default="bench", help="results file name (default bench)")
    p.add_argument("--out-dir", default="benchmarks/results")
    _add_runtime_flags(p)
    p.set_defaults(device="cpu")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")

    p = sub.add_parser("plan", help="predict peak memory and whether a model fits a device",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Predict the peak memory of running a model, component by component (runtime, "
                                   "vision weights and activations, LLM weights, KV cache incl. image tokens, "
                                   "compute buffers, load transient, CUDA context), say whether it fits the device "
                                   "and with how much room, and what to choose if it does not.",
                       epilog="""MODEL is a bundle folder (exact file sizes), a source (built-in name or folder
with edge-vlm-source.json; no weights are read) or a full-size family shape:
minigpt4-7b, minigpt4-13b, minigpt4-llama2, minigpt-v2, tinygpt-v, tinygpt-v-stage4.

examples:
  edge-vlm plan minigpt4-7b --device rtx-4060              # 4/8/16-bit on an 8 GB GPU
  edge-vlm plan bundles/nano-q4 --device cpu:8 --context 4096 --images 2
  edge-vlm plan tinygpt-v --device jetson-orin-nano-8gb --bits 8 --json
  edge-vlm plan --devices                                  # the device table and its sources""")
    p.add_argument("model", nargs="?", help="bundle, source or family shape name")
    p.add_argument("--device", default=None, help="device name from --devices, or cpu:N (N GB RAM)")
    p.add_argument("--context", type=_int_in(1, 1 << 20), default=2048, help="n_ctx the model runs with (default 2048)")
    p.add_argument("--images", type=_int_in(0, 1024), default=1, help="images in the context (default 1)")
    p.add_argument("--bits", type=int, choices=[4, 8, 16], help="only this many bits (sources and shapes)")
    p.add_argument("--backend", default=None, help="only this backend (default: what auto picks per bits)")
    p.add_argument("--vision-precision", choices=["fp32", "fp16", "int8"], default=None,
                   help="only this vision precision (default: each that suits the device: fp32 and fp16 on a GPU, "
                        "fp32 and int8 on a CPU; a bundle's own)")
    p.add_argument("--vision-device", choices=["same", "cpu"], default="same",
                   help="cpu: the vision model in host RAM, the LLM alone on the GPU (run --vision-device cpu)")
    p.add_argument("--reserve", type=_float_in(0, 1e6), default=None, help="GB the model cannot use (default: the device's)")
    p.add_argument("--devices", action="store_true", help="list the device table and exit")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("align", help="train the built-in model's projection (MiniGPT-4 stage 1 on easy-VQA and "
                                     "generated shapes)",
                       description="Train the built-in model's projection (and, with --lora-rank, adapters on its "
                                   "LLM's attention): easy-VQA's train "
                                   "split, augmented copies of it, and shapes generated by edge_vlm/train_shapes.py. "
                                   "Validates on held-out easy-VQA images and on shapes drawn by another procedure "
                                   "(edge_vlm/drawn_shapes.py). The recipe of the shipped projection is in "
                                   "edge_vlm/models/nano/TRAINING.md.")
    p.add_argument("--steps", type=POSITIVE, default=800)
    p.add_argument("--batch-size", type=_int_in(1, 4096), default=16)
    p.add_argument("--lr", type=_float_in(0, 10, lo_open=True), default=1e-3)
    p.add_argument("--seed", type=_int_in(0, 2 ** 32 - 1), default=0)
    p.add_argument("--out", default="runs/align",
                   help="folder for projection.safetensors, the curve and an edge-vlm-source.json, so that "
                        "`edge-vlm export runs/align` exports the retrained model (default runs/align)")
    p.add_argument("--generated", type=_int_in(0, 10 ** 6), default=5000,
                   help="generated training images (edge_vlm/train_shapes.py; default 5000, 0 = easy-VQA only)")
    p.add_argument("--augmented", type=_int_in(0, 16), default=1,
                   help="augmented copies of the easy-VQA training images (default 1)")
    p.add_argument("--mix", type=_float_in(0, 1), default=0.5,
                   help="share of every batch drawn from the generated images (default 0.5)")
    p.add_argument("--concat", type=_int_in(0, 64), default=0,
                   help="pooled tokens concatenated per image token: fewer = more image tokens "
                        "(default 0 = the source's)")
    p.add_argument("--projector", choices=["linear", "mlp2x_gelu"], default=None,
                   help="the connector to train: a Linear, or LLaVA-1.5's two-layer MLP (default: the source's)")
    p.add_argument("--lora-rank", type=_int_in(0, 256), default=0,
                   help="also train low-rank adapters of this rank on the LLM's attention (written as "
                        "lora.safetensors and merged into the LLM when the source loads, so every backend exports "
                        "an ordinary LLM; default 0 = the projection only)")
    p.add_argument("--lora-lr", type=_float_in(0, 10, lo_open=True), default=5e-4,
                   help="learning rate of the adapters (default 5e-4)")
    p.add_argument("--balance-yes-no", action="store_true",
                   help="even out easy-VQA's yes/no answers per wording: as shipped, a plain 'is there a blue "
                        "shape?' is 'no' 88 %% of the time and a negated one 'yes', which a model learns "
                        "instead of looking (default: off, as the shipped projection was trained)")
    p.add_argument("--words", type=_word_groups, default=(), metavar="GROUPS",
                   help="add one word token per group: a head on the image features picks among the group's "
                        "words and the LLM gets that choice as its own embedding of them (so a question's words "
                        "can be compared with it). Groups separated by ';', words by ',', e.g. "
                        "'red,green,blue;circle,rectangle,triangle', or 'easy-vqa' for its 8 colours and 3 shapes "
                        "(default: none)")
    p.add_argument("--word-head-steps", type=_int_in(0, 10 ** 6), default=1500,
                   help="steps fitting the word head alone on the frozen features before the LLM sees its tokens "
                        "(batches of 128; default 1500)")
    p.add_argument("--init", default="", metavar="FILE",
                   help="start the projector from this projection.safetensors (same --projector and --concat), "
                        "e.g. a recorded run's")
    p.add_argument("--eval-every", type=POSITIVE, default=50, help="steps between validations (default 50)")
    p.add_argument("--cache-dir", default=".cache/align", help="feature cache and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --cache-dir")
    p.add_argument("--threads", type=THREADS, default=0)
    return ap


def _word_groups(text: str) -> tuple:
    """--words: 'easy-vqa', or groups separated by ';' of words separated by ','."""
    import argparse

    if text == "easy-vqa":
        from edge_vlm.drawn_shapes import COLOURS, SHAPES  # easy-VQA's words

        return (tuple(COLOURS), SHAPES)
    groups = tuple(tuple(w.strip() for w in g.split(",")) for g in text.split(";") if g.strip())
    for g in groups:
        if len(g) < 2 or len(set(g)) != len(g) or not all(g):
            raise argparse.ArgumentTypeError(f"word group {','.join(g)!r}: give two or more different words, "
                                             "separated by ','")
        if any(len(w) > 40 for w in g):  # the source schema's limit (families/source_schema.py Word)
            raise argparse.ArgumentTypeError(f"word group {','.join(g)!r}: words of at most 40 characters")
    if not 1 <= len(groups) <= 16:
        raise argparse.ArgumentTypeError(f"{len(groups)} word groups: give 1 to 16, e.g. "
                                         "'red,green,blue;circle,rectangle,triangle'")
    return groups


def _writable_file(path: str, flag: str):
    """A results file the command will write at its end, checked at its start (a long run must not be
    lost to a typo): its folder exists and is writable, and it is not itself a folder."""
    from pathlib import Path

    from edge_vlm.errors import BadInput

    p = Path(path)
    if p.is_dir():
        raise BadInput(f"{flag} {p} is a folder: give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise BadInput(f"{flag} {p}: its folder {parent} does not exist or is not writable")
    return p


def _writable_folder(path: str, flag: str):
    """A folder the command fills at its end: created now if missing, so that a bad path fails first."""
    from pathlib import Path

    from edge_vlm.errors import BadInput

    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{flag} {p}: cannot create this folder ({e.strerror or e})") from None
    if not p.is_dir() or not os.access(p, os.W_OK):
        raise BadInput(f"{flag} {p} is not a writable folder")
    return p


def _cap_threads(a) -> None:
    """--threads above the machine's cores: capped, with a note (llama.cpp's threads spin while waiting)."""
    from edge_vlm.limits import threads

    a.threads, note = threads(a.threads)
    if note:
        print(note, file=sys.stderr)


def cmd_export(a):
    from edge_vlm.errors import BadInput
    from edge_vlm.export.run import ExportConfig, run
    from edge_vlm.manifest import load_manifest

    from edge_vlm.export.run import load_recipe

    from pathlib import Path

    from edge_vlm.export.run import SOURCE_FIELDS
    from edge_vlm.limits import absolute_path

    _cap_threads(a)
    fields = load_recipe(a.recipe) if a.recipe else {}
    upstream = {k: fields.pop(k) for k in SOURCE_FIELDS if k in fields}
    given = {"family": a.family, "template": a.template, "stop": a.stop, "lora_alpha": a.lora_alpha,
             "add_bos": a.bos, "prompt_style": a.prompt_style,
             "tokenizer_pre": a.tokenizer_pre, "trust_checkpoint": a.trust_checkpoint, "llm_dtype": a.llm_dtype,
             **{k: absolute_path(getattr(a, k), f"--{k}") for k in ("vit", "qformer", "ckpt", "llm") if getattr(a, k)}}
    upstream.update({k: v for k, v in given.items() if v is not None})
    files = {"vit", "qformer", "ckpt", "llm"} & set(upstream)
    if files and "family" not in upstream:  # without files, the flags override a SOURCE's description
        raise BadInput(f"--{' --'.join(sorted(files))} need --family (or --family auto)")
    upstream_only = set(upstream) - {"add_bos"}  # --bos / --no-bos apply to the built-in model too
    if upstream_only and "family" not in upstream and not (a.source or fields.get("source")):
        raise BadInput(f"--{' --'.join(sorted(k.replace('_', '-') for k in upstream_only))} apply to an upstream "
                       "family: give --family with its files, or a SOURCE folder")
    flags = {"source": a.source, "backend": a.backend, "bits": a.bits, "quant": a.quant,
             "group_size": a.group_size, "accuracy_level": a.accuracy_level, "int4_method": a.int4_method,
             "calibration": a.calibration,
             "calibration_data": a.calibration_data, "vision_precision": a.vision_precision,
             "vision_calibration": absolute_path(a.vision_calibration, "--vision-calibration")
             if a.vision_calibration else None}
    if a.bits is not None and a.quant is None:
        fields.pop("quant", None)  # --bits on the command line overrides the recipe's quant
    fields.update({k: v for k, v in flags.items() if v is not None})
    if a.min_agreement is not None and not 0 <= a.min_agreement <= 1:
        raise BadInput(f"--min-agreement {a.min_agreement}: a fraction between 0 and 1")
    out = run(ExportConfig(**fields, upstream=upstream, out=a.out, force=a.force, threads=a.threads, device=a.device,
                           min_agreement=a.min_agreement),
              progress=not a.json)
    m = load_manifest(out)
    if a.json:
        print(m.to_json(), end="")
    else:
        total = sum(f.bytes for f in m.files.values())
        print(f"bundle {out}: {total / 1e6:.1f} MB; LLM {m.llm.backend} {_quant_line(m.llm.quant)}; "
              f"{_validation_line(m.validation)}")


def _vision_precision(v) -> str:
    built = {"cuda": " (fp16 graph for CUDA)", "cpu": " (fp16 weights, fp32 compute on a CPU)"}.get(v.built_for, "")
    return f"{v.precision}{built if v.precision == 'fp16' else ''}"


def _validation_line(v) -> str:
    vision = (f"vision ONNX max |diff| vs torch {max(v.vision.max_abs_diff.values()):.2g} (atol {v.vision.atol})"
              if v.vision else "vision: not validated")
    prec = getattr(v.vision, "precision", None) if v.vision else None
    if isinstance(prec, dict) and prec.get("cosine_vs_torch_fp32"):
        c = prec["cosine_vs_torch_fp32"]
        auto = " (auto)" if prec.get("requested") == "auto" else ""
        vision += (f"; vision {prec.get('precision')}{auto}: cosine vs torch fp32 mean {c['mean']:.5f}, min "
                   f"{c['min']:.5f} on {c['images']} held-out images")
    return f"{vision}; LLM {_agreement_line(v.llm) if v.llm else 'not validated'}"


def _agreement_line(v) -> str:
    floor = v.min_agreement
    floor = floor if isinstance(floor, dict) else {} if floor is None else {"top1_agreement": floor}
    need = ", ".join(f"floor {k.split('_')[0]} {x:.0%}" for k, x in floor.items())
    top5 = f", top-5 {v.top5_agreement:.0%}" if v.top5_agreement is not None else ""
    return (f"vs torch over {v.tokens} teacher-forced tokens: top-1 {v.top1_agreement:.0%}{top5}"
            + (f" ({need})" if need else ""))


def _quant_line(q) -> str:
    types = ", ".join(f"{k} {v:.0%}" for k, v in q.tensor_types.items())
    extra = "".join(f", {k} {getattr(q, k)}" for k in ("group_size", "calibration") if getattr(q, k) is not None)
    head = getattr(q, "lm_head_bits", None)
    extra += f", output head int{head}" if head and head != q.bits else ""
    return f"{q.requested} ({q.bits_per_weight} bits/weight: {types}{extra})"


def _graph_line(g) -> str:
    if g.kind == "traced":
        return "traced by torch.onnx (exported before the fused graph: re-export for its speed)"
    return (f"fused (GroupQueryAttention, MatMulNBits, fused norms), {g.dtype} activations and KV cache, "
            f"RoPE {g.rotary}")


def cmd_synth(a):
    import time
    from pathlib import Path

    from edge_vlm.errors import BadInput
    from edge_vlm.families import synth

    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} exists and is not an empty folder: pick a new folder")
    _writable_folder(a.out, "-o")
    t0 = time.perf_counter()
    synth.write(a.family, out, a.size, a.seed, progress=lambda part: print(f"writing {part} ...", file=sys.stderr))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {a.family} ({a.size}, seed {a.seed}), {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s; "
          f"export it with: edge-vlm export {out} --bits 4 -o BUNDLE")


def cmd_backends(a):
    from edge_vlm.backends import table

    rows = table(a.device)
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'backend':<8} {'bits':<8} {'devices':<9} {'architectures':<18} {'torch to run':<13} "
          f"{'can run':<8} can export")
    for r in rows:
        archs = r["architectures"] if isinstance(r["architectures"], str) else ", ".join(r["architectures"])
        print(f"{r['backend']:<8} {'/'.join(map(str, r['bits'])):<8} {'/'.join(r['devices']):<9} {archs:<18} "
              f"{'yes' if r['runtime_needs_torch'] else 'no':<13} {'yes' if r['can_run'] else 'NO':<8} "
              f"{'yes' if r['can_export'] else 'NO':<11} {r['why_not'] or ''}".rstrip())


def cmd_run(a):
    from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig
    from edge_vlm.runtime.sampling import SamplingConfig

    from edge_vlm.limits import prompt_text
    from edge_vlm.preprocess import load_image

    # everything the user gave is checked before the model loads (seconds to minutes for big bundles)
    sampling = SamplingConfig(temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens, seed=a.seed)
    cfg = RuntimeConfig(device=a.device, n_ctx=a.n_ctx, threads=a.threads, verify=a.verify,
                        vision_device=a.vision_device)
    prompt = prompt_text(a.prompt)
    image = load_image(a.image)
    with Pipeline.load(a.bundle, cfg) as p:
        for note in p.device.notes:
            print(note, file=sys.stderr)
        stream = None if a.json else (lambda s: print(s, end="", flush=True))
        r = p.answer(image, prompt, sampling, on_piece=stream)
    if a.json:
        print(json.dumps({"bundle": a.bundle, "image": a.image, "prompt": a.prompt, "text": r.text,
                          "stop_reason": r.stats.stop_reason, "prompt_tokens": r.stats.prompt_tokens,
                          "image_tokens": r.stats.image_tokens, "generated_tokens": r.stats.generated_tokens,
                          "timings_ms": r.timings_ms, "device": p.device.summary,
                          "vision_precision": p.manifest.vision.precision}, indent=2))
    else:
        print()


def cmd_inspect(a):
    from edge_vlm.manifest import load_manifest, verify_files

    m = load_manifest(a.bundle)
    rows = verify_files(a.bundle, m, hashes=True)
    if a.json:
        print(m.to_json(), end="")
        return
    q = m.llm.quant
    print(f"edge-vlm bundle {a.bundle} (format {m.format_version}, made by edge-vlm {m.edge_vlm_version})")
    print(f"  family      {m.family}: {m.source.description}")
    print(f"  vision      {m.vision.file}: {m.preprocess.image_size}px {m.preprocess.resize}, mean {m.preprocess.mean}, "
          f"std {m.preprocess.std} -> {m.vision.n_image_tokens} tokens x {m.vision.n_embd}, {_vision_precision(m.vision)}")
    print(f"  llm         {m.llm.file}: {m.llm.arch} via {m.llm.backend}, {_quant_line(q)}")
    if m.llm.onnx_graph:
        print(f"  graph       {_graph_line(m.llm.onnx_graph)}")
    print(f"  prompt      {m.prompt.template!r}")
    print(f"  stop        {m.prompt.stop}")
    v = m.validation
    print(f"  validated   {_validation_line(v)}")
    if v.llm_fp32:
        print(f"              fp32 ONNX check graph: max |logit diff| "
              f"{v.llm_fp32.logits_max_abs_diff:.2g} (atol {v.llm_fp32.logits_atol}), "
              f"top-1 {v.llm_fp32.top1_agreement:.0%}")
    if v.backend_choice:
        print(f"  backend     {v.backend_choice}")
    for r in rows:
        print(f"  file        {r['file']:<24} {r['bytes'] / 1e6:9.2f} MB  sha256 {r['sha256'][:16]}…  {r['status']}")


def cmd_eval(a):
    from edge_vlm.errors import BadInput
    from edge_vlm.eval import EvalConfig, evaluate

    _cap_threads(a)
    out = _writable_file(a.out, "--out") if a.out else None
    res = evaluate(EvalConfig(target=a.target, dataset=a.dataset, split=a.split, limit=a.limit, seed=a.seed,
                              threads=a.threads), progress=not a.json)
    if out:
        try:
            out.write_text(json.dumps(res, indent=2) + "\n")
        except OSError as e:
            raise BadInput(f"--out {out}: cannot write it ({e.strerror or e})") from None
    summary = {k: v for k, v in res.items() if k != "records"}
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        kinds = ", ".join(f"{k} {v['accuracy']:.1%} (n={v['n']})" for k, v in res["by_kind"].items())
        print(f"{res['target']} [{res['kind']}]: accuracy {res['accuracy']:.1%} ({res['correct']}/{res['n']}) "
              f"on {res['dataset']} {res['split']}; {kinds}")


def cmd_align(a):
    from pathlib import Path

    from edge_vlm.align import AlignConfig, run

    _cap_threads(a)
    if a.init and not Path(a.init).is_file():
        from edge_vlm.errors import BadInput

        raise BadInput(f"--init {a.init}: no such file; give a projection.safetensors from an earlier run")
    s = run(AlignConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, out=a.out,
                        generated=a.generated, augmented=a.augmented, mix=a.mix, concat=a.concat,
                        projector=a.projector or "", lora_rank=a.lora_rank, lora_lr=a.lora_lr,
                        balance_yes_no=a.balance_yes_no, words=a.words, word_head_steps=a.word_head_steps,
                        init=a.init,
                        eval_every=a.eval_every, save_every=a.eval_every, cache_dir=a.cache_dir,
                        resume=a.resume, threads=a.threads))
    print(json.dumps(s, indent=2))


def cmd_bench(a):
    from pathlib import Path

    from edge_vlm.bench.config import DEFAULT_PROMPT, BenchConfig
    from edge_vlm.bench.run import run, write

    _cap_threads(a)
    _writable_folder(a.out_dir, "--out-dir")
    if not a.name or "/" in a.name or a.name.startswith("."):
        from edge_vlm.errors import BadInput

        raise BadInput(f"--name {a.name!r}: a plain file name (no '/', not hidden) for the results")
    cfg = BenchConfig(bundles=tuple(a.bundles), reference=a.reference, reference_dtype=a.reference_dtype,
                      dataset=a.dataset, split=a.split,
                      limit=a.limit, runs=a.runs, warmup=a.warmup, max_new_tokens=a.max_new_tokens,
                      prompt=a.prompt or DEFAULT_PROMPT, image=a.image, fidelity_cases=a.fidelity_cases,
                      fidelity_tokens=a.fidelity_tokens, mode=a.mode, device=a.device, threads=a.threads,
                      vision_device=a.vision_device,
                      n_ctx=a.n_ctx, name=a.name, out_dir=a.out_dir, labels=tuple(a.label or ()))
    res = run(cfg, progress=not a.json)
    paths = write(res, Path(a.out_dir))
    if a.json:
        print(json.dumps({"results": paths, "mode": res["mode"], "targets": [
            {k: t.get(k) for k in ("label", "latency", "memory", "fidelity", "planner", "bandwidth_limit", "speedup")}
            | {"accuracy": {k: v for k, v in (t.get("accuracy") or {}).items() if k != "answers"}}
            for t in res["targets"]]}, indent=2, default=float))
    else:
        from edge_vlm.bench.report import markdown

        print(markdown(res))
        print(f"mode: {res['mode']} ({res['mode_reason']}); written: {', '.join(paths.values())}")


def cmd_plan(a):
    from edge_vlm.errors import BadInput
    from edge_vlm.plan.cli import plan_command

    if not a.devices and not (a.model and a.device):
        raise BadInput("give MODEL and --device (or --devices for the device table); see edge-vlm plan --help")
    out, text = plan_command(a)
    print(json.dumps(out, indent=2) if a.json else text)


def cmd_serve(a):
    from edge_vlm.serve.config import ServeConfig
    from edge_vlm.serve.run import serve

    serve(ServeConfig(bundle=a.bundle, host=a.host, port=a.port, api_key=a.api_key, parallel=a.parallel,
                      max_queue=a.max_queue, threads=a.threads, n_ctx=a.n_ctx, device=a.device,
                      model_name=a.model_name, default_max_tokens=a.max_tokens, default_temperature=a.temperature,
                      max_request_mb=a.max_request_mb, max_image_pixels=a.max_image_pixels,
                      image_cache=a.image_cache, local_images=a.allow_local_images,
                      remote_images=a.allow_remote_images, vision_device=a.vision_device), verbose=a.verbose)


COMMANDS = {"serve": cmd_serve, "bench": cmd_bench, "plan": cmd_plan, "export": cmd_export, "synth": cmd_synth, "backends": cmd_backends, "run": cmd_run, "inspect": cmd_inspect, "eval": cmd_eval, "align": cmd_align}


def main(argv=None) -> int:
    ap = build_parser()
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:  # a bad flag (one line printed) or --help / --version
        return e.code if isinstance(e.code, int) else 2
    if not a.cmd:
        ap.print_help()
        return 0
    from edge_vlm.errors import EdgeVLMError

    from edge_vlm.logs import quiet_third_party_logs

    if a.all_logs:
        os.environ["EDGE_VLM_VERBOSE"] = "1"
    quiet_third_party_logs()
    try:
        COMMANDS[a.cmd](a)
    except EdgeVLMError as e:
        print(f"\nedge-vlm {a.cmd}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\nedge-vlm {a.cmd}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edge-vlm inspect B | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except MemoryError:
        print(f"\nedge-vlm {a.cmd}: error: out of memory; `edge-vlm plan` says what fits this machine", file=sys.stderr)
        return 3 if a.cmd in ("run", "inspect", "plan", "bench", "eval") else 5
    except Exception as e:  # noqa: BLE001 - a bug of ours: say so in one line; the traceback on request
        if os.environ.get("EDGE_VLM_DEBUG"):
            raise
        print(f"\nedge-vlm {a.cmd}: internal error ({type(e).__name__}: {str(e)[:300]}). This is a bug in "
              "edge-vlm: please report it with the command you ran (EDGE_VLM_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 70  # EX_SOFTWARE
    return 0


if __name__ == "__main__":
    sys.exit(main())
