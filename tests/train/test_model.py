"""The scGPT network: shapes, masks, invariances, heads, and the losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scgpt_train.decoders import grad_reverse
from scgpt_train.model import PRESETS, ModelConfig, ScGPT, generative_mask
from scgpt_train.objectives import (
    cross_entropy,
    ecs_loss,
    info_nce,
    masked_bernoulli_nll,
    masked_mse,
)

N_GENES = 50
PAD, CLS = N_GENES, N_GENES + 1  # official order: genes, <pad>, <cls>, <eoc>
VOCAB = N_GENES + 3


def small(**overrides) -> ModelConfig:
    return ModelConfig.from_name("small", vocab_size=VOCAB, pad_id=PAD, **overrides)


def make_batch(B: int = 4, L: int = 12, seed: int = 0, n_pad: tuple[int, ...] = (0, 3, 5, 0)):
    """<cls> at 0 with value -2, random genes and bins, `n_pad[b]` trailing pads in row b."""
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.randint(0, N_GENES, (B, L), generator=g)
    values = torch.randint(0, 51, (B, L), generator=g).float()
    gene_ids[:, 0], values[:, 0] = CLS, -2.0
    pad = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(n_pad[:B]):
        if n:
            pad[b, L - n :] = True
    gene_ids[pad], values[pad] = PAD, -2.0
    return gene_ids, values, pad


@pytest.fixture
def model() -> ScGPT:
    torch.manual_seed(0)
    return ScGPT(small()).eval()


# ---------------------------------------------------------------------------- config


def test_presets_construct_and_small_forward_shapes():
    for name in PRESETS:
        cfg = ModelConfig.from_name(name, vocab_size=VOCAB, pad_id=PAD)
        assert cfg.d_model % cfg.n_head == 0
    torch.manual_seed(0)
    cfg = small(n_cls=5, n_batch_tokens=3, n_dab=3, explicit_zero=True)
    m = ScGPT(cfg).eval()
    ids, vals, pad = make_batch()
    out = m(ids, vals, pad, batch_labels=torch.tensor([0, 1, 2, 0]))
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {
        "cell_emb": (4, 64),
        "mlm_output": (4, 12),
        "mvc_output": (4, 12),
        "mlm_nonzero_logits": (4, 12),
        "mvc_nonzero_logits": (4, 12),
        "cls_output": (4, 5),
        "dab_output": (4, 3),
    }
    assert m.encode(ids, vals, pad, None).shape == (4, 12, 64)
    torch.testing.assert_close(m.cell_embedding(ids, vals, pad), out["cell_emb"])
    # batch tokens double the decoders' input width, as in official fine-tuned checkpoints
    sd = m.state_dict()
    assert sd["decoder.fc.0.weight"].shape == (64, 128)
    assert sd["mvc_decoder.W.weight"].shape == (128, 64)
    assert sd["mvc_decoder.W_zero_logit.weight"].shape == (128, 64)
    assert sd["cls_decoder._decoder.5.weight"].shape == (64,)
    with pytest.raises(ValueError, match="uses n_batch_tokens: pass its input"):
        m(ids, vals, pad)


def test_config_validation_and_json_round_trip():
    cfg = small(n_cls=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="divisible"):
        small(n_head=5)
    with pytest.raises(ValueError, match="same number of batches"):
        small(n_dsbn=3, n_dab=2)
    with pytest.raises(ValueError, match="n_pert must be >= 0"):
        small(n_pert=-1)
    # run format 1 sized the batch parts by n_batch and switched them on by flags
    old = {**small().to_dict(), "n_batch": 3, "use_batch_tokens": True, "dsbn": False, "dab": True}
    for name in ("n_batch_tokens", "n_dsbn", "n_dab", "n_mod", "n_pert"):
        del old[name]
    assert ModelConfig.from_dict(old) == small(n_batch_tokens=3, n_dab=3)
    with pytest.raises(ValueError, match="n_cls"):
        small(n_cls=1)
    with pytest.raises(ValueError, match="input_emb"):
        small(input_emb="scaling")
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_name("huge", vocab_size=VOCAB, pad_id=PAD)
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "ecs_weight": 10})


def test_whole_human_parameter_count():
    # reference table: embedding 60697*512, value encoder, 12 blocks, flag, expression + MVC heads
    cfg = ModelConfig.from_name("whole-human", vocab_size=60697, pad_id=60694)
    with torch.device("meta"):
        m = ScGPT(cfg)
    d, V = 512, 60697
    block = (3 * d * d + 3 * d) + (d * d + d) + 2 * (d * d + d) + 4 * d
    expected = (
        V * d
        + 2 * d  # gene encoder
        + (2 * d)
        + (d * d + d)
        + 2 * d  # value encoder
        + 12 * block
        + 2 * d  # flag encoder
        + 2 * (d * d + d)
        + (d + 1)  # expression decoder
        + (d * d + d)
        + d * d  # MVC decoder
    )
    assert expected == 51_330_049
    assert sum(p.numel() for p in m.parameters()) == expected
    sd = m.state_dict()
    assert sd["transformer_encoder.layers.11.self_attn.Wqkv.weight"].shape == (3 * d, d)
    assert sd["decoder.fc.4.weight"].shape == (1, d)
    assert "mvc_decoder.W.bias" not in sd


# ---------------------------------------------------------------------------- masks


def test_pad_tokens_never_change_non_pad_outputs(model):
    ids, vals, pad = make_batch()
    ids2, vals2 = ids.clone(), vals.clone()
    ids2[pad] = torch.randint(0, N_GENES, (int(pad.sum()),))
    vals2[pad] = 37.0
    with torch.no_grad():
        a, b = model(ids, vals, pad), model(ids2, vals2, pad)
        ea, eb = model.encode(ids, vals, pad), model.encode(ids2, vals2, pad)
    torch.testing.assert_close(ea[~pad], eb[~pad], rtol=0, atol=1e-6)
    assert not torch.allclose(ea[pad], eb[pad])  # the pads themselves did change
    for key in ("mlm_output", "mvc_output"):
        torch.testing.assert_close(a[key][~pad], b[key][~pad], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["cell_emb"], b["cell_emb"], rtol=0, atol=1e-6)


def test_generative_mask_layout():
    pcpt_pad = torch.tensor([[False, False, True]])
    gen_pad = torch.tensor([[False, True]])
    allowed = generative_mask(pcpt_pad, gen_pad)[0, 0].int()
    # rows = queries [p0 p1 p2(pad) | g0 g1(pad)], columns = keys
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 0, 1, 0],  # a gen token: observed tokens and itself
            [1, 1, 0, 0, 0],  # a padded gen token: never a key, not even to itself
        ]
    )
    assert torch.equal(allowed, expected)


def test_generative_forward_masking(model):
    ids, vals, pad = make_batch(n_pad=(0, 3, 5, 0))
    g = torch.Generator().manual_seed(1)
    gen = torch.randint(0, N_GENES, (4, 6), generator=g)
    gen_pad = torch.zeros(4, 6, dtype=torch.bool)
    gen_pad[1, 4:] = True
    gen[gen_pad] = PAD
    with torch.no_grad():
        base = model.forward_generative(ids, vals, pad, gen, gen_pad)
        gen2 = gen.clone()
        gen2[:, 2] = (gen2[:, 2] + 7) % N_GENES  # another gen token changes its gene
        other = model.forward_generative(ids, vals, pad, gen2, gen_pad)
        plain = model.encode(ids, vals, pad)
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(
        base["gen_out"][:, keep], other["gen_out"][:, keep], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        base["gen_pred"][:, keep], other["gen_pred"][:, keep], rtol=0, atol=1e-6
    )
    assert not torch.allclose(base["gen_out"][:, 2], other["gen_out"][:, 2])
    # observed tokens never see gen tokens: their outputs equal a plain encoder pass
    torch.testing.assert_close(base["pcpt_out"], other["pcpt_out"], rtol=0, atol=1e-6)
    torch.testing.assert_close(base["pcpt_out"][~pad], plain[~pad], rtol=0, atol=1e-5)
    torch.testing.assert_close(base["cell_emb"], plain[:, 0], rtol=0, atol=1e-5)
    assert base["gen_pred"].shape == base["mvc_gen_pred"].shape == (4, 6)
    assert base["pcpt_pred"].shape == base["mvc_pcpt_pred"].shape == (4, 12)


def test_generative_forward_feeds_cell_emb_into_cls_slot(model):
    ids, vals, pad = make_batch()
    gen = torch.randint(0, N_GENES, (4, 3))
    gen_pad = torch.zeros(4, 3, dtype=torch.bool)
    with torch.no_grad():
        first = model.forward_generative(ids, vals, pad, gen, gen_pad)
        second = model.forward_generative(
            ids, vals, pad, gen, gen_pad, input_cell_emb=first["cell_emb"]
        )
    assert not torch.allclose(first["gen_out"], second["gen_out"])


# ---------------------------------------------------------------------------- invariances


def test_gene_order_invariance(model):
    # No positional encoding: permuting the non-<cls> tokens permutes the token outputs and
    # leaves the cell embedding unchanged up to float32 rounding of reordered sums (~1e-7
    # relative per op over a few layers), hence 1e-5 and not exact equality.
    ids, vals, pad = make_batch()
    perm = torch.cat(
        [torch.tensor([0]), 1 + torch.randperm(11, generator=torch.Generator().manual_seed(3))]
    )
    with torch.no_grad():
        a = model(ids, vals, pad)
        b = model(ids[:, perm], vals[:, perm], pad[:, perm])
        ea, eb = (
            model.encode(ids, vals, pad),
            model.encode(ids[:, perm], vals[:, perm], pad[:, perm]),
        )
    torch.testing.assert_close(b["cell_emb"], a["cell_emb"], rtol=0, atol=1e-5)
    torch.testing.assert_close(eb, ea[:, perm], rtol=0, atol=1e-5)
    torch.testing.assert_close(b["mlm_output"], a["mlm_output"][:, perm], rtol=0, atol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = ScGPT(small(dropout=0.3))
    ids, vals, pad = make_batch()
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            m.encode(ids, vals, pad), m.encode(ids, vals, pad), rtol=0, atol=0
        )
        m.train()
        assert not torch.allclose(m.encode(ids, vals, pad), m.encode(ids, vals, pad))


def test_value_clamped_at_512_without_lower_clamp(model):
    enc = model.value_encoder
    out = enc(torch.tensor([[512.0, 600.0, 1e5, -5.0, -50.0]]))
    torch.testing.assert_close(out[0, 1], out[0, 0])
    torch.testing.assert_close(out[0, 2], out[0, 0])
    assert not torch.allclose(out[0, 3], out[0, 4])


# ---------------------------------------------------------------------------- encoders, heads


def test_category_encoder_rows():
    torch.manual_seed(0)
    m = ScGPT(small(input_emb="category")).eval()
    enc = m.value_encoder
    n_bins = m.cfg.n_bins
    assert enc.embedding.weight.shape == (n_bins + 2, 64)
    # pad_value -2 -> row n_bins, mask_value -1 -> row n_bins + 1; official category
    # tutorials' pad = n_bins / mask = n_bins + 1 reach the same rows
    values = torch.tensor([[-2.0, -1.0, 0.0, 3.0, 50.0, float(n_bins), float(n_bins + 1)]])
    rows = torch.tensor([n_bins, n_bins + 1, 0, 3, 50, n_bins, n_bins + 1])
    expected = F.layer_norm(
        enc.embedding.weight[rows], (64,), enc.enc_norm.weight, enc.enc_norm.bias
    )
    torch.testing.assert_close(enc(values)[0], expected)
    ids, vals, pad = make_batch()
    assert m(ids, vals, pad)["mlm_output"].shape == (4, 12)


def test_dsbn_uses_the_batch_of_each_cell():
    torch.manual_seed(0)
    m = ScGPT(small(n_dsbn=3)).eval()
    for k, bn in enumerate(m.dsbn.bns):
        bn.running_mean.fill_(0.3 * k)
        bn.running_var.fill_(1.0 + k)
    ids, vals, pad = make_batch()
    with torch.no_grad():
        out0 = m.encode(ids, vals, pad, torch.zeros(4, dtype=torch.long))
        out1 = m.encode(ids, vals, pad, torch.ones(4, dtype=torch.long))
        mixed = m.encode(ids, vals, pad, torch.tensor([0, 1, 0, 1]))
    assert not torch.allclose(out0, out1)
    torch.testing.assert_close(mixed[[0, 2]], out0[[0, 2]])
    torch.testing.assert_close(mixed[[1, 3]], out1[[1, 3]])
    # eval gather == the official call of one BatchNorm1d (B, d, L) per batch label
    x = torch.randn(2, 5, 64)
    bn = m.dsbn.bns[2]
    torch.testing.assert_close(
        m.dsbn(x, torch.tensor([2, 2])), bn(x.transpose(1, 2)).transpose(1, 2)
    )
    m.train()
    m.encode(ids, vals, pad, torch.full((4,), 2))  # one batch per minibatch: fine
    assert m.dsbn.bns[2].num_batches_tracked.item() == 1
    with pytest.raises(ValueError, match="single batch"):
        m.encode(ids, vals, pad, torch.tensor([0, 1, 0, 1]))


def test_grad_reverse_flips_the_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    upstream = torch.randn(3, 4)
    y = grad_reverse(x)
    torch.testing.assert_close(y, x)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -upstream)
    # through the discriminator: the gradient into the cell embedding is exactly the negative
    # of the gradient the same layers give without reversal
    torch.manual_seed(0)
    disc = ScGPT(small(n_dab=3)).grad_reverse_discriminator
    emb = torch.randn(5, 64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1])
    (g_rev,) = torch.autograd.grad(cross_entropy(disc(emb), labels), emb)
    plain = disc.out_layer(disc._decoder(emb))
    (g_plain,) = torch.autograd.grad(cross_entropy(plain, labels), emb)
    torch.testing.assert_close(g_rev, -g_plain)
    assert g_plain.abs().sum() > 0


def test_mvc_uses_gene_embeddings_without_values(model):
    # the MVC prediction for gene j depends on the cell embedding and on gene j's identity,
    # not on its own value: with the cell embedding fixed, changing values changes nothing
    g = model.encoder(torch.tensor([[3, 4, 5]]))
    cell = torch.randn(1, 64)
    pred, _ = model.mvc_decoder(cell, g)
    q = torch.sigmoid(g @ model.mvc_decoder.gene2query.weight.T + model.mvc_decoder.gene2query.bias)
    torch.testing.assert_close(pred, (q @ model.mvc_decoder.W.weight.T) @ cell[0])


# ---------------------------------------------------------------------------- objectives


def test_ecs_loss_hand_computed():
    # e1 = (1, 0), e2 = (2, 2) (scale must not matter), e3 = (-1, 0):
    # cos(e1, e2) = 1/sqrt(2); cos(e1, e3) = -1 and cos(e2, e3) = -1/sqrt(2) are cut to 0 by relu;
    # the zeroed diagonal stays in the mean (official). Entries: 1 - (c - 0.8)^2.
    emb = torch.tensor([[1.0, 0.0], [2.0, 2.0], [-1.0, 0.0]])
    zero_term = 1 - 0.8**2  # 0.36, seven entries (3 diagonal + 4 cut pairs)
    pair_term = 1 - (1 / math.sqrt(2) - 0.8) ** 2  # 0.99137085, two entries
    expected = (7 * zero_term + 2 * pair_term) / 9
    assert expected == pytest.approx(0.50030463, abs=1e-8)
    assert ecs_loss(emb, threshold=0.8).item() == pytest.approx(expected, abs=1e-6)
    assert ecs_loss(emb[:2]).item() == pytest.approx((2 * zero_term + 2 * pair_term) / 4, abs=1e-6)


def test_info_nce_hand_computed():
    # all cells alike: every logit equal, each row a uniform softmax over 4 cells -> ln 4
    same = torch.ones(4, 3)
    assert info_nce(same, same).item() == pytest.approx(math.log(4), abs=1e-6)
    # orthogonal cells, each view its own: logits 1/T on the diagonal, 0 elsewhere
    eye = torch.eye(3) * 5.0  # scale must not matter
    expected = math.log(1 + 2 * math.exp(-1 / 0.1))
    # rel 1e-3: a float32 log-softmax of logits near 10 keeps about 4 digits of a 1e-4 loss
    assert info_nce(eye, eye, 0.1).item() == pytest.approx(expected, rel=1e-3)
    # views swapped between two cells: the loss is high, and symmetric in its arguments
    swapped = eye[[1, 0, 2]]
    assert info_nce(eye, swapped).item() > 5
    assert info_nce(eye, swapped).item() == pytest.approx(info_nce(swapped, eye).item())


def test_masked_losses_hand_computed():
    pred = torch.tensor([[1.0, 2.0, 3.0]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((4 + 9) / 2)
    assert masked_mse(pred, target, torch.zeros_like(mask)).item() == 0.0
    logits = torch.tensor([[0.0, 0.0, math.log(3.0)]])  # P(nonzero) = 0.5, 0.5, 0.75
    target = torch.tensor([[5.0, 0.0, 2.0]])
    expected = -(math.log(0.5) + math.log(0.5) + math.log(0.75)) / 3
    assert masked_bernoulli_nll(logits, target, torch.ones(1, 3, dtype=torch.bool)).item() == (
        pytest.approx(expected, abs=1e-6)
    )
    logits = torch.tensor([[2.0, -1.0]])
    ce = -(F.log_softmax(logits, dim=1)[0, 0])
    assert cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(ce.item())
