"""The source description as one typed schema (pydantic v2), validated once at load.

A source is described by an `edge-vlm-source.json` (the built-in model, `edge-vlm synth`, `edge-vlm
align`), by a recipe's source fields or by CLI flags. `parse_source` checks every field the loaders
read (types, ranges, the template's markers, the family's shapes) and turns any mismatch into one
SourceError line naming the file and the field: nothing malformed reaches torch (an `image_size` of 0
used to fail inside torch's ONNX exporter after 25 s). Unknown fields are errors, not ignored typos.
Types are strict: "224" is not 224 and 1 is not true.

The loaders import this module when they run (it reads their tables: nano's stride, minigpt's
FAMILIES), so importing a family module stays cheap and free of cycles.
"""
from __future__ import annotations

import os
import reprlib
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StrictBool, Tag,
                      ValidationError, model_validator)

from edge_vlm.errors import SourceError
from edge_vlm.families import SOURCE_FILE, TRUST_FIELD
from edge_vlm.families import eva_qformer as eq
from edge_vlm.families.minigpt import FAMILIES as UPSTREAM
from edge_vlm.families.nano import STRIDE
from edge_vlm.manifest import RESIZE_METHODS


# ---- field types: each says what it accepts, so an error message can say what was expected ----
def _clean_text(s: str) -> str:
    """Text that survives the trip to a file name, a tokenizer and a JSON manifest."""
    if "\x00" in s:
        raise ValueError("must not contain a NUL byte")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
    return s


def _path(s: str) -> str:
    try:
        os.fsencode(s)  # the OS must be able to open it (not only Python)
    except UnicodeError:
        raise ValueError("is not a path this system can encode") from None
    return s


def _relative(s: str) -> str:
    if os.path.isabs(s):
        raise ValueError("must be relative to the package's folder")
    return s


def _as_list(v):
    """`"###"` means `["###"]` (a single stop string); tuples come from Python callers."""
    return [v] if isinstance(v, str) else list(v) if isinstance(v, tuple) else v


def _one_image_marker(template: str, marker: str = "<ImageHere>") -> str:
    n = template.count(marker)
    if n != 1:
        raise ValueError(f"must hold the image marker {marker} exactly once (it holds it {n} times)")
    if template.count("{prompt}") != 1:  # as the bundle's manifest requires (edge_vlm.manifest.PromptSpec)
        raise ValueError(f"must hold {{prompt}} (where the question goes) exactly once "
                         f"(it holds it {template.count('{prompt}')} times)")
    return template


Text = Annotated[str, Field(max_length=4096), AfterValidator(_clean_text)]
Name = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_clean_text)]
PathStr = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_clean_text), AfterValidator(_path)]
Stop = Annotated[list[Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_clean_text)]],
                 Field(max_length=64), BeforeValidator(_as_list)]
Template = Annotated[str, Field(min_length=1, max_length=16384), AfterValidator(_clean_text)]
# llama.cpp pre-tokenizer names: default, smollm, llama-bpe, gpt-2, ...
PreTokenizer = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Word = Annotated[str, Field(pattern=r"^[^\s](.{0,38}[^\s])?$")]  # no edge spaces: nano embeds " " + word


def _distinct(group: list) -> list:
    if len(set(group)) != len(group):
        raise ValueError(f"a word group names a word twice: {group}")
    return group


WordGroup = Annotated[list[Word], Field(min_length=2, max_length=256), AfterValidator(_distinct)]


def Int(lo: int, hi: int):  # noqa: N802 (a type, spelled like one)
    return Annotated[int, Field(ge=lo, le=hi)]


Eps = Annotated[float, Field(gt=0, le=0.1, allow_inf_nan=False)]
ImageSize = Int(16, 4096)


