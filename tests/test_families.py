"""The upstream families from miniature checkpoints in exactly the upstream layouts (`edge-vlm synth
--size mini`: same key names and nesting, small widths), checked against `upstream_reference`, a
forward of the upstream computation written from families.md without edge-vlm's code."""
import json
import shutil

import numpy as np
import pytest
import torch

import upstream_reference as ur

FAMILY_MODELS = {  # family -> synth model
    "minigpt4": "minigpt4-7b", "minigpt4-llama2": "minigpt4-llama2", "minigpt-v2": "minigpt-v2",
    "tinygpt-v": "tinygpt-v", "tinygpt-v-stage4": "tinygpt-v-stage4",
}
N_NEW = 8


@pytest.fixture(scope="session")
def upstream_source(tmp_path_factory, tokenizer):
    from edge_vlm.families import synth

    made = {}

    def get(family: str):
        if family not in made:
            made[family] = synth.write(FAMILY_MODELS[family], tmp_path_factory.mktemp("upstream") / family, "mini",
                                       seed=len(made), tokenizer=tokenizer)
        return made[family]

    return get


@pytest.fixture(scope="session")
def upstream_bundle(tmp_path_factory, upstream_source):
    from edge_vlm.export.run import ExportConfig, run

    made = {}

    def get(family: str, bits: int):
        if (family, bits) not in made:
            out = tmp_path_factory.mktemp("bundles") / f"{family}-{bits}"
            made[family, bits] = run(ExportConfig(source=str(upstream_source(family)), out=str(out), bits=bits),
                                     progress=False)
        return made[family, bits]

    return get


def _raw(folder):
    """The upstream files as upstream reads them."""
    desc = json.loads((folder / "edge-vlm-source.json").read_text())
    vit = torch.load(folder / desc["vit"], weights_only=True)
    blip2 = torch.load(folder / desc["qformer"], weights_only=True)["model"] if "qformer" in desc else None
    ckpt = torch.load(folder / desc["ckpt"], weights_only=True)["model"]
    return desc, vit, blip2, ckpt


def _bundle_greedy(llm, prompt, question, embeds, n):
    from edge_vlm.runtime.generate import GenerationStats, build_prompt, prefill

    prefill(llm, prompt, question, embeds, n, GenerationStats())
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.logits())))
        llm.eval_tokens([out[-1]])
    return out, build_prompt(llm, prompt, question)


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_16bit_bundle_equals_the_upstream_computation(family, upstream_source, upstream_bundle, shape_image):
    from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig

    folder = upstream_source(family)
    desc, vit, blip2, ckpt = _raw(folder)
    d = desc["vit_dims"], desc["qformer_dims"]
    bundle = upstream_bundle(family, 16)
    question = "what color is the shape?"
    with Pipeline.load(bundle, RuntimeConfig(exact=True)) as p:
        assert p.manifest.family == family
        pixels = p.vision.pixels(shape_image)
        got_embeds = p.vision.embed_pixels(pixels)[0]
        got, (before, after) = _bundle_greedy(p.llm, p.manifest.prompt, question, got_embeds, N_NEW)
    want_embeds = ur.image_embeddings(family, vit, blip2, ckpt, torch.from_numpy(pixels), d[0]["depth"],
                                      d[0]["heads"], d[1]["layers"], d[1]["heads"])[0].numpy()
    assert got_embeds.shape == want_embeds.shape
    np.testing.assert_allclose(got_embeds, want_embeds, atol=1e-4, rtol=1e-4)
    want = ur.greedy(ur.UpstreamLLM(family, folder / desc["llm"], ckpt), before, torch.from_numpy(want_embeds),
                     after, N_NEW)
    assert got == want


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_4bit_bundle_runs(family, upstream_bundle, shape_image):
    from edge_vlm.runtime.pipeline import Pipeline
    from edge_vlm.runtime.sampling import SamplingConfig

    bundle = upstream_bundle(family, 4)
    with Pipeline.load(bundle) as p:
        assert p.manifest.llm.backend == ("onnx" if family.startswith("tinygpt") else "gguf")
        r = p.answer(shape_image, "what is this?", SamplingConfig(max_tokens=4))
    assert r.stats.generated_tokens >= 1 and r.stats.image_tokens == p.manifest.vision.n_image_tokens


