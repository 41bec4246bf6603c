"""Which vocabulary tokens are words, and which begin one, for any tokenizer.

A token's text alone (``decode([id])``) does not say whether it begins a word: byte-level BPE
(GPT-2, Llama-3, Qwen2, SmolLM2) writes a word start as a leading space, SentencePiece (Llama-2,
Gemma) as a ``▁`` that ``decode`` of a lone token drops. Decoding the token after a fixed anchor
token shows the space either way: ``decode([anchor, id])`` is the anchor's text followed by
``" word"`` for a token that begins a word and ``"word"`` for one that continues it.
"""

from __future__ import annotations

from dataclasses import dataclass

_ANCHORS = ("x", "a", "z", "the", "0")


@dataclass(frozen=True)
class WordPieces:
    """The alphabetic tokens of one tokenizer."""

    words: dict[int, str]
    """Token id -> its letters, for every token that is alone one alphabetic word or word piece."""
    starts: frozenset[int]
    """The ids among ``words`` that begin a word mid-sentence (a space before them)."""

    def spaced(self, ids, *, min_letters: int = 1) -> list[int]:
        """The ids of ``ids`` that begin a word of at least ``min_letters`` letters (they fit mid-sentence)."""
        return [int(i) for i in ids if int(i) in self.starts and len(self.words[int(i)]) >= min_letters]


def _anchor(tokenizer) -> tuple[list[int], str]:
    """A short token sequence whose text is stable when a token is decoded after it."""
    for text in _ANCHORS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids)
        if ids and decoded.strip() == text:
            return list(ids), decoded
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} cannot encode and decode any of "
                     f"{list(_ANCHORS)} back to itself; irmprobe needs a tokenizer that round-trips plain text")


def word_pieces(tokenizer) -> WordPieces:
    """Every alphabetic token of ``tokenizer`` and whether it begins a word; computed once per tokenizer object.

    Raises:
        ValueError: the tokenizer has no alphabetic token at all (a character or byte tokenizer with
            no word pieces, or one whose decoding irmprobe cannot read): no token can carry an RM value.
    """
    cached = getattr(tokenizer, "_irmprobe_word_pieces", None)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    anchor, anchor_text = _anchor(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([anchor + [i] for i in ids], clean_up_tokenization_spaces=False)
    words, starts = {}, set()
    for token_id, text in zip(ids, texts):
        if not text.startswith(anchor_text):
            continue
        piece = text[len(anchor_text):]
        spaced = piece.startswith(" ")
        letters = piece[1:] if spaced else piece
        if letters and letters.isalpha():
            words[token_id] = letters
            if spaced:
                starts.add(token_id)
    if not words:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} ({len(tokenizer)} tokens) has no "
                         "token that decodes to an alphabetic word or word piece, so no token can carry an RM "
                         "value; use the tokenizer the model was trained with (a byte-level BPE or SentencePiece "
                         "tokenizer with word pieces)")
    out = WordPieces(words, frozenset(starts))
    try:
        tokenizer._irmprobe_word_pieces = (len(tokenizer), out)
    except AttributeError:  # a tokenizer that refuses new attributes is decoded again next time
        pass
    return out


def word_tokens(tokenizer) -> dict[int, str]:
    """Vocabulary tokens that are, alone, one alphabetic word or word piece (a leading space allowed).

    Raises:
        ValueError: the tokenizer yields no such token (see :func:`word_pieces`).
    """
    return dict(word_pieces(tokenizer).words)


def word_ids(tokenizer, word: str) -> list[int]:
    """The tokens of ``word`` written mid-sentence (after a space), whatever the tokenizer's word-start mark."""
    anchor, anchor_text = _anchor(tokenizer)
    ids = tokenizer(anchor_text + " " + word, add_special_tokens=False)["input_ids"]
    if ids[:len(anchor)] == anchor:
        return list(ids[len(anchor):])
    return list(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
