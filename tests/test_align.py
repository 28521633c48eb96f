"""`edge-vlm align` trains only the projection, checkpoints, and resumes to the same result."""
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from edge_vlm.align import AlignConfig, run


def _cfg(src, out, cache, **kw):
    return AlignConfig(source=str(src), out=str(out), steps=4, batch_size=4, save_every=2, eval_every=4,
                       images=40, val_images=8, generated=6, drawn_val_images=3, cache_dir=str(cache), **kw)


def test_resume_after_interruption_gives_the_same_projection(tiny_source, tmp_path, monkeypatch):
    straight = run(_cfg(tiny_source, tmp_path / "a", tmp_path / "cache-a"), log=lambda *a: None)
    assert straight["final"]["step"] == 4 and np.isfinite(straight["final"]["val_loss"])

    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def flaky_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the machine went away after the step-2 checkpoint
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tiny_source, tmp_path / "b", tmp_path / "cache-b"), log=lambda *a: None)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    msgs = []
    run(_cfg(tiny_source, tmp_path / "b", tmp_path / "cache-b", resume=True), log=msgs.append)
    assert any("resumed" in m and "step 2" in m for m in msgs)
    a, b = load_file(str(tmp_path / "a" / "projection.safetensors")), load_file(str(tmp_path / "b" / "projection.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "b" / "training_curve.csv").read_text().count("\n") == 5  # header + 4 steps
    # the output is a complete source: the retrained model exports and runs from there
    from edge_vlm.families import load_source

    assert load_source(str(tmp_path / "b")).vision.proj.weight.shape == (64, 2560)


def test_only_the_projection_changes(tiny_source, tmp_path, monkeypatch):
    import json

    from edge_vlm.families import nano

    seen = []
    real_init = torch.optim.AdamW.__init__

    def spy(self, params, *a, **k):
        params = list(params)
        for g in params:  # tensors, or param groups
            seen.extend(p.shape for p in (g["params"] if isinstance(g, dict) else [g]))
        real_init(self, params, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", spy)
    run(_cfg(tiny_source, tmp_path / "o", tmp_path / "c"), log=lambda *a: None)
    assert sorted(seen) == sorted([torch.Size([64, 2560]), torch.Size([64])])  # Linear(2560 -> 64) only
    before = load_file(str(tiny_source / "projection.safetensors"))
    after = load_file(str(tmp_path / "o" / "projection.safetensors"))
    assert set(after) == {"weight", "bias"} and not np.allclose(before["weight"], after["weight"])
    enc = torch.load(tiny_source / "encoder.pth", weights_only=True)
    src = nano.load(tiny_source, json.loads((tiny_source / "edge-vlm-source.json").read_text()))
    for k, v in src.vision.encoder.state_dict().items():  # the frozen encoder is what is on disk
        assert torch.equal(v, enc[k])


def test_an_mlp_projector_with_more_image_tokens_trains_and_loads(tiny_source, tmp_path):
    """--projector mlp2x_gelu --concat 1: the output source says so, and export's loader builds the same modules."""
    import json

    from edge_vlm.families import load_source

    s = run(_cfg(tiny_source, tmp_path / "m", tmp_path / "cm", projector="mlp2x_gelu", concat=1), log=lambda *a: None)
    desc = json.loads((tmp_path / "m" / "edge-vlm-source.json").read_text())
    assert desc["vision"]["projector"] == "mlp2x_gelu" and desc["vision"]["concat"] == 1
    src = load_source(str(tmp_path / "m"))
    assert src.vision.proj[0].weight.shape == (64, 1280) and src.vision.proj[2].weight.shape == (64, 64)
    grid = src.vision.cfg.grid
    assert s["image_tokens"] == grid * grid == src.description["image_tokens"]


def test_easy_vqa_yes_no_is_balanced_per_wording_so_the_wording_alone_cannot_answer():
    from collections import Counter

    from edge_vlm.align import balance_yes_no, yes_no_wording

    rows = ([(0, "is there a blue shape?", "no")] * 9 + [(1, "is there a blue shape?", "yes")] * 2
            + [(2, "is there not a red shape?", "yes")] * 7 + [(3, "is there not a red shape?", "no")] * 3
            + [(4, "does the image contain a circle?", "yes")] * 4 + [(5, "what color is the shape?", "red")] * 5)
    out = balance_yes_no(rows, np.random.default_rng(0))
    c = Counter((yes_no_wording(q), a) for _, q, a in out if a in ("yes", "no"))
    assert c[((False, True), "yes")] == c[((False, True), "no")] == 2
    assert c[((True, True), "yes")] == c[((True, True), "no")] == 3
    assert c[((False, False), "yes")] == 0  # a wording with one answer only keeps none of it
    assert sum(a == "red" for _, _, a in out) == 5  # other questions untouched


def test_word_tokens_train_load_and_export_like_the_torch_model(tiny_source, tmp_path, shape_image):
    """--words: one image token per word group, made of the LLM's own embeddings of the words. The trained source
    records the groups, loads with the same embeddings, and its exported bundle answers as torch does."""
    import json

    from edge_vlm.export.run import ExportConfig
    from edge_vlm.export.run import run as export
    from edge_vlm.families import load_source, nano
    from edge_vlm.reference import ReferencePipeline
    from edge_vlm.runtime.generate import GenerationStats
    from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig
    from edge_vlm.runtime.sampling import SamplingConfig

    groups = (("red", "green", "blue", "yellow"), ("circle", "rectangle", "triangle"))
    s = run(_cfg(tiny_source, tmp_path / "w", tmp_path / "cw", words=groups, word_head_steps=5, lora_rank=2),
            log=lambda *a: None)
    desc = json.loads((tmp_path / "w" / "edge-vlm-source.json").read_text())
    assert desc["vision"]["words"] == [list(g) for g in groups]
    src = load_source(str(tmp_path / "w"))
    grid = src.vision.cfg.grid
    assert s["image_tokens"] == grid * grid // src.vision.cfg.concat + 2 == src.description["image_tokens"]
    want = nano.word_embeddings(src.llm, src.tokenizer, groups)  # adapters change no embedding
    torch.testing.assert_close(src.vision.words.embeddings, want)
    x = torch.randn(2, grid * grid // src.vision.cfg.concat, 1280 * src.vision.cfg.concat)
    tokens = src.vision.connect(x)
    assert tokens.shape == (2, s["image_tokens"], src.llm.config.hidden_size)
    # each word token is a convex mix of its group's embeddings: inside their bounding box
    first = want[:4]
    assert bool(((tokens[:, -2] >= first.min(0).values - 1e-5) & (tokens[:, -2] <= first.max(0).values + 1e-5)).all())

    bundle = export(ExportConfig(source=str(tmp_path / "w"), out=str(tmp_path / "b"), backend="gguf", bits=16),
                    progress=False)

    def answer(pipe):
        stats = GenerationStats()
        "".join(pipe.generate(shape_image, "what color is the shape?", SamplingConfig(max_tokens=8), stats))
        return stats.tokens

    ref = ReferencePipeline.load(str(tmp_path / "w"), n_ctx=512)
    with Pipeline.load(bundle, RuntimeConfig(device="cpu", exact=True, n_ctx=512)) as p:
        assert answer(p) == answer(ref)


def test_a_projection_file_that_does_not_match_the_declared_word_groups_is_refused(tiny_source, tmp_path):
    import json
    import shutil

    from edge_vlm.errors import CheckpointMismatch
    from edge_vlm.families import load_source

    run(_cfg(tiny_source, tmp_path / "w", tmp_path / "cw", words=(("red", "blue"),), word_head_steps=2),
        log=lambda *a: None)
    # the same file under a description without the groups: its words.* tensors are unexpected
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path / "w", plain)
    desc = json.loads((plain / "edge-vlm-source.json").read_text())
    del desc["vision"]["words"]
    (plain / "edge-vlm-source.json").write_text(json.dumps(desc))
    with pytest.raises(CheckpointMismatch, match="words"):
        load_source(str(plain))
    # groups declared, file without them: missing
    tiny = tmp_path / "declared"
    shutil.copytree(tiny_source, tiny)
    d0 = json.loads((tiny_source / "edge-vlm-source.json").read_text())
    d0["vision"]["words"] = [["red", "blue"]]
    (tiny / "edge-vlm-source.json").write_text(json.dumps(d0))
    with pytest.raises(CheckpointMismatch, match="word tokens"):
        load_source(str(tiny))
