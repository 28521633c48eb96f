"""Several chat turns through each family's template, as upstream's Conversation.get_prompt renders them."""
import pytest

from edge_vlm.errors import BadInput
from edge_vlm.families.minigpt import FAMILIES, SYSTEM
from edge_vlm.manifest import PromptSpec
from edge_vlm.runtime.conversation import Message, render

IMG = "<ImageHere>"
CHATML = PromptSpec(template="<|im_start|>user\n<Img><ImageHere></Img> {prompt}<|im_end|>\n<|im_start|>assistant\n",
                    stop=["<|im_end|>"])


def test_minigpt4_two_turns_render_as_upstream_conversation():
    """CONV_VISION_Vicuna0: system + sep, then role + message + sep per turn, the open assistant role last."""
    msgs = [Message("user", "what is it?", ("image",)), Message("assistant", "a cat"), Message("user", "its colour?")]
    r = render(FAMILIES["minigpt4"].prompt, msgs)
    upstream = SYSTEM + "###Human: <Img>" + IMG + "</Img> what is it?###Assistant: a cat###Human: its colour?###Assistant: "
    assert r.before + IMG + r.after == upstream and r.image == "image"
    assert r.before.endswith("<Img>") and r.after.startswith("</Img> what is it?")


def test_the_image_goes_in_the_turn_where_it_appears():
    msgs = [Message("user", "hello"), Message("assistant", "hi"), Message("user", "and this?", ("image",))]
    r = render(CHATML, msgs)
    assert r.before == ("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
                        "<|im_start|>user\n<Img>")
    assert r.after == "</Img> and this?<|im_end|>\n<|im_start|>assistant\n"


def test_text_only_and_system_messages():
    r = render(CHATML, [Message("system", "be brief"), Message("user", "hi")])
    assert r.image is None and r.after == ""
    assert r.before == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    r = render(FAMILIES["minigpt4"].prompt, [Message("system", "You are terse."), Message("user", "hi")])
    assert r.before == "You are terse.###Human: hi###Assistant: "


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_renders_two_turns_with_one_image(family):
    prompt = FAMILIES[family].prompt
    msgs = [Message("user", "q1", ("image",)), Message("assistant", "a1"), Message("user", "q2")]
    r = render(prompt, msgs)
    one = render(prompt, msgs[:1])
    assert (one.before, one.after) == tuple(prompt.render("q1"))  # one turn is exactly the manifest's template
    assert r.before == one.before and r.after.startswith(one.after + "a1") and r.after.count("q2") == 1


def test_a_user_text_holding_the_marker_cannot_move_the_image():
    r = render(CHATML, [Message("user", f"look {IMG} here", ("image",))])
    assert r.before == "<|im_start|>user\n<Img>" and r.after.startswith(f"</Img> look {IMG} here")


@pytest.mark.parametrize("msgs,needle", [
    ([Message("user", "a", ("i1",)), Message("assistant", "b"), Message("user", "c", ("i2",))], "1 image"),
    ([Message("user", "a"), Message("assistant", "b")], "last message"),
    ([Message("assistant", "b"), Message("user", "a")], "start with a user"),
    ([Message("system", "s")], "last message"),
])
def test_bad_conversations_say_what_is_wrong(msgs, needle):
    with pytest.raises(BadInput, match=needle):
        render(CHATML, msgs)


def test_an_unknown_template_takes_one_turn_only():
    custom = PromptSpec(template="Q: <ImageHere> {prompt}\nA:")
    assert render(custom, [Message("user", "hi", ("i",))]).before == "Q: "
    with pytest.raises(BadInput, match="one user message"):
        render(custom, [Message("user", "a"), Message("assistant", "b"), Message("user", "c")])


def test_consecutive_user_messages_as_upstream_chat_takes_them():
    """An image sent alone, then the question: one turn ("<Img>..</Img> question"); two texts in a row:
    two turns, as upstream's Chat.ask appends a new Human message."""
    r = render(FAMILIES["minigpt4"].prompt, [Message("user", "", ("image",)), Message("user", "what is it?")])
    assert (r.before + IMG + r.after).endswith("###Human: <Img><ImageHere></Img> what is it?###Assistant: ")
    r = render(CHATML, [Message("user", "one"), Message("user", "two")])
    assert r.before.count("<|im_start|>user\n") == 2
