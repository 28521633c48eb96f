"""LLM -> GPTQ checkpoint (GPTQModel 7.6, the maintained successor of auto-gptq), 4 or 8 bits.

Calibration is **image-conditioned** by default: each sequence is the family's prompt template
with the bundle's own image embeddings (from the exported vision ONNX) at the image marker, a
calibration question, and its answer — what the LLM really sees at run time. Upstream VLM
recipes calibrate on text alone; `--calibration text` does that (same questions and answers,
no image) so the two can be compared (benchmarks/accuracy_backends.py).

GPTQModel only takes token ids, so image rows enter through a forward hook on the input
embedding that overwrites the placeholder positions of each sequence with its image embeddings
(sequences are matched by their ids; batch size 1, so no padding moves them).

GPTQModel prints banners and progress to stdout and writes ./logs/: both are kept out of the
user's terminal and working directory.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vlm.errors import BadInput, ExportError
from edge_vlm.export.llm_validate import FLOOR_4BIT

STAGES = ("calibration set", "LLM -> GPTQ", "validate LLM")

# (metric, floor) per bits: catch broken exports, not quality (see llm_validate.check_agreement)
# GPTQModel's kernel runs the whole model in bf16, which alone moves logits (tiny random model: 8-bit
# top-1 0.75, top-5 1.0), so both widths are held to top-5 containment.
MIN_AGREEMENT = {8: ("top5_agreement", 0.6), 4: FLOOR_4BIT}
LLM_DIR = "llm"
GROUP_SIZES = (128, 64, 32)  # default: the largest that divides every layer's input width
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "calibration_data" / "easy-vqa-sample"


@dataclass(frozen=True)
class GPTQSettings:
    bits: int
    group_size: int
    calibration: str  # image | text
    sym: bool = True
    desc_act: bool = False  # act-order off: keeps the fast, group-contiguous layout every kernel takes


def default_group_size(config) -> int:
    widths = (config.hidden_size, config.intermediate_size)
    return next((g for g in GROUP_SIZES if all(w % g == 0 for w in widths)), GROUP_SIZES[-1])


@contextlib.contextmanager
def quiet_gptqmodel(threads: int = 0):
    """GPTQModel's settings for this run only; its stdout chatter and its ./logs files go to a
    temporary folder instead of the user's terminal and working directory."""
    from edge_vlm.logs import root_logging_preserved

    env = {"GPTQMODEL_CPU_WORKERS": str(threads or os.cpu_count() or 1),
           "GPTQMODEL_DISABLE_PACK_EXT": "1"}  # python packer: the same bytes without a C++ build
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory(prefix="edge-vlm-gptq-") as scratch, \
                contextlib.redirect_stdout(io.StringIO()), root_logging_preserved():
            from gptqmodel.looper import loop_processor

            log_dir = loop_processor._PROJECT_LOG_DIR  # where it writes logs/*.log (relative: the cwd)
            loop_processor._PROJECT_LOG_DIR = Path(scratch) / "logs"
            try:
                yield
            finally:
                loop_processor._PROJECT_LOG_DIR = log_dir
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class CalibrationSequence:
    ids: list[int]
    image_at: int  # first placeholder position (-1: text only)
    image: np.ndarray | None  # [n_image_tokens, n_embd]


def calibration_sequences(ctx, kind: str, folder: Path) -> list[CalibrationSequence]:
    """Template(before) + image + template(after, question) + answer + end-of-turn, as token ids.

    Each image gets its own placeholder id (a real vocabulary id no calibration text uses), so two
    sequences with the same question and answer about different images stay distinguishable."""
    from edge_vlm.data import load_questions

    src, ref = ctx.src, ctx.ref_llm
    questions = load_questions(str(folder), split="", seed=0)
    if not questions:
        raise BadInput(f"calibration set {folder} has no questions")
    end = src.prompt.stop[0] if src.prompt.stop else ""
    parts = []
    for q in questions:
        before, after = src.prompt.render(q.text)
        parts.append((q, ref.tokenize(before, src.prompt.add_bos), ref.tokenize(after + q.answer + end, False)))
    if kind == "text":
        return [CalibrationSequence(pre + post, -1, None) for _, pre, post in parts]
    used = {i for _, pre, post in parts for i in pre + post}
    free = (i for i in range(src.llm.config.vocab_size - 1, 0, -1) if i not in used)
    placeholder, embeds, seqs = {}, {}, []
    for q, pre, post in parts:
        if q.image not in placeholder:
            placeholder[q.image] = next(free)  # GPTQModel replaces out-of-range ids: stay inside the vocabulary
            embeds[q.image] = ctx.embed_image(q.image)
        img = embeds[q.image]
        seqs.append(CalibrationSequence(pre + [placeholder[q.image]] * len(img) + post, len(pre), img))
    return seqs


