"""`--vision-precision`: the vision ONNX (encoder + connector) at fp32, fp16 or int8.

Every precision starts from the fp32 file that vision_onnx.py exported and validated, and ends with a
check owned here: the cosine of the final image embeddings (after the connector: what the LLM sees)
against the torch fp32 vision stack, on held-out images that nothing was calibrated or chosen on.
A precision whose mean or minimum cosine is under its floor fails the export, naming the images.

  fp16  --device cuda: a true fp16 graph (fp32 input and output), which onnxruntime's CUDA provider
        computes in fp16. --device cpu: the weights are stored in fp16 and each is cast to fp32 by a Cast
        node that onnxruntime folds once at load, so a CPU computes in fp32 on fp16-rounded weights:
        half the file, the same speed and memory as fp32 (onnxruntime's CPU provider has no fast fp16
        kernels here; measured in benchmarks/vision_precision.py).
  int8  every MatMul with a weight (linear layers: the ViT's and the connector's) gets uint8 weights per
        output channel and uint8 activations quantized per call (onnxruntime's MatMulInteger; see
        WEIGHT_FORMATS for why not int8 weights). Convolutions (the ViT's patch embedding, the built-in model's EfficientNet), LayerNorms,
        softmax and attention's activation-by-activation products stay fp32. The calibration images choose
        what else must stay fp32: when the int8 graph misses the floor on them, the connector goes back to
        fp32 before the export gives up. Static activation scales (QDQ) were measured too and lost
        (benchmarks/vision_precision.py): they are not offered.
  auto  the smallest precision that validates for --device: int8, then fp16, then fp32 on a CPU;
        fp16, then fp32 on CUDA (onnxruntime's CUDA provider has no int8 kernels for these graphs).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_vlm.errors import BadInput, ExportError

PRECISIONS = ("fp32", "fp16", "int8")
CHOICES = PRECISIONS + ("auto",)
# (mean, minimum) cosine of the image embeddings against torch fp32 over the held-out images
FLOORS = {"fp32": (0.99999, 0.9999), "fp16": (0.9999, 0.999), "int8": (0.995, 0.98)}
AUTO_ORDER = {"cpu": ("int8", "fp16", "fp32"), "cuda": ("fp16", "fp32")}
N_HELD_OUT = 8  # synthetic scenes (scenes.py) with seeds no calibration uses, + the export's sample image
N_CALIBRATION = 16  # calibration images used (the folder's first ones, then synthetic scenes)
HELD_OUT_SEED = 10_000
ENCODER_MODULES = ("vit", "encoder")  # top-level submodules of the vision stacks that are the encoder
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "calibration_data" / "easy-vqa-sample"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# Without --vision-precision: a bundle for CUDA gets `auto` (fp16, as upstream runs EVA ViT-g, unless it misses its
# floor), a bundle for a CPU stays fp32 (fp16 saves only disk there, int8 costs some fidelity: both opt-in).
DEFAULT = {"cuda": "auto", "cpu": "fp32"}


@dataclass(frozen=True)
class VisionPrecisionConfig:
    precision: str | None = None  # fp32 | fp16 | int8 | auto; None: DEFAULT for the device
    device: str = "cpu"  # the device the bundle is for: cpu | cuda
    calibration: str | None = None  # folder of images (or easy-VQA format); default calibration_data/easy-vqa-sample

    def __post_init__(self):
        if self.precision is None:
            object.__setattr__(self, "precision", DEFAULT.get(self.device, "fp32"))

    def check(self) -> None:
        if self.precision not in CHOICES:
            raise BadInput(f"--vision-precision {self.precision!r}: use one of {', '.join(CHOICES)}")
        if self.precision == "int8" and self.device == "cuda":
            raise BadInput("--vision-precision int8 is a CPU format (onnxruntime's CUDA provider runs its integer "
                           "matmuls on the CPU) and this bundle is for CUDA (--device cuda, or auto on a machine "
                           "with onnxruntime-gpu): use fp16 or auto, or export with --device cpu")

    def candidates(self) -> tuple[str, ...]:
        return AUTO_ORDER[self.device] if self.precision == "auto" else (self.precision,)

    def needs_calibration(self) -> bool:
        return "int8" in self.candidates()


def calibration_images(folder: str | None, required: bool) -> list:
    """The calibration folder's images (its images/ subfolder for easy-VQA's format), sorted by name."""
    from edge_vlm.preprocess import load_image

    root = Path(folder) if folder else DEFAULT_CALIBRATION
    where = root / "images" if (root / "images").is_dir() else root
    files = sorted(p for p in where.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if where.is_dir() else []
    if not files and required:
        hint = ("pass --vision-calibration DIR (a folder of PNG/JPEG/WebP images like the ones the model will see)"
                if folder else "the default calibration_data/easy-vqa-sample is not next to this edge-vlm install; "
                "pass --vision-calibration DIR (a folder of PNG/JPEG/WebP images)")
        raise BadInput(f"--vision-precision int8 needs calibration images to choose what stays fp32, and "
                       f"{where} has none: {hint}")
    return [load_image(p) for p in files[:N_CALIBRATION]]


@dataclass
class ImageSets:
    """Preprocessed pixels and the torch fp32 stack's embeddings for both image sets (computed before
    the torch vision model is released)."""

    calibration: list = field(default_factory=list)  # [(name, pixels, embeds)]
    held_out: list = field(default_factory=list)


def image_sets(vision, pre, sample_image, cfg: VisionPrecisionConfig) -> ImageSets:
    import torch

    from edge_vlm.export.scenes import scene
    from edge_vlm.preprocess import preprocess

    def embed(named):
        out = []
        for name, img in named:
            px = preprocess(img, pre.image_size, pre.mean, pre.std, pre.resize)
            with torch.no_grad():
                out.append((name, px, vision(torch.from_numpy(px)).float().numpy()))
        return out

    sets = ImageSets()
    if cfg.precision == "fp32":
        return sets
    cal = calibration_images(cfg.calibration, cfg.precision == "int8") if cfg.needs_calibration() else []
    cal = [(f"calibration {i}", im) for i, im in enumerate(cal)]
    cal += [(f"scene {s}", scene(s)) for s in range(N_CALIBRATION - len(cal))] if cal else []
    held = [("sample image", sample_image)] + [(f"scene {HELD_OUT_SEED + i}", scene(HELD_OUT_SEED + i))
                                               for i in range(N_HELD_OUT)]
    sets.calibration, sets.held_out = embed(cal), embed(held)
    return sets


def cosines(path: Path, images: list, threads: int, providers=("CPUExecutionProvider",)) -> dict[str, float]:
    """Mean cosine over image tokens of the ONNX file's embeddings against torch's, per image."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3
    from edge_vlm.runtime.device import ort_providers

    sess = ort.InferenceSession(str(path), so, providers=ort_providers(providers))
    name = sess.get_inputs()[0].name
    out = {}
    for label, px, want in images:
        got = sess.run(None, {name: px})[0].reshape(-1, want.shape[-1]).astype(np.float64)
        ref = want.reshape(-1, want.shape[-1]).astype(np.float64)
        c = (got * ref).sum(-1) / np.maximum(np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1), 1e-30)
        out[label] = float(c.mean())
    return out


