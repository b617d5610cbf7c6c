"""Import of official scGPT checkpoints (minGPT-style parity test).

The checkpoint is built here in the official layout (key names and shapes of the reference,
random values, small dims), saved as a plain state dict beside args.json and vocab.json, loaded
with scgpt_train.official, and compared token for token with a forward pass written below from
the reference formulas directly on the raw tensors. That reference runs in float64 and the
model in float32: 1e-5 is ~100x the float32 rounding accumulated over two layers of width 32,
and any wrong weight, layout or mask moves outputs by ~0.1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from scgpt_runtime.errors import InputError
from scgpt_runtime.vocab import Vocab
from scgpt_train.checkpoint import load_run
from scgpt_train.cli import cli
from scgpt_train.model import ScGPT
from scgpt_train.official import (
    config_from_args,
    load_official_folder,
    load_official_state,
    read_checkpoint,
    tokens_from_args,
)

D, N_HEAD, D_HID, N_LAYER, N_GENES = 32, 4, 48, 2, 50
V = N_GENES + 3
PAD, CLS = N_GENES, N_GENES + 1
ARGS = {
    "embsize": D,
    "nheads": N_HEAD,
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
    "lr": 0.0001,  # a training argument the import ignores
}


# ---------------------------------------------------------------------------- official layout


def official_state(seed: int = 0, batch_tokens: bool = False) -> dict[str, torch.Tensor]:
    """Keys and shapes of the released checkpoint (flash `Wqkv` names), random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix: str, d: int = D) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + r(d, scale=0.1), f"{prefix}.bias": r(d, scale=0.1)}

    d_in = 2 * D if batch_tokens else D
    sd = {"encoder.embedding.weight": r(V, D, scale=1.0), **norm("encoder.enc_norm")}
    sd |= {"value_encoder.linear1.weight": r(D, 1), "value_encoder.linear1.bias": r(D)}
    sd |= {
        "value_encoder.linear2.weight": r(D, D, scale=D**-0.5),
        "value_encoder.linear2.bias": r(D),
    }
    sd |= norm("value_encoder.norm")
    for i in range(N_LAYER):
        p = f"transformer_encoder.layers.{i}."
        sd[p + "self_attn.Wqkv.weight"] = r(3 * D, D, scale=D**-0.5)
        sd[p + "self_attn.Wqkv.bias"] = r(3 * D, scale=0.1)
        sd[p + "self_attn.out_proj.weight"] = r(D, D, scale=D**-0.5)
        sd[p + "self_attn.out_proj.bias"] = r(D, scale=0.1)
        sd[p + "linear1.weight"], sd[p + "linear1.bias"] = r(D_HID, D, scale=D**-0.5), r(D_HID)
        sd[p + "linear2.weight"], sd[p + "linear2.bias"] = r(D, D_HID, scale=D_HID**-0.5), r(D)
        sd |= norm(p + "norm1") | norm(p + "norm2")
    sd["flag_encoder.weight"] = r(2, D, scale=1.0)
    sd["decoder.fc.0.weight"], sd["decoder.fc.0.bias"] = r(D, d_in, scale=d_in**-0.5), r(D)
    sd["decoder.fc.2.weight"], sd["decoder.fc.2.bias"] = r(D, D, scale=D**-0.5), r(D)
    sd["decoder.fc.4.weight"], sd["decoder.fc.4.bias"] = r(1, D, scale=D**-0.5), r(1)
    sd["mvc_decoder.gene2query.weight"] = r(D, D, scale=D**-0.5)
    sd["mvc_decoder.gene2query.bias"] = r(D)
    sd["mvc_decoder.W.weight"] = r(d_in, D, scale=D**-0.5)
    return sd