class Schema(BaseModel):
    """Unknown fields are errors; no coercion ("224" is not an int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


# ---- nano (nano.py) ----
class PackageRef(Schema):
    """A file shipped inside an installed Python package (how the built-in model finds its parts).
    A top-level package name only: locating `a.b` would import (run) `a`."""

    package: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")]
    path: Annotated[PathStr, AfterValidator(_relative)]


def _ref_kind(v):
    return "<path>" if isinstance(v, str) else "<package>" if isinstance(v, (dict, PackageRef)) else None


# a path relative to the source folder (or absolute), or a package's file; the tags pick one branch
# (one error, not one per branch) and describe_errors leaves them out of field paths
FileRef = Annotated[Annotated[PathStr, Tag("<path>")] | Annotated[PackageRef, Tag("<package>")],
                    Discriminator(_ref_kind, custom_error_type="file_ref",
                                  custom_error_message="expected a path or {'package': ..., 'path': ...}")]
UNION_TAGS = {"<path>", "<package>"}


class EncoderOverrides(Schema):
    """efficientnet_lite_pytorch's GlobalParams a tiny test encoder changes (the rest stay fixed)."""

    width_coefficient: Annotated[float, Field(gt=0, le=4, allow_inf_nan=False)] | None = None
    depth_coefficient: Annotated[float, Field(gt=0, le=4, allow_inf_nan=False)] | None = None
    dropout_rate: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] | None = None
    drop_connect_rate: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] | None = None
    batch_norm_momentum: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] | None = None
    batch_norm_epsilon: Eps | None = None


class NanoVision(Schema):
    encoder: Literal["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "efficientnet-lite3",
                     "efficientnet-lite4"] = "efficientnet-lite0"
    encoder_weights: FileRef
    encoder_overrides: EncoderOverrides = EncoderOverrides()
    image_size: Int(STRIDE, 4096) = 256
    mean: Annotated[list[Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)]],
                    Field(min_length=3, max_length=3)] = [0.5] * 3
    std: Annotated[list[Annotated[float, Field(ge=1e-4, le=10, allow_inf_nan=False)]],  # the manifest's bounds
                   Field(min_length=3, max_length=3)] = [0.5] * 3
    resize: Literal[RESIZE_METHODS] = "bicubic"
    pool: Int(1, 16) = 2
    concat: Int(1, 64) = 4
    projector: Literal["linear", "mlp2x_gelu"] = "linear"  # nano.PROJECTORS
    # word tokens (nano.WordSlots): one image token per group, a choice among the group's words
    words: Annotated[list[WordGroup], Field(max_length=16)] = []

    @model_validator(mode="after")
    def _grid(self):  # the same arithmetic as nano.NanoVisionConfig.check, before any weights are read
        if self.image_size % (STRIDE * self.pool):
            raise ValueError(f"image_size {self.image_size} must be a multiple of {STRIDE * self.pool} "
                             f"({STRIDE} x pool)")
        grid = self.image_size // STRIDE // self.pool
        if (grid * grid) % self.concat:
            raise ValueError(f"{grid}x{grid} pooled tokens do not split into groups of concat={self.concat}")
        return self


class NanoLLM(Schema):
    gguf: FileRef | None = None
    hf_dir: FileRef | None = None
    tokenizer_pre: PreTokenizer = "smollm"
    # low-rank adapters trained by `edge-vlm align --lora-rank R`, merged into the weights at load (llms/lora.py)
    adapter: FileRef | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.gguf is None) == (self.hf_dir is None):
            raise ValueError("needs exactly one of 'gguf' (a GGUF file) or 'hf_dir' (a transformers folder)")
        return self


class NanoPrompt(Schema):
    template: Template
    image_marker: Annotated[str, Field(min_length=1, max_length=64)] = "<ImageHere>"  # as the manifest's
    add_bos: StrictBool = False
    stop: Stop = []

    @model_validator(mode="after")
    def _markers(self):
        try:
            _one_image_marker(self.template, self.image_marker)
        except ValueError as e:
            raise ValueError(f"template {e}") from None
        return self


Count = Int(0, 10**12)


class VisionShapeDecl(Schema):  # plan.shapes.VisionShape, declared for `edge-vlm plan`
    params: Count
    seq: Count
    width: Count
    mlp: Count
    heads: Int(1, 4096)
    image_tokens: Count


