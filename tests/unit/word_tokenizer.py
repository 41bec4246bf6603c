"""A tokenizer of whole words, enough of one for triple building and word-piece reading."""


class WordTokenizer:
    """Token i is ``words[i]``, written after a space when it is alphabetic (as byte-level BPE writes a word start)."""

    def __init__(self, words):
        self.words = list(words)

    def __len__(self):
        return len(self.words)

    def decode(self, ids, **_):
        return "".join(" " + self.words[i] if self.words[i].isalpha() else self.words[i] for i in ids)

    def batch_decode(self, batch, **_):
        return [self.decode(ids) for ids in batch]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.words.index(w) for w in text.split() if w in self.words]}
