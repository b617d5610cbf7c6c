"""Export of a whole-human-sized official checkpoint (random weights), imported like a release.

The checkpoint is written in the official layout of scGPT_human (flash-attention Wqkv names,
every tensor of the reference table, vocabulary of 60,697 tokens), imported with
`import_scgpt`, and exported fp32 at the full 1200 tokens, validated on real cells; its
embeddings on other real cells then match PyTorch. About a minute on two CPU cores.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from scgpt_export import export_run
from scgpt_runtime.bundle import load_bundle
from scgpt_runtime.genes import match_genes
from scgpt_runtime.io import open_counts
from scgpt_runtime.session import open_session
from scgpt_runtime.tokens import tokenize
from scgpt_runtime.vocab import Vocab
from scgpt_train.checkpoint import load_run
from scgpt_train.official import import_scgpt

D, D_HID, N_LAYER, N_GENES = 512, 512, 12, 60_694
ARGS = {
    "embsize": D,
    "nheads": 8,
    "d_hid": D_HID,
    "nlayers": N_LAYER,
    "n_layers_cls": 3,
    "dropout": 0.2,
    "pad_token": "<pad>",
    "pad_value": -2,
    "mask_value": -1,
    "n_bins": 51,
    "max_seq_len": 1200,
    "input_emb_style": "continuous",
    "input_style": "binned",
}


def official_state(vocab_size: int) -> dict[str, torch.Tensor]:
    """Every tensor of the released checkpoint, by its official name and shape."""
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    def norm(name: str) -> dict[str, torch.Tensor]:
        return {
            f"{name}.weight": 1 + 0.1 * torch.randn(D, generator=g),
            f"{name}.bias": 0.1 * torch.randn(D, generator=g),
        }

    def linear(name: str, d_out: int, d_in: int) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": w(d_out, d_in), f"{name}.bias": 0.02 * torch.randn(d_out)}

    sd = {"encoder.embedding.weight": torch.rand(vocab_size, D, generator=g) * 0.2 - 0.1}
    sd |= norm("encoder.enc_norm") | linear("value_encoder.linear1", D, 1)
    sd |= linear("value_encoder.linear2", D, D) | norm("value_encoder.norm")
    for i in range(N_LAYER):
        layer = f"transformer_encoder.layers.{i}"
        sd |= linear(f"{layer}.self_attn.Wqkv", 3 * D, D)
        sd |= linear(f"{layer}.self_attn.out_proj", D, D)
        sd |= linear(f"{layer}.linear1", D_HID, D) | linear(f"{layer}.linear2", D, D_HID)
        sd |= norm(f"{layer}.norm1") | norm(f"{layer}.norm2")
    sd["flag_encoder.weight"] = w(2, D)
    sd |= linear("decoder.fc.0", D, D) | linear("decoder.fc.2", D, D) | linear("decoder.fc.4", 1, D)
    sd |= linear("mvc_decoder.gene2query", D, D)
    sd["mvc_decoder.W.weight"] = w(D, D)
    return sd


def test_whole_human_export_matches_pytorch(tmp_path, shared_data):
    kang = shared_data / "labelled/kang2018_pbmc_counts.h5ad"
    with open_counts(kang) as counts:
        genes = [str(g) for g in counts.var["index"]]
    filler = [f"GENE{i}" for i in range(N_GENES - len(genes))]
    vocab = Vocab.from_genes([*genes, *filler])
    assert len(vocab) == 60_697

    folder = tmp_path / "scGPT_human"
    folder.mkdir()
    torch.save(official_state(len(vocab)), folder / "best_model.pt")
    (folder / "args.json").write_text(json.dumps(ARGS))
    (folder / "vocab.json").write_text(json.dumps(vocab.index))
    report = import_scgpt(folder, tmp_path / "run")
    assert not report.dropped
    assert report.missing == []
    (folder / "best_model.pt").unlink()

    summary = export_run(
        tmp_path / "run",
        tmp_path / "bundle",
        validation_data=kang,
        validation_cells=4,
        max_lens=[1200],
        precisions=("fp32",),
    )  # the default ladder and precisions are tested on the small model (test_export.py)
    (fp32,) = summary["variants"]
    assert fp32["max_seq_len"] == 1200
    assert fp32["errors"]["cell_emb_max_abs"] < 1e-4

    # Cells the export did not validate on, served by onnxruntime from the bundle.
    b = load_bundle(tmp_path / "bundle")
    assert b.tokens.max_seq_len == 1200
    assert b.tokens.cls_value == -2.0  # the official zero-shot pipeline
    with open_counts(kang) as counts:
        match = match_genes(counts.var, b.vocab)
        block = next(counts.iter_blocks(block_size=2, start=10, stop=12))
    tokens = tokenize(block, match.column_ids, b.tokens, b.vocab.cls_id, b.vocab.pad_id)
    got = open_session(b.variant("fp32").path, "cpu").run(["cell_emb"], tokens.inputs)[0]
    model, _ = load_run(tmp_path / "run")
    trimmed = tokens.trim()
    with torch.no_grad():
        expected = model.cell_embedding(
            *(torch.from_numpy(a) for a in trimmed.inputs.values())
        ).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
