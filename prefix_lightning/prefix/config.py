"""The prefix's hyperparameters: everything needed to rebuild a prefix for a given base model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from prefix_lightning.numbers import is_int

Reparam = Literal["mlp", "none"]
Kind = Literal["prefix", "infix", "embedding"]
KINDS = ("prefix", "infix", "embedding")


@dataclass(frozen=True)
class PrefixConfig:
    """Prefix-tuning settings (Li & Liang 2021); invalid values are refused here, wherever they come from.

    length: number of virtual tokens L.
    kind: where they stand and what trains. "prefix": keys/values in front of every attention layer's own
        ([PREFIX; x; y]). "infix": keys/values in every layer that only the target reads ([x; INFIX; y]).
        "embedding": input embeddings only, whose activations in every layer the frozen LM computes (the paper's
        embedding-only ablation). Infix and embedding are for decoder-only LMs.
    reparam: "mlp" trains P = MLP(P') (the paper's default, dropped at export); "none" trains P directly.
    hidden_dim: width k of the reparametrization MLP (512 for table-to-text, 800 for summarization). As in the
        authors' code, P' has the model's width and k is the MLP's hidden width (the paper's footnote 4 writes
        P' as |P| x k).
    dropout: dropout on the materialized prefix during training.
    shift_positions: real tokens take positions L, L+1, ... as if the prefix were real tokens before them. With a
        relative position bias (T5) the real tokens keep their distances and the prefix columns get the bias of
        the L positions before the input; false gives the prefix columns no bias.
    init_text: start from the LM's own activations of these words (e.g. "table-to-text:"); needs the tokenizer.
    init_vocab: start from the activations of L tokens drawn from the vocabulary.
    """

    length: int = 10
    kind: Kind = "prefix"
    reparam: Reparam = "mlp"
    hidden_dim: int = 512
    dropout: float = 0.0
    shift_positions: bool = True
    init_text: str | None = None
    init_vocab: bool = False

    def __post_init__(self) -> None:
        if not is_int(self.length) or self.length <= 0:
            raise ValueError(f"prefix.length must be a positive integer, got {self.length!r}")
        for flag in ("shift_positions", "init_vocab"):  # a string "false" would count as true
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"prefix.{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.kind not in KINDS:
            raise ValueError(f"prefix kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.reparam not in ("mlp", "none"):
            raise ValueError(f"prefix.reparam must be 'mlp' or 'none', got {self.reparam!r}")
        if self.reparam == "mlp" and (not is_int(self.hidden_dim) or self.hidden_dim <= 0):
            raise ValueError(f"prefix.hidden_dim must be a positive integer, got {self.hidden_dim!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ValueError(f"prefix.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init_text is not None and self.init_vocab:
            raise ValueError(
                "prefix.init_vocab=true and prefix.init_text are both set: choose one initialization, words "
                "(prefix.init_text) or drawn tokens (prefix.init_vocab=true)"
            )
        if self.init_text is not None and not (isinstance(self.init_text, str) and self.init_text.strip()):
            raise ValueError(f"prefix.init_text must be some words or null, got {self.init_text!r}")

    @classmethod
    def of(cls, config: PrefixConfig | Mapping[str, Any] | None = None, **changes: Any) -> PrefixConfig:
        """A config from an instance, a mapping of its fields (a Hydra group) or defaults, with ``changes``;
        an unknown field is named with the known ones."""
        if not (config is None or isinstance(config, (PrefixConfig, Mapping))):
            raise TypeError(
                f"a prefix config is a PrefixConfig, a mapping of its fields or None, not {config!r}; give the "
                "fields by name (length=10)"
            )
        values = dict(asdict(config) if isinstance(config, PrefixConfig) else config or {}) | changes
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown prefix option {', '.join(unknown)}; options: {', '.join(sorted(known))}")
        return cls(**values)

    @property
    def virtual_positions(self) -> int:
        """The positions the prefix takes in front of the real tokens (none where they keep theirs)."""
        return self.length if self.shift_positions else 0

    def without_initialization(self) -> PrefixConfig:
        """The same prefix, to be loaded rather than initialized."""
        return replace(self, init_text=None, init_vocab=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