def summary(c: dict[str, float]) -> dict:
    return {"mean": round(float(np.mean(list(c.values()))), 6), "min": round(min(c.values()), 6),
            "images": len(c)}


# ---- converters: fp32 file -> precision file --------------------------------------------------------------
def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _save(model, path: Path) -> None:
    import onnx

    # protobuf cannot serialize (or even size) a message over 2 GB: count the tensors' bytes instead
    big = sum(len(t.raw_data) for t in model.graph.initializer) > 1_500_000_000 or not _all_inline(model)
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _all_inline(model) -> bool:
    from onnx import TensorProto

    return all(t.data_location != TensorProto.EXTERNAL for t in model.graph.initializer)


def fp16_cast_at_load(src: Path, dst: Path) -> dict:
    """fp16 weights in the file, each read through a Cast to fp32 (folded by onnxruntime at load)."""
    from edge_vlm.export.llm_onnx import weights_to_fp16

    model = weights_to_fp16(_load(src))
    _save(model, dst)
    return {"method": "fp16 weights, cast to fp32 at load (CPU)",
            "fp16_tensors": sum(n.op_type == "Cast" and n.name.endswith(".cast") for n in model.graph.node)}


def fp16_graph(src: Path, dst: Path) -> dict:
    """A true fp16 graph with fp32 input and output, for onnxruntime's CUDA provider."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from edge_vlm.logs import root_logging_preserved

    with root_logging_preserved():
        model = convert_float_to_float16(_load(src), keep_io_types=True, disable_shape_infer=True)
    _save(model, dst)
    return {"method": "fp16 graph, fp32 input and output (CUDA)"}


def weighted_matmuls(path: Path) -> dict[str, bool]:
    """MatMuls with a stored weight (the linear layers) -> whether each is outside the encoder (the Q-Former, the
    projections), by the namespaces torch.onnx.export records on each node."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type != "MatMul" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        scope = next((p.value for p in n.metadata_props if p.key == "namespace"), "")
        top = scope.split("/")[1].split(":")[0] if "/" in scope else ""
        out[n.name] = top not in ENCODER_MODULES
    return out


