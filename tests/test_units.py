import numpy as np
import pytest

from edge_vlm.data import normalize_answer
from edge_vlm.errors import BadInput
from edge_vlm.manifest import PromptSpec
from edge_vlm.runtime.generate import _StopText
from edge_vlm.runtime.sampling import Sampler, SamplingConfig


def test_stop_string_cut_and_held_back():
    s = _StopText(["###"])
    assert s.feed("red#") == "red"  # '#' may start '###': held back
    assert s.feed("red##") == ""
    assert s.feed("red### more") == "" and s.stopped


def test_stop_text_waits_for_complete_utf8():
    s = _StopText([])
    assert s.feed("caf\ufffd") == "caf"
    assert s.feed("café") == "é"


def test_greedy_and_top_p():
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    assert Sampler(SamplingConfig())(logits) == 1
    picks = {Sampler(SamplingConfig(temperature=1.0, top_p=0.5, seed=s))(logits) for s in range(50)}
    assert picks == {1}  # top-p 0.5 keeps only the top token here
    picks = {Sampler(SamplingConfig(temperature=1.0, top_p=1.0, seed=s))(logits) for s in range(200)}
    assert {1, 2} <= picks


def test_sampling_config_rejects_nonsense():
    for kw in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}):
        with pytest.raises(BadInput):
            SamplingConfig(**kw)


def test_prompt_render_fills_prompt_literally():
    p = PromptSpec(template="A <ImageHere> B {prompt} C")
    assert p.render("x {y}") == ("A ", " B x {y} C")


def test_normalize_answer():
    assert normalize_answer(" Red.\n") == "red" and normalize_answer("") == ""


class ScriptedLLM:
    """A deterministic LLMSession for the decode loop's own logic: emits `script` token by token.
    (The real backends are exercised end to end in test_pipeline.py.)"""

    def __init__(self, pieces, eog_at=None):
        self.pieces, self.eog_at = pieces, eog_at
        self.n_ctx, self.n_embd = 64, 4
        self.reset()

    def tokenize(self, text, add_bos):
        return [0] * max(1, len(text) // 4)

    def reset(self):
        self.step, self.evaluated, self.decoding = 0, 0, False

    def eval_tokens(self, ids):
        self.evaluated += len(ids)
        self.step += self.decoding  # after the first logits() call, each eval is a fed-back token

    def eval_embeds(self, e):
        self.evaluated += len(e)

    def logits(self):
        self.decoding = True
        tok = self.eog_at if self.step == len(self.pieces) else self.step + 1
        out = np.zeros(100)
        out[tok] = 1
        return out

    def is_eog(self, t):
        return t == self.eog_at

    def detokenize(self, ids):
        return "".join(self.pieces[i - 1] for i in ids)


def _run(pieces, stops, max_tokens=20, eog=99):
    from edge_vlm.runtime.generate import GenerationStats, generate

    stats = GenerationStats()
    out = list(generate(ScriptedLLM(pieces, eog), PromptSpec(template="<ImageHere> {prompt}", stop=stops), "q",
                        np.zeros((2, 4), np.float32), SamplingConfig(max_tokens=max_tokens), stats))
    return out, stats


def test_stop_string_spanning_tokens_is_cut():
    out, stats = _run(["The ", "answer", " is red", "#", "#", "# and more"], ["###"])
    assert "".join(out) == "The answer is red" and stats.stop_reason == "stop_string"


def test_held_back_text_is_released_at_eos_and_at_max_tokens():
    out, stats = _run(["red", "#"], ["###"])
    assert "".join(out) == "red#" and stats.stop_reason == "eos"
    out, stats = _run(["red", "#", "#", "x"], ["###"], max_tokens=3)
    assert "".join(out) == "red##" and stats.stop_reason == "max_tokens"


def test_first_of_several_stops_wins():
    out, _ = _run(["a", "</s>", "b", "###"], ["###", "</s>"])
    assert "".join(out) == "a"


def test_embedding_width_and_context_are_checked_before_running():
    from edge_vlm.errors import ContextOverflow, EmbeddingSizeMismatch
    from edge_vlm.runtime.generate import generate

    llm = ScriptedLLM(["x"])
    with pytest.raises(EmbeddingSizeMismatch):
        list(generate(llm, PromptSpec(template="<ImageHere>{prompt}"), "q", np.zeros((2, 5), np.float32), SamplingConfig()))
    with pytest.raises(ContextOverflow):
        list(generate(llm, PromptSpec(template="<ImageHere>{prompt}"), "q", np.zeros((2, 4), np.float32), SamplingConfig(max_tokens=80)))
    assert llm.evaluated == 0


def test_requant_note_only_when_a_second_rounding_happens():
    from edge_vlm.export.run import requant_note

    assert "--quant Q4_1" in requant_note("Q4_1", "Q4_K_M")
    assert requant_note("Q4_1", "Q4_1") is None and requant_note("Q4_1", "Q8_0") is None
    assert requant_note(None, "Q4_K_M") is None and requant_note("F32", "Q4_0") is None


def test_grey_and_16bit_images_preprocess_like_their_8bit_rgb_versions():
    from PIL import Image

    from edge_vlm.preprocess import preprocess

    g8 = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    args = (16, [0.5] * 3, [0.5] * 3)
    want = preprocess(Image.fromarray(g8).convert("RGB"), *args)
    np.testing.assert_allclose(preprocess(Image.fromarray(g8, "L"), *args), want)
    g16 = Image.fromarray(g8.astype(np.uint16) * 257)  # mode I;16, same picture at 16 bits
    assert g16.mode.startswith("I;16")
    np.testing.assert_allclose(preprocess(g16, *args), want, atol=1e-6)
    np.testing.assert_allclose(preprocess(Image.fromarray(g8.astype(np.float32) / 255, "F"), *args), want, atol=1e-6)


def test_streamed_text_with_space_clean_up_equals_the_final_text():
    """Phi-2's tokenizer config cleans up spaces (" 's" -> "'s"): what streams must add up to the final
    text even though the clean-up rewrites characters already decoded."""
    from edge_vlm.manifest import PromptSpec
    from edge_vlm.runtime.generate import generate
    from edge_vlm.runtime.sampling import SamplingConfig
    from edge_vlm.runtime.tokenizer import clean_up_spaces

    class CleaningLLM(ScriptedLLM):
        clean_up_spaces = True

        def detokenize(self, ids):
            return clean_up_spaces(super().detokenize(ids))

    pieces = ["John", " '", " s", " car", " is", " n", "'t", " red", " ."]
    out = list(generate(CleaningLLM(pieces), PromptSpec(template="<ImageHere> {prompt}"), "q",
                        np.zeros((2, 4), np.float32), SamplingConfig(max_tokens=len(pieces))))
    assert "".join(out) == clean_up_spaces("".join(pieces)) == "John's car isn't red."