def test_manifest_records_the_load(upstream_bundle):
    from edge_vlm.manifest import load_manifest

    m = load_manifest(upstream_bundle("tinygpt-v", 16))
    keys = m.source.keys
    assert keys["vit"]["blocks_in_file"] == keys["vit"]["blocks_run"] + 1
    assert keys["lora"]["modules"] == 4 and keys["lora"]["alpha"] == 16.0
    assert keys["llm_norms_from_ckpt"] == 2 * 4 + 1
    assert m.preprocess.mean == pytest.approx([0.48145466, 0.4578275, 0.40821073]) and m.preprocess.resize == "bicubic"
    assert m.prompt.stop == ["###"] and "tinygptv_stage1_2_3_eval.yaml" in m.source.prompt_source
    assert not m.prompt.add_bos and m.source.prompt_style == "inference"


# ---- families.md's templates, rendered (the strings upstream builds) ----
SYSTEM_TEXT = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide "
               "it to you. Please answer my questions.")
# what upstream's own inference path renders (its demo), with whether its tokenizer adds BOS
RENDERED = {
    "minigpt4": (SYSTEM_TEXT + "###Human: <Img><ImageHere></Img> Q###Assistant: ", True),
    "minigpt4-llama2": (SYSTEM_TEXT + "<s>[INST] <Img><ImageHere></Img> Q [/INST] ", True),
    "minigpt-v2": ("<s>[INST] <Img><ImageHere></Img> Q [/INST]", True),
    "tinygpt-v": (SYSTEM_TEXT + "###Human: <Img><ImageHere></Img> Q###Assistant: ", False),
    "tinygpt-v-stage4": ("<s>[INST] <Img><ImageHere></Img> Q [/INST]", False),
}
# the templates the checkpoints were trained with (--prompt-style training); training always prepends BOS
TRAINED = {
    "minigpt4": "###Human: <Img><ImageHere></Img> Q ###Assistant: ",
    "minigpt4-llama2": "[INST] <Img><ImageHere></Img> Q [/INST] ",
    "minigpt-v2": "[INST] <Img><ImageHere></Img> Q [/INST]",
    "tinygpt-v": "###Human: <Img><ImageHere></Img> Q ###Assistant: ",
    "tinygpt-v-stage4": "[INST] <Img><ImageHere></Img> Q  [/INST]",
}


@pytest.mark.parametrize("family", list(RENDERED))
def test_templates_are_families_md(family):
    from edge_vlm.families.minigpt import FAMILIES

    spec = FAMILIES[family]
    assert (spec.prompt.template.replace("{prompt}", "Q"), spec.prompt.add_bos) == RENDERED[family]
    assert spec.train_prompt.template.replace("{prompt}", "Q") == TRAINED[family] and spec.train_prompt.add_bos
    assert spec.image_size == (448 if family in ("minigpt-v2", "tinygpt-v-stage4") else 224)


def _upstream_ids(tokenizer, rendered: str, add_bos: bool) -> tuple[list, list]:
    """How upstream's Chat.get_context_emb tokenizes a rendered prompt: split at <ImageHere>, the first
    segment with add_special_tokens (BOS only where the tokenizer adds one: not Phi-2's CodeGenTokenizer)."""
    before, after = rendered.split("<ImageHere>")
    ids = tokenizer(before, add_special_tokens=False).input_ids
    return ([tokenizer.bos_token_id] if add_bos else []) + ids, tokenizer(after, add_special_tokens=False).input_ids


@pytest.mark.parametrize("family", ["tinygpt-v", "tinygpt-v-stage4"])
def test_tinygpt_v_prompt_ids_are_upstream_demos(family, upstream_source, tokenizer):
    """Stage 3 (demo.py, CONV_VISION_Vicuna0) and stage 4 (demo_v2.py): the token ids edge-vlm feeds around
    the image are the ones upstream's inference feeds, with no BOS; --prompt-style training and --bos
    give the training layout."""
    from edge_vlm.families import load_source
    from edge_vlm.reference import ReferencePipeline
    from edge_vlm.runtime.generate import build_prompt

    q = "What is in the image?"
    rendered = RENDERED[family][0].replace(" Q", " " + q)
    ref = ReferencePipeline(load_source(str(upstream_source(family))))
    assert build_prompt(ref.llm, ref.src.prompt, q) == _upstream_ids(tokenizer, rendered, False)
    trained = load_source(str(upstream_source(family)), {"prompt_style": "training"})
    assert trained.prompt.add_bos and trained.prompt.template.replace("{prompt}", "Q") == TRAINED[family]
    assert load_source(str(upstream_source(family)), {"add_bos": True}).prompt.add_bos
    assert not load_source(str(upstream_source(family)), {"prompt_style": "training", "add_bos": False}).prompt.add_bos


