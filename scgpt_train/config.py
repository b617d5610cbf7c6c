"""`ModelConfig`: the hyper-parameters of the scGPT network (model.py), with named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

INPUT_EMBS = ("continuous", "category")
# run format 1 sized every batch part by n_batch and switched each on by a flag
LEGACY_BATCH_FLAGS = {"use_batch_tokens": "n_batch_tokens", "dsbn": "n_dsbn", "dab": "n_dab"}


@dataclass
class ModelConfig:
    vocab_size: int  # rows of the gene embedding: genes + <pad>, <cls>, <eoc>
    pad_id: int  # id of <pad>: its embedding row gets no gradient (official padding_idx)
    d_model: int = 512
    n_head: int = 8
    d_hid: int = 512  # hidden width of each block's feed-forward layer
    n_layer: int = 12
    dropout: float = 0.2  # embeddings, attention weights, residual branches; training only
    n_bins: int = 51  # value bins incl. bin 0 (zero expression)
    max_seq_len: int = 1200  # tokens per cell incl. <cls>, for the data pipeline: no positions
    input_emb: str = "continuous"  # "continuous": MLP on the value; "category": one row per bin
    # Optional parts are sized by a count, 0 = the part is absent.
    n_cls: int = 0  # classes of the cell-type head
    n_layers_cls: int = 3  # linear layers of the cell-type head
    n_batch_tokens: int = 0  # batch labels of the batch embedding concatenated to the decoders
    n_dsbn: int = 0  # batch labels of domain-specific BatchNorm on the input embeddings
    n_dab: int = 0  # batch labels the discriminator behind gradient reversal predicts (DAB)
    n_mod: int = 0  # modalities of the per-token modality embedding given to the decoders
    mod_input: bool = False  # the modality embedding also added to the input tokens
    n_pert: int = 0  # values of the per-token perturbation flag added to the input (official 3)
    explicit_zero: bool = False  # extra heads predicting P(value > 0)
    pre_norm_bn: bool = False  # older checkpoints: BatchNorm1d on the summed input embedding

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_head", "d_hid", "n_layer", "n_layers_cls"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"pad_id {self.pad_id} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.input_emb not in INPUT_EMBS:
            raise ValueError(f"input_emb must be one of {INPUT_EMBS}, got {self.input_emb!r}")
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {self.n_bins}")
        if self.n_cls == 1 or self.n_cls < 0:
            raise ValueError(f"n_cls must be 0 (no head) or at least 2, got {self.n_cls}")
        for name in ("n_batch_tokens", "n_dsbn", "n_dab", "n_mod", "n_pert"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len({n for n in (self.n_batch_tokens, self.n_dsbn, self.n_dab) if n}) > 1:
            raise ValueError("batch tokens, DSBN and DAB must know the same number of batches")
        if self.mod_input and not self.n_mod:
            raise ValueError("mod_input adds the modality embedding: it needs n_mod modalities")
        if self.n_dsbn and self.pre_norm_bn:
            raise ValueError("DSBN and pre_norm_bn exclude each other (one BatchNorm on the input)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset (see PRESETS) with `overrides`; vocab_size and pad_id must be among them."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def n_batch(self) -> int:
        """Batch labels the model knows (0 = none)."""
        return max(self.n_batch_tokens, self.n_dsbn, self.n_dab)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The config saved by `to_dict`, also as run format 1 saved it (n_batch with the flags
        use_batch_tokens, dsbn, dab)."""
        d = dict(d)
        if "n_batch" in d:
            n = d.pop("n_batch")
            for old, new in LEGACY_BATCH_FLAGS.items():
                d[new] = n if d.pop(old, False) else 0
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)


SMALL_LR, OFFICIAL_LR = 1e-3, 1e-4
LR_HELP = (
    f"[default: {SMALL_LR:g} for models of d_model < 256 (the small preset), else the "
    f"official {OFFICIAL_LR:g}]"
)


def default_lr(d_model: int) -> float:
    """The learning rate of pretraining and fine-tuning where none is given: 1e-3 for models
    narrower than 256, measured on the small preset (docs/results.md: the official 1e-4 left
    it near the majority rate), else the official 1e-4 of the released models (not measured
    here: they are GPU jobs)."""
    return SMALL_LR if d_model < 256 else OFFICIAL_LR


PRESETS: dict[str, dict[str, Any]] = {
    # fast on CPU: tests and demos
    "small": {"d_model": 64, "n_head": 4, "d_hid": 128, "n_layer": 2, "max_seq_len": 256},
    "base": {"d_model": 256, "n_head": 8, "d_hid": 512, "n_layer": 4},
    # the released whole-human model (scGPT_human): 51,330,049 parameters with vocab 60,697
    "whole-human": {
        "d_model": 512,
        "n_head": 8,
        "d_hid": 512,
        "n_layer": 12,
        "n_bins": 51,
        "max_seq_len": 1200,
        "dropout": 0.2,
    },
}
