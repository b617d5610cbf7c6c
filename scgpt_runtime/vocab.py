"""The vocabulary: token names and ids, with the special tokens scGPT uses.

Tokens belong to a namespace: "gene" for genes and the special tokens; a multi-omics model adds
others ("protein", "peak"), so that a gene CD4 and a protein CD4 are two tokens. Names are
unique within a namespace; lookups are exact and case-sensitive, as in the official vocab.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import InputError

PAD, CLS, EOC = "<pad>", "<cls>", "<eoc>"
SPECIALS = (PAD, CLS, EOC)
GENE = "gene"  # the namespace of genes and of the special tokens


class Vocab:
    """Token names in id order, each in a namespace (all "gene" unless given)."""

    def __init__(self, names: Iterable[str], namespaces: Iterable[str] | None = None):
        self.names = [str(n) for n in names]
        self.namespaces = [GENE] * len(self.names) if namespaces is None else list(namespaces)
        if len(self.namespaces) != len(self.names):
            raise ValueError("one namespace per vocabulary token")
        self._ids: dict[str, dict[str, int]] = {}
        for i, (ns, name) in enumerate(zip(self.namespaces, self.names, strict=True)):
            if self._ids.setdefault(ns, {}).setdefault(name, i) != i:
                raise ValueError(f"vocabulary names must be unique ({ns} {name!r} repeats)")
        self.index = self._ids.get(GENE, {})  # gene name -> id: the official vocab.json
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
        """Write the official `vocab.json` layout, which has genes only."""
        if self.namespaces.count(GENE) != len(self.names):
            raise ValueError("vocab.json holds genes only; this vocabulary has other namespaces")
        Path(path).write_text(json.dumps(self.index, indent=0))

    @property
    def namespace_names(self) -> list[str]:
        """The namespaces present, in order of first appearance."""
        return list(self._ids)

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

    def lookup(self, names: Iterable[str], namespace: str = GENE) -> np.ndarray:
        """Ids of `names` in `namespace`, -1 where a name is not there. Special tokens never
        match."""
        get = self._ids.get(namespace, {}).get
        ids = np.fromiter((get(str(n), -1) for n in names), dtype=np.int64)
        ids[np.isin(ids, [self.index[s] for s in SPECIALS if s in self.index])] = -1
        return ids