# int8 weight formats for DynamicQuantizeMatMul / MatMulInteger. A CPU without VNNI (AVX2 only) multiplies
# uint8 activations by int8 weights with vpmaddubsw, whose int16 pair sums saturate for full-range weights
# (7.8 % output error measured on an AVX2 EPYC, 0.7 % with 7-bit weights): "s8" is only right on VNNI CPUs,
# and a bundle does not know where it will run.
WEIGHT_FORMATS = {"u8": ("QUInt8", False), "s7": ("QInt8", True), "s8": ("QInt8", False)}
INT8_WEIGHTS = "u8"


def int8_dynamic(src: Path, dst: Path, keep: tuple[str, ...] = (), weights: str = INT8_WEIGHTS) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edge_vlm.logs import root_logging_preserved

    from onnxruntime.quantization.shape_inference import quant_pre_process

    exclude = [n for n, outside in weighted_matmuls(src).items() if outside] if "connector" in keep else []
    big = not _all_inline(_load_meta(src))
    # the quantizer skips every MatMul whose input type it cannot infer (most of a dynamo-exported ViT):
    # onnxruntime's symbolic shape inference first
    typed = dst.with_name(dst.stem + ".typed.onnx")
    try:
        with root_logging_preserved(), _quiet_quantizer():
            quant_pre_process(src, typed, skip_optimization=True, save_as_external_data=big,
                              all_tensors_to_one_file=True, external_data_location=typed.name + ".data")
            wtype, reduce_range = WEIGHT_FORMATS[weights]
            quantize_dynamic(typed, dst, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=reduce_range,
                             weight_type=getattr(QuantType, wtype), nodes_to_exclude=exclude,
                             use_external_data_format=big)
    finally:
        _remove(typed)
    return {"method": f"{weights} weights per output channel, dynamic uint8 activations (MatMulInteger)",
            "weights": weights, "activations": "dynamic", "fp32": ["convolutions", "LayerNorms", "softmax", "attention products",
                                               *(["connector"] if exclude else [])]}