def test_bos_flag_for_the_builtin_model_and_bad_values(tiny_source, tmp_path, capsys):
    from edge_vlm.cli import main
    from edge_vlm.families import describe_source

    assert describe_source(str(tiny_source), {"add_bos": True})[1]["prompt"]["add_bos"] is True
    assert main(["export", str(tiny_source), "--bits", "8", "--prompt-style", "chat", "-o", str(tmp_path / "x")]) == 2
    assert "--prompt-style" in capsys.readouterr().err
    rec = tmp_path / "r.toml"
    rec.write_text('add_bos = "yes"\n')
    assert main(["export", str(tiny_source), "--recipe", str(rec), "-o", str(tmp_path / "y")]) == 2
    assert "add_bos" in capsys.readouterr().err


def test_phi2_tokenizer_config_with_clean_up_spaces_exports(upstream_source, tmp_path, capsys):
    """Old-format Phi-2 folders say clean_up_tokenization_spaces=true and CodeGenTokenizer: the export
    validates (torch side and bundle decode alike) and decodes as transformers 4.36 did."""
    import shutil

    from edge_vlm.cli import main
    from edge_vlm.manifest import load_manifest
    from edge_vlm.runtime.tokenizer import BundleTokenizer

    src = tmp_path / "src"
    shutil.copytree(upstream_source("tinygpt-v"), src)
    cfg_file = src / "phi-2" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(clean_up_tokenization_spaces=True, tokenizer_class="CodeGenTokenizer")
    cfg_file.write_text(json.dumps(cfg))
    out = tmp_path / "b"
    assert main(["export", str(src), "--bits", "16", "-o", str(out)]) == 0, capsys.readouterr().err
    m = load_manifest(out)
    assert m.llm.tokenizer.clean_up_tokenization_spaces and m.validation.tokenizer["identical_text"]
    tok = BundleTokenizer(out / m.llm.tokenizer.file, None, [], True)
    ids = tok.tokenize("It 's a dog , isn't it ? I 'm sure .", False)
    assert tok.detokenize(ids) == "It's a dog, isn't it? I'm sure."  # transformers 4.36's clean_up_tokenization


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_family_auto_detects(family, upstream_source):
    from edge_vlm.families.minigpt import detect

    desc, _, _, ckpt = _raw(upstream_source(family))
    got, why = detect(ckpt, desc["vit_dims"]["width"], desc["qformer_dims"]["hidden"])
    assert got == (family if family != "tinygpt-v-stage4" else "tinygpt-v") and why


def test_family_auto_through_the_cli(upstream_source, tmp_path, capsys):
    from edge_vlm.cli import main
    from edge_vlm.manifest import load_manifest

    folder = upstream_source("minigpt4-llama2")
    rc = main(["export", str(folder), "--family", "auto", "--bits", "8", "-o", str(tmp_path / "b")])
    assert rc == 0
    assert "family: minigpt4-llama2 (llama_proj [64, 128] (4 x ViT width, no LoRA)" in capsys.readouterr().err
    assert load_manifest(tmp_path / "b").family == "minigpt4-llama2"


def test_family_auto_refuses_what_it_cannot_place(upstream_source, tmp_path, capsys):
    """Bare files with EVA-g's real widths expected: the miniature llama_proj fits no family."""
    from edge_vlm.cli import main

    folder = upstream_source("minigpt4-llama2")
    desc = json.loads((folder / "edge-vlm-source.json").read_text())
    rc = main(["export", "--family", "auto", "--vit", str(folder / desc["vit"]), "--ckpt", str(folder / desc["ckpt"]),
               "--llm", str(folder / desc["llm"]), "-o", str(tmp_path / "b")])
    assert rc == 4
    assert "cannot detect the family: llama_proj reads 128 features" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_recipes_name_valid_fields_and_match_their_family():
    from pathlib import Path

    from edge_vlm.export.run import load_recipe
    from edge_vlm.families.minigpt import FAMILIES

    recipes = sorted(Path(__file__).resolve().parent.parent.glob("export/*.toml"))
    upstream = [r for r in recipes if r.stem != "nano"]
    assert {r.stem for r in upstream} >= {"minigpt4-vicuna-7b", "minigpt4-vicuna-13b", "minigpt4-llama2-7b",
                                         "minigpt-v2", "tinygpt-v-stage3", "tinygpt-v-stage4"}
    for r in upstream:
        f = load_recipe(str(r))
        spec = FAMILIES[f["family"]]
        assert f["image_size"] == spec.image_size and f["backend"] in ("gguf", "onnx")
        assert all(k in f for k in ("vit", "ckpt", "llm", "image_tokens")), r


