"""The gene vocabulary: token names and ids, with the special tokens scGPT uses."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import InputError

PAD, CLS, EOC = "<pad>", "<cls>", "<eoc>"
SPECIALS = (PAD, CLS, EOC)


class Vocab:
    """Token names in id order; lookups are exact and case-sensitive, as in the official vocab."""

    def __init__(self, names: Iterable[str]):
        self.names = [str(n) for n in names]
        self.index = {n: i for i, n in enumerate(self.names)}
        if len(self.index) != len(self.names):
            raise ValueError("vocabulary names must be unique")
        missing = [s for s in (PAD, CLS) if s not in self.index]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}")

    @classmethod
    def from_genes(cls, genes: Iterable[str]) -> Vocab:
        """The genes in the given order, then <pad>, <cls>, <eoc> (the official order)."""
        genes = [g for g in dict.fromkeys(str(g) for g in genes) if g not in SPECIALS]
        return cls([*genes, *SPECIALS])

    @classmethod
    def from_json(cls, path: str | Path) -> Vocab:
        """Read an official `vocab.json` ({name: id}, ids contiguous from 0)."""
        path = Path(path)
        try:
            mapping = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: not a readable vocab.json ({e})") from e
        if not isinstance(mapping, dict) or sorted(mapping.values()) != list(range(len(mapping))):
            raise InputError(f"{path}: vocab ids must be the contiguous integers 0..N-1")
        names = sorted(mapping, key=mapping.__getitem__)
        try:
            return cls(names)
        except ValueError as e:
            raise InputError(f"{path}: {e}") from e

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.index, indent=0))

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __getitem__(self, name: str) -> int:
        return self.index[name]

    @property
    def pad_id(self) -> int:
        return self.index[PAD]

    @property
    def cls_id(self) -> int:
        return self.index[CLS]

    def lookup(self, names: Iterable[str]) -> np.ndarray:
        """Ids of `names`, -1 where a name is not in the vocabulary. Special tokens never match."""
        get = self.index.get
        ids = np.fromiter((get(str(n), -1) for n in names), dtype=np.int64)
        ids[np.isin(ids, [self.index[s] for s in SPECIALS if s in self.index])] = -1
        return ids