def _load_meta(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


class _quiet_quantizer:
    """onnxruntime's quantizer logs a pre-processing suggestion through the root logger on every call."""

    def __enter__(self):
        import logging

        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        import logging

        logging.getLogger().setLevel(self.level)


# ---- the stage ----------------------------------------------------------------------------------------------
def convert(fp32: Path, dst: Path, sets: ImageSets, cfg: VisionPrecisionConfig, threads: int,
            log=lambda msg: None) -> dict:
    """Make `dst` (vision.onnx) at the configured precision from the validated fp32 file `fp32`, which is
    removed. Returns the manifest's record: precision, method, held-out cosines, what was tried."""
    tried = {}
    for precision in cfg.candidates():
        if precision == "fp32":
            if fp32 != dst:
                _move(fp32, dst)
            return {"precision": "fp32", "requested": cfg.precision, **({"tried": tried} if tried else {})}
        if precision == "int8" and not sets.calibration:  # auto without calibration images (checked for int8)
            tried["int8"] = {"skipped": "no calibration images (--vision-calibration DIR)"}
            log("vision int8 skipped: no calibration images; trying the next precision")
            continue
        try:
            record, held = _attempt(fp32, dst, precision, sets, cfg, threads, log)
        except Exception as e:  # a converter or onnxruntime failing on an unusual graph
            _remove(dst)
            if cfg.precision != "auto":
                raise ExportError(f"the {precision} vision model could not be made ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); nothing was written. Use "
                                  "--vision-precision fp32 (or auto, which falls back)") from e
            tried[precision] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            log(f"vision {precision} could not be made ({type(e).__name__}); trying the next precision")
            continue
        floor_mean, floor_min = FLOORS[precision]
        s = summary(held)
        mean, low = float(np.mean(list(held.values()))), min(held.values())  # unrounded, against the floors
        if mean >= floor_mean and low >= floor_min:
            _remove(fp32)
            return {"precision": precision, "requested": cfg.precision, **record, "cosine_vs_torch_fp32": s,
                    "floor": {"mean": floor_mean, "min": floor_min}, **({"tried": tried} if tried else {})}
        under = sorted((k for k, v in held.items() if v < floor_min), key=held.get)
        tried[precision] = {**s, "under_min_floor": under[:5]}
        _remove(dst)
        if cfg.precision != "auto":
            worst = ", ".join(f"{k} {held[k]:.5f}" for k in sorted(held, key=held.get)[:4])
            raise ExportError(f"the {precision} vision model misses its floor against torch fp32 on held-out images: "
                              f"cosine mean {mean:.5f} (floor {floor_mean}), min {low:.5f} (floor {floor_min}); "
                              f"lowest: {worst}. Nothing was written. Use --vision-precision fp32 (or auto, which "
                              "falls back)")
        log(f"vision {precision}: cosine mean {mean:.5f} / min {low:.5f} misses its floor; trying the next")
    raise AssertionError("auto always ends with fp32")


def _attempt(fp32: Path, dst: Path, precision: str, sets: ImageSets, cfg, threads: int, log):
    if precision == "fp16":
        record = (fp16_graph if cfg.device == "cuda" else fp16_cast_at_load)(fp32, dst)
        return record, (cosines(dst, sets.held_out, threads) if cfg.device == "cpu"
                        else _fp16_cosines(dst, sets, threads, record))
    record = int8_dynamic(fp32, dst)
    cal = cosines(dst, sets.calibration, threads)
    in_encoder = [n for n, outside in weighted_matmuls(fp32).items() if not outside]
    if in_encoder and (summary(cal)["mean"] < FLOORS["int8"][0] or summary(cal)["min"] < FLOORS["int8"][1]):
        log(f"vision int8: calibration cosine {summary(cal)['mean']:.5f}; keeping the connector in fp32")
        _remove(dst)
        record = int8_dynamic(fp32, dst, keep=("connector",))
        record["calibration_cosine_all_int8"] = summary(cal)
        cal = cosines(dst, sets.calibration, threads)
    record["calibration_cosine"] = summary(cal)
    return record, cosines(dst, sets.held_out, threads)


def _fp16_cosines(path: Path, sets: ImageSets, threads: int, record: dict) -> dict:
    """A true fp16 graph, checked where it will run when this machine has CUDA; on a CPU provider the values
    are rounded to fp16 between ops but each op computes in fp32, so CUDA's fp16 arithmetic is not exercised
    (recorded as `checked_on`)."""
    from edge_vlm.runtime.device import ort_has_cuda

    on_gpu = ort_has_cuda()
    record["checked_on"] = "cuda" if on_gpu else "cpu (fp16 between ops; CUDA's fp16 arithmetic not exercised)"
    return cosines(path, sets.held_out, threads,
                   ("CUDAExecutionProvider", "CPUExecutionProvider") if on_gpu else ("CPUExecutionProvider",))


def _move(src: Path, dst: Path) -> None:
    for a, b in ((src, dst), (src.with_name(src.name + ".data"), dst.with_name(dst.name + ".data"))):
        if a.exists():
            shutil.move(str(a), str(b))
    # an fp32 file with external data names its .data file: rename the reference too
    data = src.with_name(src.name + ".data")
    if dst.with_name(dst.name + ".data").exists():
        import onnx

        m = onnx.load(str(dst), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location" and e.value == data.name:
                    e.value = dst.name + ".data"
        onnx.save_model(m, str(dst))


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)