def test_recipe_exports_a_folder_of_upstream_files(upstream_source, tmp_path):
    """A recipe names the files; SOURCE is the folder holding them (here a miniature TinyGPT-V)."""
    from edge_vlm.export.run import ExportConfig, load_recipe, run
    from edge_vlm.manifest import load_manifest
    from pathlib import Path

    folder = upstream_source("tinygpt-v")
    files = tmp_path / "files"
    shutil.copytree(folder, files, ignore=shutil.ignore_patterns("edge-vlm-source.json"))
    mini = json.loads((folder / "edge-vlm-source.json").read_text())
    fields = load_recipe(str(Path(__file__).resolve().parent.parent / "export" / "tinygpt-v-stage3.toml"))
    upstream = {k: fields.pop(k) for k in list(fields) if k in ("family", "vit", "qformer", "ckpt", "llm",
                                                                "image_size", "image_tokens", "name")}
    upstream.update(vit_dims=mini["vit_dims"], qformer_dims=mini["qformer_dims"], image_tokens=4)
    # the recipe's file names are the released ones; the synth folder uses them too
    out = run(ExportConfig(source=str(files), upstream=upstream, out=str(tmp_path / "b"), **{**fields, "bits": 8}),
              progress=False)
    assert load_manifest(out).family == "tinygpt-v"


# ---- bad checkpoints: clear errors naming the problem keys ----
def _variant(upstream_source, family, tmp_path, ckpt=None, vit=None, desc=None):
    """A copy of a miniature source with its checkpoint / ViT state edited by `ckpt(state)` / `vit(state)`."""
    src = tmp_path / family
    shutil.copytree(upstream_source(family), src)
    d = json.loads((src / "edge-vlm-source.json").read_text())
    if ckpt:
        obj = torch.load(src / d["ckpt"], weights_only=True)
        new = ckpt(obj["model"])  # edits in place, or returns a new dict
        obj["model"] = new if isinstance(new, dict) else obj["model"]
        torch.save(obj, src / d["ckpt"])
    if vit:
        state = torch.load(src / d["vit"], weights_only=True)
        new = vit(state)
        torch.save(new if isinstance(new, dict) else state, src / d["vit"])
    if desc:
        d.update(desc)
        (src / "edge-vlm-source.json").write_text(json.dumps(d))
    return src


def _load_error(folder, exc=None):
    from edge_vlm.errors import SourceError
    from edge_vlm.families import load_source

    with pytest.raises(exc or SourceError) as e:
        load_source(str(folder))
    return str(e.value)


PEFT = "llama_model.base_model.model.model.layers"


@pytest.mark.parametrize("family, edit, expect", [
    ("minigpt4", lambda s: s.pop("llama_proj.bias"), ["missing keys", "llama_proj.bias"]),
    ("minigpt4", lambda s: s.update({"llama_proj.extra": torch.zeros(1)}), ["unexpected keys", "llama_proj.extra"]),
    ("minigpt-v2", lambda s: [s.pop(k) for k in list(s) if ".lora_" in k], ["needs its LoRA", "q_proj.lora_{A,B}"]),
    ("minigpt-v2", lambda s: s.pop(f"{PEFT}.1.self_attn.v_proj.lora_B.weight"),
     ["missing keys", "model.layers.1.self_attn.v_proj.lora_B.weight"]),
    ("tinygpt-v", lambda s: s.pop(f"{PEFT}.0.post_layernorm.weight"),
     ["missing keys", f"{PEFT}.0.post_layernorm.weight", "trained norms"]),
    ("tinygpt-v", lambda s: s.update({"llama_proj2.weight": s["llama_proj2.weight"][:32],
                                      "llama_proj2.bias": s["llama_proj2.bias"][:32]}),
     ["hidden size 64", "do not belong together"]),
])
def test_bad_checkpoint_names_the_keys(family, edit, expect, upstream_source, tmp_path):
    msg = _load_error(_variant(upstream_source, family, tmp_path, ckpt=edit))
    assert all(e in msg for e in expect), msg


