"""A torch-free tokenizer for backends whose model file carries none (onnx): `tokenizer.json`
read by the `tokenizers` library, with the BOS and end-of-generation ids from the manifest."""
from __future__ import annotations

from pathlib import Path

from edge_vlm.errors import BundleError


# transformers' `clean_up_tokenization_spaces` (set in some tokenizer configs, e.g. old-format Phi-2's):
# decoded text loses the space before these, in this order (transformers 4.36's
# `clean_up_tokenization`, which TinyGPT-V pins and whose output users compare with). transformers 5
# ignores the flag for BPE tokenizers, so edge-vlm applies it itself, on the torch side and in bundles
# alike, whenever the tokenizer's config sets it.
CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_spaces(text: str) -> str:
    for a, b in CLEANUP:
        text = text.replace(a, b)
    return text


class BundleTokenizer:
    def __init__(self, path: Path, bos_id: int | None, eog_ids, clean_up_spaces: bool = False):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
            raise BundleError(f"{path} is not a readable tokenizer.json ({e}): export the bundle again") from e
        self.bos_id = bos_id
        self.eog = frozenset(int(i) for i in eog_ids)
        self.clean_up_spaces = clean_up_spaces

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] + ids) if add_bos and self.bos_id is not None else ids

    def is_eog(self, token: int) -> bool:
        return token in self.eog

    def detokenize(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=False)
        return clean_up_spaces(text) if self.clean_up_spaces else text
