"""The ``search`` tool: BM25 over a small local corpus (``bm25s``), no network.

The shipped corpus (``lmpo/tools/data/corpus.jsonl``, one ``{"id", "title", "text"}`` passage per line) is 32 short
passages about an invented island, Teskar, written for lmpo: no model has seen these facts, so a search-QA
environment over them measures retrieval, not memory. ``corpus_qa.jsonl`` holds one question per passage
(``{"question", "answer", "passage"}``, :func:`shipped_questions`) for such an environment. :class:`Corpus` indexes
any list of passages;
``Corpus.shipped()`` is built once and cached. Tokens are lower-cased words and numbers with a plural ``s`` stripped
and English stop words dropped.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from typing import Callable

from lmpo.errors import ConfigError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SHIPPED = os.path.join(DATA, "corpus.jsonl")
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were what when where which "
    "who whom why how with did does do".split()
)


def tokenize(text: str) -> list[str]:
    """Lower-cased words and numbers, stop words dropped, a plural ``s`` stripped (``puffins`` -> ``puffin``)."""
    words = _WORD.findall(text.lower().replace(",", ""))
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words if w not in _STOP]


def _bm25s():
    try:
        import bm25s
    except ImportError:
        raise ConfigError("The search tool needs the `bm25s` package: pip install 'lmpo[agents]'.") from None
    return bm25s


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


class Corpus:
    """Passages with a BM25 index; :meth:`search` returns the best ``k`` passages for a query."""

    def __init__(self, passages: list[Passage]):
        if not passages:
            raise ConfigError("A search corpus needs at least one passage.")
        self.passages = passages
        bm25s = _bm25s()
        self._vocab: dict[str, int] = {}
        ids = [self._ids(f"{p.title} {p.text}", grow=True) for p in passages]
        self._index = bm25s.BM25()
        self._index.index(bm25s.tokenization.Tokenized(ids=ids, vocab=dict(self._vocab)), show_progress=False)

    def _ids(self, text: str, grow: bool) -> list[int]:
        out = []
        for tok in tokenize(text):
            if tok not in self._vocab and grow:
                self._vocab[tok] = len(self._vocab)
            if tok in self._vocab:
                out.append(self._vocab[tok])
        return out

    @classmethod
    def from_jsonl(cls, path: str) -> Corpus:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return cls([Passage(str(r["id"]), r["title"], r["text"]) for r in rows])

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def shipped() -> Corpus:
        """The corpus that ships with lmpo (indexed once per process)."""
        return Corpus.from_jsonl(SHIPPED)

    def search(self, query: str, k: int = 3) -> list[tuple[Passage, float]]:
        """The top ``k`` passages with their BM25 scores, best first; passages sharing no word are left out."""
        ids = self._ids(query, grow=False)
        if not ids:
            return []
        k = max(1, min(k, len(self.passages)))
        docs, scores = self._index.retrieve([ids], k=k, show_progress=False, n_threads=1)
        return [(self.passages[int(d)], float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]


def shipped_questions() -> list[dict]:
    """The shipped questions: ``{"question", "answer", "passage"}`` with the id of the passage that answers it."""
    with open(os.path.join(DATA, "corpus_qa.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_search_tool(corpus: Corpus | None = None, default_k: int = 3) -> Callable[..., str]:
    """A ``search`` tool over ``corpus`` (the shipped one by default)."""

    def search(query: str, k: int = default_k) -> str:
        """Search the encyclopedia and return the most relevant passages.

        Args:
            query: What to look for, in a few keywords, e.g. "height of Mount Karsk".
            k: How many passages to return (1 to 5).
        """
        hits = (corpus or Corpus.shipped()).search(query, max(1, min(int(k), 5)))
        if not hits:
            return "No passage matches the query."
        return "\n\n".join(f"[{i + 1}] {p.title}: {p.text}" for i, (p, _) in enumerate(hits))

    return search


search = make_search_tool()