def test_wrong_family_for_the_checkpoint_is_refused(upstream_source, tmp_path):
    """MiniGPT-v2's checkpoint read as MiniGPT-4 Llama-2 would silently drop its LoRA (upstream's strict=False)."""
    msg = _load_error(_variant(upstream_source, "minigpt-v2", tmp_path, desc={"family": "minigpt4-llama2"}))
    assert "has no LoRA" in msg and "--family auto" in msg


def test_bad_vit_file_names_the_keys(upstream_source, tmp_path):
    msg = _load_error(_variant(upstream_source, "minigpt4", tmp_path, vit=lambda s: s.pop("blocks.1.attn.q_bias")))
    assert "blocks.1.attn.q_bias" in msg
    msg = _load_error(_variant(upstream_source, "minigpt4-llama2", tmp_path / "b",
                               vit=lambda s: s.update({"blocks.0.attn.relative_position_bias_table": torch.zeros(3)})))
    assert "unexpected keys" in msg and "relative_position_bias_table" in msg


def test_newer_peft_names_load_the_same_weights(upstream_source, tmp_path):
    from edge_vlm.families import load_source

    def rename(s):
        return {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"):
                v for k, v in s.items()}

    a = load_source(str(upstream_source("minigpt-v2")))
    b = load_source(str(_variant(upstream_source, "minigpt-v2", tmp_path, ckpt=rename)))
    w = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(a.llm.state_dict()[w], b.llm.state_dict()[w])
    assert "peft>=0.3" in b.description["keys"]["lora"]["note"]


def test_truncated_and_unsafe_checkpoints(upstream_source, tmp_path):
    import argparse

    from edge_vlm.families import load_source

    folder = _variant(upstream_source, "minigpt4", tmp_path)
    d = json.loads((folder / "edge-vlm-source.json").read_text())
    ck = folder / d["ckpt"]
    good = ck.read_bytes()
    ck.write_bytes(good[: len(good) // 2])
    assert "truncated or damaged" in _load_error(folder)
    obj = torch.load(__import__("io").BytesIO(good), weights_only=True)
    torch.save({**obj, "config": argparse.Namespace(run="x")}, ck)  # needs full unpickling
    msg = _load_error(folder)
    assert "needs unsafe unpickling" in msg and "--trust-checkpoint" in msg
    # the folder cannot trust itself: only the user's --trust-checkpoint can
    (folder / "edge-vlm-source.json").write_text(json.dumps({**d, "trust_checkpoint": True}))
    msg = _load_error(folder)
    assert "cannot trust its own checkpoints" in msg and "--trust-checkpoint" in msg
    (folder / "edge-vlm-source.json").write_text(json.dumps(d))
    assert load_source(str(folder), {"trust_checkpoint": True}).family == "minigpt4"


def test_current_phi2_release_is_explained(upstream_source, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _variant(upstream_source, "tinygpt-v", tmp_path)
    f = folder / "phi-2" / "model.safetensors"
    state = load_file(str(f))
    save_file({k.replace("query_key_value", "q_proj"): v for k, v in state.items()}, str(f))
    msg = _load_error(folder)
    assert "current microsoft/phi-2 release" in msg and "old-format" in msg


def test_recipe_expectations_and_template_overrides_are_checked(upstream_source, tmp_path):
    from edge_vlm.families import load_source

    assert "expects image_tokens 99" in _load_error(_variant(upstream_source, "minigpt4", tmp_path,
                                                             desc={"image_tokens": 99}))
    assert "<ImageHere>" in _load_error(_variant(upstream_source, "minigpt4", tmp_path / "b",
                                                 desc={"template": "no marker {prompt}"}))
    src = load_source(str(_variant(upstream_source, "minigpt4", tmp_path / "c",
                                   desc={"template": "Q: <ImageHere> {prompt} A:", "stop": ["\n"]})))
    assert src.prompt.template == "Q: <ImageHere> {prompt} A:" and src.prompt.stop == ["\n"]
    assert src.description["prompt_source"].endswith("overridden: template (user), stop (user)")


def test_upstream_flags_need_a_family(tmp_path, capsys):
    from edge_vlm.cli import main

    assert main(["export", "--vit", "x.pth", "-o", str(tmp_path / "b")]) == 2
    assert "need --family" in capsys.readouterr().err


def _train_llama_spm(folder):
    """A LLaMA-style SentencePiece tokenizer (BPE, byte fallback, <unk>/<s>/</s> = 0/1/2), trained here."""
    import sentencepiece as spm

    lines = ["Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide "
             "it to you. Please answer my questions.", "###Human: what color is the shape? ###Assistant: red",
             "[INST] describe this image in detail [/INST] a blue circle on a white background", "Hello, world!",
             "3.14159 + 42 = 45.14159", "is there a triangle in the image? yes, a green triangle"] * 20
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, allow_whitespace_only_pieces=True)  # as LLaMA's
    for f in ("corpus.txt", "tokenizer.vocab"):
        (folder / f).unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True}))