def splice_hook(seqs: list[CalibrationSequence]):
    """Forward hook for the input embedding: image rows replace the placeholders of each sequence.
    `hook.spliced` collects the sequences (by ids) it has written images into."""
    import torch

    by_ids = {tuple(s.ids): s for s in seqs if s.image is not None}

    def hook(module, args, output):
        ids = args[0]
        output = output.clone()
        for b in range(ids.shape[0]):
            key = tuple(ids[b].tolist())
            s = by_ids.get(key)
            if s is not None:
                rows = torch.from_numpy(s.image).to(output.dtype)
                output[b, s.image_at:s.image_at + len(rows)] = rows
                hook.spliced.add(key)
        return output

    hook.spliced = set()
    return hook


def export_llm(ctx):
    from edge_vlm.export import llm_validate
    from edge_vlm.export.hf_checkpoint import folder_bytes, quantized_share, write_hf_folder
    from edge_vlm.manifest import LLMSpec
    from edge_vlm.runtime.llm_torch import load_gptq

    cfg, src = ctx.cfg, ctx.src
    if cfg.bits not in MIN_AGREEMENT:
        raise BadInput(f"the gptq backend takes --bits 4 or 8, not {cfg.bits}")
    group = cfg.group_size or default_group_size(src.llm.config)
    if group != -1 and (group < 16 or group & (group - 1)):
        raise BadInput(f"--group-size {group}: GPTQ takes a power of two >= 16, or -1 for one group per row")
    settings = GPTQSettings(cfg.bits, group, cfg.calibration or "image")
    folder = Path(cfg.calibration_data) if cfg.calibration_data else DEFAULT_CALIBRATION
    if not (folder / "questions.json").is_file():
        raise BadInput(f"no calibration set at {folder}: pass --calibration-data DIR (easy-VQA's format: "
                       "questions.json + images/)")
    ctx.step("calibration set")
    seqs = calibration_sequences(ctx, settings.calibration, folder)
    ctx.step("LLM -> GPTQ")
    plain = write_hf_folder(src.llm, src.tokenizer, ctx.bw.path("llm-fp32.tmp"))
    out = ctx.bw.path(LLM_DIR)
    with quiet_gptqmodel(cfg.threads):
        from gptqmodel import GPTQModel, QuantizeConfig

        qcfg = QuantizeConfig(bits=settings.bits, group_size=settings.group_size, desc_act=settings.desc_act,
                              sym=settings.sym, device="cpu")
        model = GPTQModel.load(str(plain), qcfg)
        hook = splice_hook(seqs)
        handle = model.model.get_input_embeddings().register_forward_hook(hook)
        try:
            model.quantize([{"input_ids": s.ids, "attention_mask": [1] * len(s.ids)} for s in seqs],
                           batch_size=1, calibration_sort=None)
        finally:
            handle.remove()
        model.save(str(out))
    del model
    shutil.rmtree(plain)
    image_keys = {tuple(s.ids) for s in seqs if s.image is not None}
    n_image = sum(s.image is not None for s in seqs)
    if image_keys - hook.spliced:
        raise ExportError(f"GPTQ calibration saw image embeddings in {len(hook.spliced)} of {len(image_keys)} "
                          "image sequences: the splice hook did not run where expected (GPTQModel changed?)")
    for stray in ("quant_log.csv",):
        (out / stray).unlink(missing_ok=True)
    ctx.step("validate LLM")
    tokenizer_check, agreement = llm_validate.validate_llm(
        ctx, load_gptq(out, "cpu"), f"GPTQ LLM at {cfg.bits} bits", MIN_AGREEMENT[cfg.bits], "saved tokenizer")
    n = sum(p.numel() for p in src.llm.parameters())
    share = quantized_share(src.llm)
    quant = {"requested": f"gptq-int{settings.bits}", "bits": settings.bits, "method": "GPTQModel GPTQ",
             "group_size": settings.group_size, "sym": settings.sym, "desc_act": settings.desc_act,
             "calibration": settings.calibration,
             "calibration_set": {"folder": folder.name, "sequences": len(seqs), "with_image": n_image,
                                 "tokens": sum(len(s.ids) for s in seqs)},
             "tensor_types": {f"int{settings.bits} (group {settings.group_size})": round(share, 4),
                              "bf16": round(1 - share, 4)},
             "bits_per_weight": round(8 * folder_bytes(out) / n, 3), "n_params": n}
    spec = LLMSpec(backend="gptq", file=LLM_DIR, arch=src.llm_arch, n_embd=ctx.llm_config.hidden_size,
                   n_ctx_train=ctx.llm_config.max_position_embeddings, quant=quant)
    return spec, {"llm": {"prompt": ctx.validation_prompt, **agreement}, "tokenizer": tokenizer_check}
