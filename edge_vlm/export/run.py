"""`edge-vlm export`: source model -> validated bundle, one stage at a time, top to bottom."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from edge_vlm.errors import BadInput


@dataclass(frozen=True)
class ExportConfig:
    source: str | None = None  # built-in name or folder with edge-vlm-source.json (default: nano)
    out: str = "bundle"
    bits: int = 4  # 4 -> Q4_K_M, 8 -> Q8_0, 16 -> F16
    quant: str | None = None  # any llama.cpp type, overrides --bits
    force: bool = False
    threads: int = 0
    n_validate_tokens: int = 16

    def quant_type(self) -> str:
        from edge_vlm.export.llm_gguf import BITS_TO_QUANT

        if self.quant:
            return self.quant.upper()
        if self.bits not in BITS_TO_QUANT:
            raise BadInput(f"--bits {self.bits} is not supported: use 4, 8 or 16, or --quant TYPE")
        return BITS_TO_QUANT[self.bits]


RECIPE_FIELDS = {"source", "bits", "quant"}


def load_recipe(path: str) -> dict:
    """Fields of a TOML export recipe; unknown fields are an error, not silently ignored."""
    import tomllib

    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError as e:
        raise BadInput(f"recipe {p} does not exist (recipes live in export/)") from e
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"recipe {p} is not valid TOML: {e}") from e
    unknown = set(data) - RECIPE_FIELDS
    if unknown:
        raise BadInput(f"recipe {p} has unknown fields {sorted(unknown)}; known: {sorted(RECIPE_FIELDS)}")
    if "source" in data and not Path(str(data["source"])).is_absolute():
        from edge_vlm.families import BUILTIN

        if data["source"] not in BUILTIN:
            data["source"] = str((p.parent / data["source"]).resolve())
    return data


LOSSLESS_ENOUGH = {"F32", "F16", "BF16", "Q8_0"}


def requant_note(source_quant: str | None, quant: str) -> str | None:
    """A source whose LLM was already quantized loses more when re-quantized to another grid."""
    if not source_quant or source_quant in ("F32", "F16", "BF16") or quant in LOSSLESS_ENOUGH | {source_quant}:
        return None
    return (f"note: the source LLM's weights are already {source_quant}; {quant} rounds them a second time. "
            f"--quant {source_quant} re-encodes them exactly (for the built-in model see "
            "benchmarks/results/nano-easyvqa-accuracy.md)")


STAGES = ["load source", "vision -> ONNX", "validate vision", "LLM -> GGUF", "quantize LLM",
          "validate LLM", "write manifest"]

VALIDATION_PROMPT = "Describe the image."


def run(cfg: ExportConfig, progress: bool = True) -> Path:
    from tqdm import tqdm

    from edge_vlm import __version__
    from edge_vlm.export import llm_gguf
    from edge_vlm.export.bundle import BundleWriter
    from edge_vlm.export.vision_onnx import VisionOnnxExporter
    from edge_vlm.families import load_source, resolve_source
    from edge_vlm.manifest import LLMSpec, Manifest, VisionSpec
    from edge_vlm.reference import ReferencePipeline, TorchLLMSession
    from edge_vlm.runtime.llm_gguf import LlamaCppConfig, LlamaCppSession

    quant = cfg.quant_type()
    llm_gguf.quant_ftype(quant)  # fail on an unknown type before any work
    quant = quant.upper()
    resolve_source(cfg.source)
    bar = tqdm(total=len(STAGES), desc="export", unit="stage", disable=not progress)
    stages, begun = iter(STAGES), []

    def step():  # close the previous stage on the bar, open the next
        if begun:
            bar.update(1)
        begun.append(next(stages))
        bar.set_postfix_str(begun[-1])

    with BundleWriter(Path(cfg.out), cfg.force) as bw:
        step()
        src = load_source(cfg.source)
        step()
        vx = VisionOnnxExporter()
        vision_file = "vision.onnx"
        vx.export(src.vision, src.preprocess.image_size, bw.path(vision_file))
        step()
        ref = ReferencePipeline(src)
        sample_image = _sample_image()
        vision_check = vx.validate(src.vision, bw.path(vision_file), src.preprocess.image_size,
                                   ref.pixels(sample_image))
        step()
        base = bw.path("llm-f32.tmp.gguf")
        llm_gguf.LlamaGGUFWriter(src.description.get("tokenizer_pre", "smollm")).write(
            src.llm, src.tokenizer, base, name=src.description.get("name", "edge-vlm"))
        step()
        llm_file = f"llm-{quant.lower()}.gguf"
        llm_gguf.quantize(base, bw.path(llm_file), quant, cfg.threads)
        base.unlink()
        mix = llm_gguf.tensor_mix(bw.path(llm_file))
        step()
        emb = ref.embed(sample_image)
        test = LlamaCppSession(bw.path(llm_file), LlamaCppConfig(n_ctx=512, exact=True, n_threads=cfg.threads))
        try:
            ref_llm = TorchLLMSession(src.llm, src.tokenizer)
            tokenizer_check = llm_gguf.check_tokenizer(ref_llm, test, src.prompt)
            agreement = llm_gguf.teacher_forced_agreement(ref_llm, test, src.prompt, VALIDATION_PROMPT, emb,
                                                          cfg.n_validate_tokens)
            n_ctx_train = src.llm.config.max_position_embeddings
        finally:
            test.close()
        llm_gguf.check_agreement(quant, agreement)
        note = requant_note(src.description.get("llm_source_quant"), quant)
        if note:
            tqdm.write(note, file=sys.stderr)
        step()
        n_embd = src.llm.config.hidden_size
        manifest = Manifest(
            family=src.family,
            source={**src.description, "path": str(resolve_source(cfg.source))},
            preprocess=src.preprocess,
            vision=VisionSpec(file=vision_file, input_name=vx.input_name, output_name=vx.output_name,
                              n_image_tokens=src.description["image_tokens"], n_embd=n_embd),
            llm=LLMSpec(backend="gguf", file=llm_file, arch=src.llm_arch, n_embd=n_embd,
                        n_ctx_train=n_ctx_train, quant={"requested": quant, **mix}),
            prompt=src.prompt,
            edge_vlm_version=__version__,
            validation={"vision": vision_check, "llm": {"prompt": VALIDATION_PROMPT, **agreement},
                        "tokenizer": tokenizer_check, **({"notes": [note]} if note else {})},
        )
        out = bw.commit(manifest)
    bar.update(1)
    bar.close()
    return out


def _sample_image():
    """A real image for validation: an easy-VQA test image if installed, else a synthetic one."""
    try:
        from edge_vlm.data import dataset_dir

        return dataset_dir("easy-vqa", "test") / "images" / "0.png"
    except Exception:
        import numpy as np
        from PIL import Image

        x = np.zeros((64, 64, 3), np.uint8)
        x[16:48, 16:48] = (200, 30, 30)
        return Image.fromarray(x)
