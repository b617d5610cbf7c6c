from __future__ import annotations

import json

import pytest

from scgpt_runtime.errors import InputError
from scgpt_runtime.vocab import Vocab


def test_from_genes_puts_specials_last_in_official_order():
    v = Vocab.from_genes(["B", "A", "B"])
    assert v.names == ["B", "A", "<pad>", "<cls>", "<eoc>"]
    assert (v.pad_id, v.cls_id) == (2, 3)


def test_official_json_round_trip(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 2, "A": 0, "B": 1, "<cls>": 3}))
    v = Vocab.from_json(tmp_path / "vocab.json")
    assert v.names == ["A", "B", "<pad>", "<cls>"]
    v.to_json(tmp_path / "out.json")
    assert Vocab.from_json(tmp_path / "out.json").names == v.names


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"A": 0, "<pad>": 2, "<cls>": 3}', "contiguous"),
        ("[1, 2]", "contiguous"),
        ("{not json", "not a readable vocab.json"),
        ('{"A": 0, "B": 1}', "lacks the special tokens"),
    ],
)
def test_bad_vocab_json(tmp_path, text, message):
    (tmp_path / "vocab.json").write_text(text)
    with pytest.raises(InputError, match=message):
        Vocab.from_json(tmp_path / "vocab.json")