def test_llama_sentencepiece_tokenizer_goes_into_the_gguf(upstream_source, tmp_path, shape_image):
    """Vicuna and Llama-2 folders carry tokenizer.model (SentencePiece): the GGUF gets LLaMA's vocabulary
    with its scores, llama.cpp tokenizes like transformers, and greedy output matches upstream's."""
    from edge_vlm.export.run import ExportConfig, run
    from edge_vlm.manifest import load_manifest
    from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig

    folder = _variant(upstream_source, "minigpt4", tmp_path)
    desc, vit, blip2, ckpt = _raw(folder)
    llm_dir = folder / desc["llm"]
    for f in llm_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            f.unlink()
    _train_llama_spm(llm_dir)
    bundle = run(ExportConfig(source=str(folder), out=str(tmp_path / "b"), bits=16), progress=False)
    m = load_manifest(bundle)
    assert m.validation.tokenizer["identical_ids"] and m.source.spm_model.endswith("tokenizer.model")
    with Pipeline.load(bundle, RuntimeConfig(exact=True)) as p:
        pixels = p.vision.pixels(shape_image)
        got, (before, after) = _bundle_greedy(p.llm, p.manifest.prompt, "what color is the shape?",
                                              p.vision.embed_pixels(pixels)[0], N_NEW)
    assert before[0] == 1 and max(before + after) < 400  # LLaMA's BOS, ids from the SentencePiece vocabulary
    d = desc["vit_dims"], desc["qformer_dims"]
    emb = ur.image_embeddings("minigpt4", vit, blip2, ckpt, torch.from_numpy(pixels), d[0]["depth"], d[0]["heads"],
                              d[1]["layers"], d[1]["heads"])[0]
    assert got == ur.greedy(ur.UpstreamLLM("minigpt4", llm_dir, ckpt), before, emb, after, N_NEW)


def test_fp16_llm_export_writes_f16_gguf_and_records_the_reference(upstream_source, tmp_path, capsys):
    """--llm-dtype float16 (how a 7B export fits in 24 GB): the LLM loads after the vision export,
    in fp16; the GGUF's matrices are written as F16 directly; the bundle validates against the fp16
    reference and says so."""
    import gguf

    from edge_vlm.cli import main
    from edge_vlm.manifest import load_manifest

    out = tmp_path / "b16"
    assert main(["export", str(upstream_source("minigpt4")), "--llm-dtype", "float16", "--bits", "16",
                 "-o", str(out)]) == 0
    m = load_manifest(out)
    assert m.source.llm_dtype == "float16" and m.validation.llm.top1_agreement == 1.0
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out / m.llm.file)).tensors}
    assert types == {"F16", "F32"}
    assert main(["export", str(upstream_source("minigpt4")), "--llm-dtype", "float16", "--quant", "F32",
                 "-o", str(tmp_path / "b32")]) == 2  # widening fp16 to F32 is refused, with the fix
    assert "--llm-dtype float32" in capsys.readouterr().err
    assert main(["export", "--llm-dtype", "float16", "-o", str(tmp_path / "c")]) == 2  # no source, no family


def test_min_agreement_override_is_recorded(upstream_source, tmp_path, capsys):
    """Random-weight full-size models (edge-vlm synth) have near-tied logits that 4-bit noise flips:
    --min-agreement replaces the backend's floor, and the bundle says it did."""
    from edge_vlm.cli import main
    from edge_vlm.manifest import load_manifest

    out = tmp_path / "q4"
    assert main(["export", str(upstream_source("minigpt4")), "--bits", "4", "--min-agreement", "0", "-o", str(out)]) == 0
    v = load_manifest(out).validation.llm
    assert v.floor_overridden["used"] == 0 and v.floor_overridden["backend_floor"] > 0
    assert main(["export", str(upstream_source("minigpt4")), "--min-agreement", "1.5", "-o", str(tmp_path / "x")]) == 2