def finetuned_heads(n_cls: int = 5, n_batch: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    sd = {}
    for head, n_out in (("cls_decoder", n_cls), ("grad_reverse_discriminator", n_batch)):
        for k in (0, 3):  # Linear; LayerNorm at k + 2
            sd[f"{head}._decoder.{k}.weight"], sd[f"{head}._decoder.{k}.bias"] = r(D, D), r(D)
            sd[f"{head}._decoder.{k + 2}.weight"] = 1 + r(D)
            sd[f"{head}._decoder.{k + 2}.bias"] = r(D)
        sd[f"{head}.out_layer.weight"], sd[f"{head}.out_layer.bias"] = r(n_out, D), r(n_out)
    sd["batch_encoder.embedding.weight"] = r(n_batch, D)
    sd["batch_encoder.enc_norm.weight"], sd["batch_encoder.enc_norm.bias"] = 1 + r(D), r(D)
    for k in range(n_batch):
        sd[f"dsbn.bns.{k}.running_mean"] = r(D)
        sd[f"dsbn.bns.{k}.running_var"] = 1 + r(D).abs()
        sd[f"dsbn.bns.{k}.num_batches_tracked"] = torch.tensor(100)
    for k, d_out in ((0, D), (2, D), (4, 1)):
        d_in = 2 * D if k == 0 else D
        sd[f"decoder.zero_logit.{k}.weight"], sd[f"decoder.zero_logit.{k}.bias"] = (
            r(d_out, d_in),
            r(d_out),
        )
    sd["mvc_decoder.W_zero_logit.weight"], sd["mvc_decoder.W_zero_logit.bias"] = (
        r(2 * D, D),
        r(2 * D),
    )
    return sd


def old_bn(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return sd | {
        "bn.weight": 1 + 0.1 * torch.randn(D, generator=g),
        "bn.bias": 0.1 * torch.randn(D, generator=g),
        "bn.running_mean": 0.2 * torch.randn(D, generator=g),
        "bn.running_var": 1 + torch.rand(D, generator=g),
        "bn.num_batches_tracked": torch.tensor(1000),
    }


def rename(sd: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {k.replace(old, new): v for k, v in sd.items()}


VARIANTS = {
    "flash": lambda sd: sd,
    "in_proj": lambda sd: rename(
        rename(sd, "self_attn.Wqkv.weight", "self_attn.in_proj_weight"),
        "self_attn.Wqkv.bias",
        "self_attn.in_proj_bias",
    ),
    "impl": lambda sd: rename(sd, ".self_attn.", ".self_attn._impl."),
    "module": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "old_bn": old_bn,
}


def write_folder(path: Path, sd: dict[str, torch.Tensor], n_genes: int = N_GENES) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path / "best_model.pt")
    (path / "args.json").write_text(json.dumps(ARGS))
    names = [f"G{i}" for i in range(n_genes)] + ["<pad>", "<cls>", "<eoc>"]
    (path / "vocab.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))
    return path


# ---------------------------------------------------------------------------- reference forward


def ref_norm(x, sd, name, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def ref_linear(x, sd, name):
    out = x @ sd[name + ".weight"].T
    return out + sd[name + ".bias"] if name + ".bias" in sd else out


def ref_embed(sd, gene_ids, values):
    """LN_g(Embedding[gene]) + LN_v(Linear2(ReLU(Linear1(min(value, 512))))), [+ old bn]."""
    genes = ref_norm(sd["encoder.embedding.weight"][gene_ids], sd, "encoder.enc_norm")
    v = torch.minimum(values.double(), torch.tensor(512.0))[..., None]
    v = ref_linear(
        torch.relu(ref_linear(v, sd, "value_encoder.linear1")), sd, "value_encoder.linear2"
    )
    x = genes + ref_norm(v, sd, "value_encoder.norm")
    if "bn.weight" in sd:  # BatchNorm1d(eps=6.1e-5) in eval mode over the feature dimension
        x = (x - sd["bn.running_mean"]) / torch.sqrt(sd["bn.running_var"] + 6.1e-5)
        x = x * sd["bn.weight"] + sd["bn.bias"]
    return x, genes


def ref_layers(sd, x, allowed):
    """Post-LN layers; allowed (B, Lq, Lk) bool: True where a query may attend to a key."""
    B, L, d = x.shape
    dh = d // N_HEAD

    def heads(t):
        return t.reshape(B, L, N_HEAD, dh).permute(0, 2, 1, 3)  # (B, h, L, dh)

    for i in range(N_LAYER):
        p = f"transformer_encoder.layers.{i}."
        qkv = ref_linear(x, sd, p + "self_attn.Wqkv")
        q, k, v = heads(qkv[..., :d]), heads(qkv[..., d : 2 * d]), heads(qkv[..., 2 * d :])
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = (torch.softmax(scores, dim=-1) @ v).permute(0, 2, 1, 3).reshape(B, L, d)
        x = ref_norm(x + ref_linear(attn, sd, p + "self_attn.out_proj"), sd, p + "norm1")
        ffn = ref_linear(torch.relu(ref_linear(x, sd, p + "linear1")), sd, p + "linear2")
        x = ref_norm(x + ffn, sd, p + "norm2")
    return x


def ref_decoders(sd, out, genes):
    leaky = torch.nn.functional.leaky_relu  # slope 0.01, torch's LeakyReLU default
    h = leaky(ref_linear(leaky(ref_linear(out, sd, "decoder.fc.0")), sd, "decoder.fc.2"))
    mlm = ref_linear(h, sd, "decoder.fc.4")[..., 0]
    query = torch.sigmoid(ref_linear(genes, sd, "mvc_decoder.gene2query"))
    mvc = ((query @ sd["mvc_decoder.W.weight"].T) * out[:, :1]).sum(-1)
    return mlm, mvc


def as_float64(sd):
    return {k: v.double() for k, v in sd.items()}


def make_batch():
    """Three cells, <cls> first with value -2 (official embedding pipeline), trailing pads,
    and values above 512 to exercise the clamp."""
    g = torch.Generator().manual_seed(7)
    gene_ids = torch.randint(0, N_GENES, (3, 9), generator=g)
    values = torch.randint(0, 51, (3, 9), generator=g).float()
    values[0, 3], values[1, 2] = 800.0, 512.0
    gene_ids[:, 0], values[:, 0] = CLS, -2.0
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:], pad[2, 4:] = True, True
    gene_ids[pad], values[pad] = PAD, -2.0
    return gene_ids, values, pad


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_reproduces_reference_forward(tmp_path, variant):
    raw = VARIANTS[variant](official_state())
    imported = load_official_folder(write_folder(tmp_path / variant, raw))
    model, report = imported.model, imported.report
    assert not model.training
    assert report.dropped == {}
    assert report.missing == []
    assert len(report.loaded) == len(model.state_dict()) == len(raw)
    assert model.cfg.pre_norm_bn == (variant == "old_bn")
    if variant in ("in_proj", "impl", "module"):
        assert report.renamed  # e.g. "module.encoder.embedding.weight" -> "encoder...."
        assert all(k != v for k, v in report.renamed.items())

    sd = as_float64(official_state() if variant != "old_bn" else raw)
    gene_ids, values, pad = make_batch()
    x, genes = ref_embed(sd, gene_ids, values)
    allowed = (~pad)[:, None, :].expand(-1, pad.shape[1], -1)  # keys: never a pad
    ref_out = ref_layers(sd, x, allowed)
    ref_mlm, ref_mvc = ref_decoders(sd, ref_out, genes)
    with torch.no_grad():
        out = model(gene_ids, values, pad)
        tokens = model.encode(gene_ids, values, pad)
    torch.testing.assert_close(tokens.double(), ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["cell_emb"].double(), ref_out[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["mlm_output"].double(), ref_mlm, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["mvc_output"].double(), ref_mvc, rtol=0, atol=1e-4)


def test_generative_forward_matches_reference(tmp_path):
    sd32 = official_state()
    model = load_official_folder(write_folder(tmp_path, sd32)).model
    sd = as_float64(sd32)
    gene_ids, values, pad = make_batch()
    gen = torch.tensor([[3, 4, 5], [6, 7, PAD], [8, 9, 10]])
    gen_pad = gen == PAD
    x_pcpt, _ = ref_embed(sd, gene_ids, values)
    x_gen = ref_norm(sd["encoder.embedding.weight"][gen], sd, "encoder.enc_norm")
    x_gen = x_gen + sd["flag_encoder.weight"][1]
    Lp, Lg = gene_ids.shape[1], gen.shape[1]
    allowed = torch.zeros(3, Lp + Lg, Lp + Lg, dtype=torch.bool)
    for b in range(3):
        for q in range(Lp + Lg):
            for k in range(Lp):  # everyone sees the non-pad observed tokens
                allowed[b, q, k] = not pad[b, k]
            if q >= Lp and not gen_pad[b, q - Lp]:  # a gen token also sees itself
                allowed[b, q, q] = True
    ref_out = ref_layers(sd, torch.cat([x_pcpt, x_gen], dim=1), allowed)
    with torch.no_grad():
        out = model.forward_generative(gene_ids, values, pad, gen, gen_pad)
    torch.testing.assert_close(out["pcpt_out"].double(), ref_out[:, :Lp], rtol=0, atol=1e-5)
    keep = ~gen_pad
    torch.testing.assert_close(
        out["gen_out"][keep].double(), ref_out[:, Lp:][keep], rtol=0, atol=1e-5
    )


def test_finetuned_heads_are_detected_and_loaded(tmp_path):
    raw = official_state(batch_tokens=True) | finetuned_heads(n_cls=5, n_batch=3)
    imported = load_official_folder(write_folder(tmp_path, raw))
    cfg, report = imported.model.cfg, imported.report
    assert (cfg.n_cls, cfg.n_layers_cls, cfg.n_batch) == (5, 3, 3)
    assert (cfg.n_batch_tokens, cfg.n_dsbn, cfg.n_dab, cfg.explicit_zero) == (3, 3, 3, True)
    assert report.dropped == {}
    assert report.missing == []
    # the cell-type head on the raw cell embedding, from the raw tensors
    sd = as_float64(raw)
    gene_ids, values, pad = make_batch()
    labels = torch.tensor([2, 2, 2])
    with torch.no_grad():
        out = imported.model(gene_ids, values, pad, batch_labels=labels)
    h = out["cell_emb"].double()
    for k in (0, 3):
        h = ref_norm(
            torch.relu(ref_linear(h, sd, f"cls_decoder._decoder.{k}")),
            sd,
            f"cls_decoder._decoder.{k + 2}",
        )
    ref_cls = ref_linear(h, sd, "cls_decoder.out_layer")
    torch.testing.assert_close(out["cls_output"].double(), ref_cls, rtol=0, atol=1e-5)
    bn = imported.model.dsbn.bns[2]
    torch.testing.assert_close(bn.running_mean, raw["dsbn.bns.2.running_mean"])


def test_modality_and_perturbation_embeddings_are_kept(tmp_path):
    """The official multi-omics `mod_encoder` (its embedding given to the expression decoder,
    whose input doubles) and the generator's `pert_encoder` (3 flags added to the input)."""
    raw = official_state(batch_tokens=True)  # a decoder input of 2 d, as with a modality
    raw["mvc_decoder.W.weight"] = torch.randn(D, D)  # the cell-embedding decoder gets none
    raw["mod_encoder.embedding.weight"] = torch.randn(2, D)
    raw["mod_encoder.enc_norm.weight"], raw["mod_encoder.enc_norm.bias"] = (
        torch.ones(D),
        torch.zeros(D),
    )
    raw["pert_encoder.weight"] = torch.randn(3, D)
    imported = load_official_folder(write_folder(tmp_path, raw))
    model, report = imported.model, imported.report
    assert (model.cfg.n_mod, model.cfg.n_pert, model.cfg.n_batch_tokens) == (2, 3, 0)
    assert report.dropped == {}
    assert report.missing == []
    torch.testing.assert_close(model.pert_encoder.weight, raw["pert_encoder.weight"])
    gene_ids, values, pad = make_batch()
    flags = torch.zeros_like(gene_ids)
    flags[:, 1] = 1
    with torch.no_grad():
        plain = model.encode(gene_ids, values, pad)
        flagged = model.encode(gene_ids, values, pad, pert_flags=flags)
        out = model(gene_ids, values, pad, mod_ids=torch.zeros_like(gene_ids))
    assert not torch.allclose(plain, flagged)
    assert out["mlm_output"].shape == gene_ids.shape


def test_heads_not_enabled_are_dropped_and_reported():
    raw = official_state() | {
        k: v for k, v in finetuned_heads().items() if k.startswith("cls_decoder.")
    }
    raw["cls_decoder.cls_token_matrix"] = torch.zeros(5, 8)  # official SimDecoder part
    vocab = Vocab([f"G{i}" for i in range(N_GENES)] + ["<pad>", "<cls>", "<eoc>"])
    model = ScGPT(config_from_args(ARGS, vocab))  # no state: no head inferred
    report = load_official_state(raw, model)
    assert model.cls_decoder is None
    dropped = {k for k in raw if k.startswith("cls_decoder.")}
    assert set(report.dropped) == dropped
    assert "not implement" in report.dropped["cls_decoder.cls_token_matrix"]
    assert "no such parameter" in report.dropped["cls_decoder.out_layer.weight"]
    assert report.missing == []
    assert "dropped cls_decoder.out_layer.weight" in report.summary()


def test_wrong_shape_is_dropped_reported_and_missing(tmp_path):
    raw = official_state()
    raw["decoder.fc.2.weight"] = torch.zeros(D, D + 1)
    imported = load_official_folder(write_folder(tmp_path, raw))
    report = imported.report
    assert list(report.dropped) == ["decoder.fc.2.weight"]
    assert report.dropped["decoder.fc.2.weight"] == "shape (32, 33) != model (32, 32)"
    assert report.missing == ["decoder.fc.2.weight"]
    assert len(report.loaded) == len(raw) - 1
    sd = as_float64(official_state())
    gene_ids, values, pad = make_batch()
    x, _ = ref_embed(sd, gene_ids, values)
    ref_out = ref_layers(sd, x, (~pad)[:, None, :].expand(-1, 9, -1))
    with torch.no_grad():
        tokens = imported.model.encode(gene_ids, values, pad)
    torch.testing.assert_close(tokens.double(), ref_out, rtol=0, atol=1e-5)


def test_args_and_preprocessing_fields():
    vocab = Vocab([f"G{i}" for i in range(N_GENES)] + ["<pad>", "<cls>", "<eoc>"])
    cfg = config_from_args(ARGS, vocab, dropout=0.0)
    assert (cfg.d_model, cfg.n_head, cfg.d_hid, cfg.n_layer) == (D, N_HEAD, D_HID, N_LAYER)
    assert (cfg.vocab_size, cfg.pad_id, cfg.n_bins, cfg.max_seq_len) == (V, PAD, 51, 1200)
    assert (cfg.dropout, cfg.input_emb, cfg.n_cls) == (0.0, "continuous", 0)
    tokens = tokens_from_args(ARGS)
    assert (tokens.max_seq_len, tokens.n_bins, tokens.pad_value) == (1200, 51, -2.0)
    assert tokens.cls_value == -2.0  # the official zero-shot embedding pipeline: pad_value on <cls>
    with pytest.raises(InputError, match="input_style 'normed_raw' is not supported"):
        tokens_from_args(ARGS | {"input_style": "normed_raw"})
    with pytest.raises(InputError, match="lacks the architecture fields"):
        config_from_args({"nheads": 4}, vocab)
    with pytest.raises(InputError, match="scaling"):
        config_from_args(ARGS | {"input_emb_style": "scaling"}, vocab)


def test_vocab_size_mismatch_is_a_clear_error(tmp_path):
    folder = write_folder(tmp_path, official_state(), n_genes=N_GENES - 1)
    with pytest.raises(InputError, match=r"53 gene embedding rows but vocab.json has 52 entries"):
        load_official_folder(folder)
    vocab = Vocab.from_json(folder / "vocab.json")
    model = ScGPT(config_from_args(ARGS, vocab))
    with pytest.raises(InputError, match=r"vocabulary or args\.json does not belong"):
        load_official_state(official_state(), model)


class NotATensor:
    """Pickling an instance records this class: loading it would import and run code."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_pickle_needing_code_is_refused(tmp_path):
    path = tmp_path / "best_model.pt"
    torch.save({"encoder.embedding.weight": torch.zeros(2, 2), "extra": NotATensor()}, path)
    with pytest.raises(InputError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: refused: loading it would run code")
    assert "NotATensor" in message


def test_unreadable_or_non_state_dict_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(junk)
    nested = tmp_path / "nested.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, nested)
    with pytest.raises(InputError, match="not a plain state dict"):
        read_checkpoint(nested)
    with pytest.raises(InputError, match=r"no best_model\.pt"):
        load_official_folder(tmp_path)


def test_import_scgpt_command_writes_a_run_that_reproduces_the_reference(tmp_path):
    folder = write_folder(tmp_path / "official", VARIANTS["module"](official_state()))
    result = CliRunner().invoke(
        cli, ["import-scgpt", str(folder), "--out", str(tmp_path / "run"), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dropped"] == {}
    assert report["missing"] == []
    model, info = load_run(tmp_path / "run")
    assert info.tokens.cls_value == -2.0  # recorded for the official embedding pipeline
    assert info.provenance["import_report"] == report
    assert len(info.provenance["checkpoint_sha256"]) == 64
    gene_ids, values, pad = make_batch()
    ref = ref_layers(as_float64(official_state()), *ref_embed_allowed(gene_ids, values, pad))
    with torch.no_grad():
        emb = model.cell_embedding(gene_ids, values, pad)
    torch.testing.assert_close(emb.double(), ref[:, 0], rtol=0, atol=1e-5)


def ref_embed_allowed(gene_ids, values, pad):
    x, _ = ref_embed(as_float64(official_state()), gene_ids, values)
    return x, (~pad)[:, None, :].expand(-1, pad.shape[1], -1)


def test_import_scgpt_command_bad_folder_is_one_line(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "args.json").write_text(json.dumps(ARGS))
    result = CliRunner().invoke(
        cli, ["import-scgpt", str(tmp_path / "half"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'half'}: no best_model.pt; an official scGPT model folder holds "
        "best_model.pt, args.json and vocab.json"
    ]
