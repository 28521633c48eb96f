import numpy as np
import pytest

from edge_vlm.data import normalize_answer
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
        with pytest.raises(ValueError):
            SamplingConfig(**kw)


def test_prompt_render_fills_prompt_literally():
    p = PromptSpec(template="A <ImageHere> B {prompt} C")
    assert p.render("x {y}") == ("A ", " B x {y} C")


def test_normalize_answer():
    assert normalize_answer(" Red.\n") == "red" and normalize_answer("") == ""
