"""Several chat turns rendered through a bundle's own prompt template.

A manifest holds one turn: `template` = [system text][user role]<Img><ImageHere></Img> {prompt}[assistant
cue]. A conversation repeats the part from the user role on, once per user turn, with the earlier
answers in between, and puts the image (each family takes one) in the turn where it appears:

    minigpt4 / tinygpt-v   SYSTEM###Human: <Img>..</Img> q1###Assistant: a1###Human: q2###Assistant:
    llama-2 [INST] styles  SYSTEM<s>[INST] <Img>..</Img> q1 [/INST] a1<s>[INST] q2 [/INST]
    built-in (ChatML)      <|im_start|>user\\n<Img>..</Img> q1<|im_end|>\\n<|im_start|>assistant\\na1<|im_end|>\\n...

(upstream's `Conversation.get_prompt` with SeparatorStyle.SINGLE renders exactly this). Where the
template's user role is none of CHAT_FORMATS, only single-turn conversations are accepted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from edge_vlm.errors import BadInput
from edge_vlm.manifest import PromptSpec

MAX_IMAGES = 1  # every family splices one image (upstream's Chat takes one upload per conversation)


@dataclass(frozen=True)
class ChatFormat:
    user_role: str  # where a user turn starts in the template
    answer_end: str  # what follows an assistant answer before the next user turn
    system: str  # how a client's system message replaces the text before the first turn ({} = the message)


# first match wins: "<s>[INST] " before "[INST] "
CHAT_FORMATS = (
    ChatFormat("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>system\n{}<|im_end|>\n"),
    ChatFormat("###Human: ", "", "{}"),
    ChatFormat("<s>[INST] ", "", "{}"),
    ChatFormat("[INST] ", " ", "{}"),
)


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    text: str
    images: tuple = ()  # decoded images (any object the vision model takes), user messages only


@dataclass(frozen=True)
class Rendered:
    before: str  # text before the image embeddings (all of it when there is no image)
    after: str
    image: object | None  # the one image, or None for a text-only conversation


def _split_template(prompt: PromptSpec) -> tuple[ChatFormat | None, str, str]:
    """(format, head, turn): the text before the first user turn and one user turn, image included."""
    at = prompt.template.index(prompt.image_marker)
    for fmt in CHAT_FORMATS:
        k = prompt.template.rfind(fmt.user_role, 0, at)
        if k != -1:
            return fmt, prompt.template[:k], prompt.template[k:]
    return None, "", prompt.template


def _without_image(turn: str, marker: str) -> str:
    """The turn for a message with no image: the marker, its <Img></Img> wrapping and one space go."""
    return re.sub(r"(?:<Img>)?" + re.escape(marker) + r"(?:</Img>)? ?", "", turn, count=1)


def _merge(messages: list[Message]) -> list[Message]:
    """As upstream's Chat: text sent after an image-only user message joins that message (one space
    between); any other user message is a turn of its own. Consecutive assistant texts join by a newline."""
    out: list[Message] = []
    for m in messages:
        prev = out[-1] if out else None
        if prev and prev.role == m.role == "user" and prev.images and not prev.text:
            out[-1] = Message("user", m.text, prev.images + m.images)
        elif prev and prev.role == m.role == "assistant":
            out[-1] = Message("assistant", "\n".join(t for t in (prev.text, m.text) if t))
        else:
            out.append(m)
    return out


def render(prompt: PromptSpec, messages: list[Message]) -> Rendered:
    """The conversation as [before][image][after]; BadInput says what is wrong with it."""
    system = "\n".join(m.text for m in messages if m.role == "system" and m.text)
    turns = _merge([m for m in messages if m.role != "system"])
    if not turns or turns[-1].role != "user":
        raise BadInput("the last message must be the user's (the model answers it)")
    images = [img for m in turns for img in m.images]
    if len(images) > MAX_IMAGES:
        raise BadInput(f"this model takes {MAX_IMAGES} image per conversation and the messages hold {len(images)}: "
                       "start a new conversation for another image")
    fmt, head, turn = _split_template(prompt)
    n_user = sum(m.role == "user" for m in turns)
    if fmt is None and (n_user > 1 or system):
        raise BadInput("this bundle's prompt template has no known multi-turn form: send one user message "
                       "(and no system message)")
    if turns[0].role != "user":
        raise BadInput("the conversation must start with a user message (after any system message)")
    pieces = [fmt.system.format(system) if system else head]
    split = None  # index in `pieces` where the image embeddings go
    for m in turns:
        if m.role == "assistant":
            pieces.append(m.text + fmt.answer_end)
        elif m.images:  # the marker is split off before {prompt} is filled: a prompt cannot move the image
            b, _, a = turn.partition(prompt.image_marker)
            pieces.append(b.replace("{prompt}", m.text))
            split = len(pieces)
            pieces.append(a.replace("{prompt}", m.text))
        else:
            pieces.append(_without_image(turn, prompt.image_marker).replace("{prompt}", m.text))
    if split is None:
        return Rendered("".join(pieces), "", None)
    return Rendered("".join(pieces[:split]), "".join(pieces[split:]), images[0])
