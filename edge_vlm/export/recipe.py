"""Export recipes (export/*.toml) as one typed schema, validated once at load.

A recipe sets ExportConfig's options and an upstream family's source fields; the command line
overrides any of them. Types are strict (`bits = "4"` is an error, not 4), unknown fields are
errors, and trust_checkpoint is refused: trusting a file is decided on the command line only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationError

from edge_vlm.backends import BACKENDS
from edge_vlm.errors import BadInput
from edge_vlm.families.source_schema import Int, PathStr, Text, UpstreamFields, describe_errors, kind

# how to load an upstream family (edge_vlm.families.minigpt.UpstreamSource); paths relative to the source folder
SOURCE_FIELDS = ("family", "vit", "qformer", "ckpt", "llm", "template", "stop", "add_bos", "prompt_style", "lora_alpha",
                 "trust_checkpoint", "tokenizer_pre", "image_size", "image_tokens", "name", "llm_dtype")
# trust_checkpoint is not a recipe field: trusting a file is decided on the command line (--trust-checkpoint)
RECIPE_FIELDS = {"source", "backend", "bits", "quant", "group_size", "accuracy_level", "int4_method", "calibration",
                 "calibration_data", "vision_precision", "vision_calibration", "description",
                 *SOURCE_FIELDS} - {"trust_checkpoint"}


def _bits(b: int) -> int:  # a Literal[4, 8, 16] would take True for 1-like values; this cannot
    if b not in (4, 8, 16):
        raise ValueError(f"bits {b}: use 4, 8 or 16 (or quant for another llama.cpp type)")
    return b


class Recipe(UpstreamFields):
    """The source fields (typed in source_schema, all optional here) and ExportConfig's options."""

    source: PathStr | None = None  # a built-in name or a folder, relative to the recipe
    backend: Literal[("auto", *BACKENDS)] | None = None
    bits: Annotated[int, AfterValidator(_bits)] | None = None
    quant: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,32}$")] | None = None  # a llama.cpp type (Q4_1, F16)
    group_size: Int(1, 1 << 20) | None = None
    accuracy_level: Int(0, 4) | None = None
    int4_method: Literal["hqq", "rtn"] | None = None
    calibration: Literal["image", "text"] | None = None
    calibration_data: PathStr | None = None
    vision_precision: Literal["fp32", "fp16", "int8", "auto"] | None = None
    vision_calibration: PathStr | None = None  # a folder of images, relative to the recipe
    description: Text | None = None  # for people reading the recipe


assert set(Recipe.model_fields) == RECIPE_FIELDS, "RECIPE_FIELDS and the schema name the same fields"


def parse_recipe(data, where: str) -> dict:
    """The fields a recipe sets (typed, checked), as a dict; anything else is BadInput naming `where`."""
    if not isinstance(data, dict):
        raise BadInput(f"recipe {where}: expected a TOML table of fields, got {kind(data)}")
    if "trust_checkpoint" in data:
        raise BadInput(f"recipe {where} sets trust_checkpoint: a recipe cannot trust checkpoints for you. Remove it; "
                       "if you trust the files, pass --trust-checkpoint")
    try:
        return Recipe.model_validate(data).model_dump(exclude_unset=True)
    except ValidationError as e:
        raise BadInput(f"recipe {where}: {describe_errors(e)} (the fields and their types: export/*.toml)") from None


def load_recipe(path: str) -> dict:
    """Fields of a TOML export recipe that it sets (the caller merges them with CLI flags); unknown
    fields and wrong types are errors, not silently ignored. Relative paths start at the recipe."""
    import tomllib

    from edge_vlm.limits import absolute_path
    from edge_vlm.textfiles import read_structured

    p = Path(path)
    if not p.exists():
        raise BadInput(f"recipe {p} does not exist (recipes live in export/)")
    data = read_structured(p, BadInput, tomllib.loads, "TOML")  # TOMLDecodeError is a ValueError
    data = parse_recipe(data, str(p))
    data.pop("description", None)  # for people reading the recipe
    if "source" in data and not Path(data["source"]).is_absolute():
        from edge_vlm.families import BUILTIN

        if data["source"] not in BUILTIN:
            data["source"] = absolute_path(p.parent / data["source"], f"recipe {p}: source")
    for key in ("calibration_data", "vision_calibration"):
        if key in data and not Path(data[key]).is_absolute():
            data[key] = absolute_path(p.parent / data[key], f"recipe {p}: {key}")
    return data
