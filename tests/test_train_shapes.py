"""The training-shape generator: reproducible, every colour name its own region, answers true to the drawing."""
import colorsys
import hashlib

import numpy as np
import pytest

from edge_vlm.data import load_questions
from edge_vlm.train_shapes import (COLOUR_REGIONS, COLOURS, SHAPES, TrainShapesConfig, augment, draw, questions,
                                   sample_colour, write)


def _digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def test_same_seed_same_files_and_easy_vqa_format(tmp_path):
    a = write(tmp_path / "a", TrainShapesConfig(images=10, seed=3))
    b = write(tmp_path / "b", TrainShapesConfig(images=10, seed=3))
    c = write(tmp_path / "c", TrainShapesConfig(images=10, seed=4))
    assert _digest(a) == _digest(b) != _digest(c)
    qs = load_questions(str(a), split="", limit=None)
    assert len(qs) == 40 and {q.answer for q in qs} <= set(SHAPES) | set(COLOURS) | {"yes", "no"}


def _hsv(rgb):
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    return h * 360, s, v


@pytest.mark.parametrize("name", COLOURS)
def test_every_sampled_colour_is_nearer_its_own_region_than_any_other(name):
    """No two names share a colour: a sample of one name falls outside every other name's region."""
    rng = np.random.default_rng(0)

    def inside(rgb, region):
        hue, sat, val = region
        h, s, v = _hsv(rgb)
        slack = 0.02  # rounding to 8 bits moves value by 1/255, and saturation by ~1/(255 v)
        s_slack = slack + 2 / (255 * max(v, 1e-3))
        if not (sat[0] - s_slack <= s <= sat[1] + s_slack and val[0] - slack <= v <= val[1] + slack):
            return False
        return hue is None or any(hue[0] - 2 <= x <= hue[1] + 2 for x in (h, h - 360))

    for _ in range(300):
        rgb = sample_colour(rng, name)
        assert inside(rgb, COLOUR_REGIONS[name]), (name, rgb)
        others = [o for o in COLOURS if o != name and inside(rgb, COLOUR_REGIONS[o])]
        assert not others, (name, rgb, others)


def test_questions_have_one_right_answer_for_several_shapes():
    rng = np.random.default_rng(1)
    objects = [("circle", "red"), ("triangle", "blue")]
    for q, a in questions(rng, objects, 400):
        assert q not in ("what shape is in the image?", "what color is the shape?")  # ambiguous with two
        if q.startswith("what color is the "):
            assert a == dict(objects)[q.removeprefix("what color is the ").rstrip("?")]
        if q in ("is there a triangle?", "is there a red shape?"):
            assert a == "yes"
        if q in ("is there a rectangle?", "is there a green shape?", "is there not a circle?"):
            assert a == "no"


def test_drawings_hold_what_their_labels_say():
    """The named colour covers a visible part of the image, and several shapes are distinct."""
    rng = np.random.default_rng(2)
    cfg = TrainShapesConfig(multi=0.5)
    sizes = set()
    for _ in range(60):
        im, objects = draw(rng, cfg)
        sizes.add(im.size[0])
        assert im.mode == "RGB" and im.size[0] == im.size[1]
        assert len({s for s, _ in objects}) == len(objects) == len({c for _, c in objects})
    assert len(sizes) > 3


def test_augment_keeps_a_square_rgb_image(tmp_path):
    from PIL import Image

    from edge_vlm.data import dataset_dir

    src = Image.open(dataset_dir("easy-vqa", "train") / "images" / "0.png").convert("RGB")
    rng = np.random.default_rng(0)
    outs = [augment(rng, src) for _ in range(8)]
    assert all(o.mode == "RGB" and o.size[0] == o.size[1] for o in outs)
    assert len({o.tobytes() for o in outs}) == 8


def test_cli_writes_a_folder_eval_reads(tmp_path, capsys):
    from edge_vlm.train_shapes import main

    main([str(tmp_path / "s"), "--images", "3", "--seed", "9"])
    assert "3 images, 12 questions" in capsys.readouterr().out
    assert len(load_questions(str(tmp_path / "s"), split="")) == 12