class LLMShapeDecl(Schema):  # plan.shapes.LLMShape
    arch: Name
    hidden: Count
    layers: Count
    heads: Int(1, 4096)
    kv_heads: Int(1, 4096)
    ff: Count
    vocab: Count
    tied: StrictBool = False


class ShapeDecl(Schema):
    comment: Text | None = Field(None, alias="_comment")
    vision: VisionShapeDecl
    llm: LLMShapeDecl


class NanoSource(Schema):
    family: Literal["nano"]
    name: Name | None = None
    description: Text | None = None
    vision: NanoVision
    projection: FileRef
    llm: NanoLLM
    shape: ShapeDecl | None = None
    prompt: NanoPrompt


# ---- the upstream families (minigpt.py) ----
_V, _Q = eq.VitDims(), eq.QFormerDims()


class VitDimsDecl(Schema):
    """eva_qformer.VitDims; non-default only for miniature test models. Bounds keep a typo from
    allocating terabytes."""

    width: Int(1, 8192) = _V.width
    depth: Int(1, 128) = _V.depth
    heads: Int(1, 256) = _V.heads
    mlp: Int(1, 65536) = _V.mlp
    patch: Int(1, 64) = _V.patch
    weights_size: ImageSize = _V.weights_size
    eps: Eps = _V.eps
    ln_vision_eps: Eps = _V.ln_vision_eps

    @model_validator(mode="after")
    def _divisible(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        if self.weights_size % self.patch:
            raise ValueError(f"weights_size {self.weights_size} must be a multiple of patch {self.patch}")
        return self


class QFormerDimsDecl(Schema):
    hidden: Int(1, 8192) = _Q.hidden
    layers: Int(1, 64) = _Q.layers
    heads: Int(1, 256) = _Q.heads
    intermediate: Int(1, 65536) = _Q.intermediate
    queries: Int(1, 4096) = _Q.queries
    cross_freq: Int(1, 64) = _Q.cross_freq
    eps: Eps = _Q.eps

    @model_validator(mode="after")
    def _divisible(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be a multiple of heads {self.heads}")
        return self


class SynthInfo(Schema):
    """Provenance written by `edge-vlm synth`; `proj_mid` is read by `edge-vlm plan`."""

    seed: int
    size: Literal["full", "mini"]
    note: Text = ""
    llm_vocab: Int(1, 10**7) | None = None
    proj_mid: Int(1, 65536) | None = None


UpstreamFamily = Literal[("auto", *UPSTREAM)]


def check_family_shapes(family: str, image_size: int | None, patch: int = _V.patch) -> None:
    """What a family fixes: its image size, and a ViT grid the connector can split (concat-4 needs
    a multiple of 4 patches). `auto` may become any family: every size is checked."""
    specs = [UPSTREAM[family]] if family in UPSTREAM else list(UPSTREAM.values())
    if image_size is not None and family in UPSTREAM and image_size != UPSTREAM[family].image_size:
        raise ValueError(f"image_size {image_size}: {family} runs at {UPSTREAM[family].image_size}")
    for spec in specs:
        grid, rest = divmod(spec.image_size, patch)
        if rest or (spec.connector == "concat4" and grid * grid % 4):
            raise ValueError(f"a ViT patch of {patch} does not tile {spec.image_size} px into a grid "
                             f"{spec.connector} can use")


class UpstreamFields(Schema):
    """The fields a recipe, the CLI and a source file share (all optional here)."""

    family: UpstreamFamily | None = None
    vit: PathStr | None = None
    qformer: PathStr | None = None
    ckpt: PathStr | None = None
    llm: PathStr | None = None
    template: Annotated[Template, AfterValidator(_one_image_marker)] | None = None
    stop: Stop | None = None
    add_bos: StrictBool | None = None  # --bos / --no-bos (default: the family's prompt style)
    prompt_style: Literal["inference", "training"] | None = None  # --prompt-style (default inference)
    lora_alpha: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] | None = None
    tokenizer_pre: PreTokenizer = "default"
    image_size: ImageSize | None = None  # a recipe's statement of the family's shapes: the size is checked
    # here, image_tokens (which depends on the files' dims) at load
    image_tokens: Int(1, 65536) | None = None
    name: Name | None = None
    llm_dtype: Literal["float32", "float16"] | None = None  # None: float32

    @model_validator(mode="after")
    def _shapes(self):
        if self.family is not None:  # recipes have no vit_dims (the family's own ViT, patch 14)
            check_family_shapes(self.family, self.image_size, getattr(self, "vit_dims", _V).patch)
        return self


class UpstreamFile(UpstreamFields):
    """An upstream family's edge-vlm-source.json: a family and its files. No trust_checkpoint: a
    downloaded folder must never switch on code execution for itself."""

    family: UpstreamFamily
    vit_dims: VitDimsDecl = VitDimsDecl()
    qformer_dims: QFormerDimsDecl = QFormerDimsDecl()
    synth: SynthInfo | None = None

    @model_validator(mode="after")
    def _files(self):
        missing = [f for f in ("vit", "ckpt", "llm") if getattr(self, f) is None]
        if missing:
            raise ValueError(f"family {self.family!r} needs the files {', '.join(missing)} "
                             f"(--{' --'.join(missing)}, or in the recipe / {SOURCE_FILE})")
        return self


class UpstreamDescription(UpstreamFile):
    """A file merged with the command line's fields: only there may trust_checkpoint appear."""

    trust_checkpoint: StrictBool = False


HINTS = {NanoSource: "see edge_vlm/models/nano/edge-vlm-source.json for a complete example",
         UpstreamFile: "see README 'Upstream families' and export/*.toml for the fields",
         UpstreamDescription: "see README 'Upstream families' and export/*.toml for the fields"}


def parse_source(data, where: str, allow_trust: bool = False) -> NanoSource | UpstreamDescription:
    """A source description (parsed JSON, or merged with CLI / recipe fields when `allow_trust`) as a
    typed model; anything else is a SourceError naming `where`, the field and what it expects."""
    from edge_vlm.families import FAMILIES

    if not isinstance(data, dict):
        raise SourceError(f"{where}: expected a JSON object of source fields, got {kind(data)}")
    if TRUST_FIELD in data and not allow_trust:
        raise SourceError(f"{where} sets {TRUST_FIELD!r}: a source folder cannot trust its own checkpoints. "
                          "Remove the field; if you trust the files, pass --trust-checkpoint")
    family = data.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise SourceError(f"{where}: family: expected one of {', '.join(FAMILIES)}, got {short(family)}")
    model = NanoSource if family == "nano" else UpstreamDescription if allow_trust else UpstreamFile
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SourceError(f"{where}: {describe_errors(e)} ({HINTS[model]})") from None


# ---- one line out of pydantic's errors ----
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxdict = _repr.maxlevel = 3


def short(value) -> str:
    """A bounded repr: a hostile value (10 MB string, deep nesting, a 5000-digit int) stays one short line."""
    try:
        return _repr.repr(value)
    except Exception:  # reprlib calls repr(); a huge int refuses (sys.int_info digits limit)
        return f"a {type(value).__name__}"


def kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a number ({short(value)})" if isinstance(value, (int, float)) else f"a {type(value).__name__}")


def describe_errors(e: ValidationError, limit: int = 4) -> str:
    """`field.path: what is expected (got value)`, the first `limit` joined by '; '."""
    parts = []
    for err in e.errors(include_url=False)[:limit]:
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"] if x not in UNION_TAGS)
        loc = loc.lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            parts.append(f"{loc}: missing (required)")
        elif err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown field")
        elif err["type"] == "value_error":  # our own checks: the message names the values
            parts.append(f"{loc}: {msg}" if loc else msg)
        else:
            parts.append(f"{loc or 'value'}: {msg}, got {short(err.get('input'))}")
    more = e.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
