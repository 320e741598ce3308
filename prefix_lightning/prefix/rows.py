"""Per-row prefixes: a batch whose rows read different prefixes (or none), on one frozen LM.

For one call, the prefixes that the batch uses are padded to the longest and stacked, per attention site, into a
table of entries; each row points at its entry. A row sees only its entry's real columns (none for a row without
a prefix) and its positions move by its entry's shift. Attention reads a row's keys/values by indexing the table,
so rows that ``generate`` copies (beams) or reorders follow their prefix: copies are repeated in place
(``repeat_interleave``, as ``generate`` makes them), and a decoder that reorders or drops rows says so
(:meth:`RowPrefixes.select`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prefix_lightning.prefix.attention import PrefixBias, PrefixInjector, RowsPrefix, SiteBinding


class RowPrefixes:
    """The prefixes of one call: per site a table (entries, 2, kv_heads, L_max, head_dim), per entry its visible
    columns (entries, L_max) and position shift (entries,), per row its entry (rows,)."""

    def __init__(self, tables: list[torch.Tensor], columns: torch.Tensor, shifts: torch.Tensor, rows: torch.Tensor):
        self.tables = tables
        self.columns = columns
        self.shifts = shifts
        self.rows = rows
        # Every row on one prefix, all of it visible: the shared block of a single-prefix model does it.
        self.uniform = bool((rows == rows[0]).all()) and bool(columns[rows[0]].all())

    @classmethod
    def build(
        cls, blocks: Sequence[Sequence[torch.Tensor] | None], shifts: Sequence[int], rows: Sequence[int]
    ) -> RowPrefixes:
        """Entries from each prefix's per-site blocks (2, kv_heads, L, head_dim) and shift; None is a row without a
        prefix (no visible column, no shift). ``rows[i]``: the entry of row i."""
        given = [entry for entry in blocks if entry is not None]
        longest = max(entry[0].shape[-2] for entry in given)
        device = given[0][0].device
        columns = torch.zeros(len(blocks), longest, dtype=torch.bool, device=device)
        for index, entry in enumerate(blocks):
            if entry is not None:
                columns[index, : entry[0].shape[-2]] = True
        tables = []
        for site, reference in enumerate(given[0]):
            empty = reference.new_zeros(*reference.shape[:-2], longest, reference.shape[-1])
            padded = [_padded(entry[site], longest) if entry is not None else empty for entry in blocks]
            tables.append(torch.stack(padded))
        shift = torch.tensor(list(shifts), dtype=torch.long, device=device)
        return cls(tables, columns, shift, torch.tensor(list(rows), dtype=torch.long, device=device))

    def entries(self, batch: int) -> torch.Tensor:
        """The entry of each row of a call with ``batch`` rows: the rows as given, or each repeated in place for
        the copies ``generate`` makes of an input (beams, returned sequences)."""
        count = self.rows.numel()
        if batch == count:
            return self.rows
        if batch % count:
            raise ValueError(
                f"a call with {batch} rows, but prefixes were given for {count}: run the batch through the bank "
                "(its forward or generate, with prefixes=[...] for every row), not through its LM"
            )
        return self.rows.repeat_interleave(batch // count)

    def select(self, indices: torch.Tensor) -> None:
        """The rows were reordered (or some dropped) to ``indices`` of the current ones, as a cache is."""
        self.rows = self.rows[indices.to(self.rows.device)]

    def shift(self, batch: int) -> int | torch.Tensor:
        """The position shift of each row, (batch, 1), or one number when every row has the same."""
        if self.uniform:
            return int(self.shifts[self.rows[0]])
        return self.shifts[self.entries(batch)][:, None]


def _padded(block: torch.Tensor, length: int) -> torch.Tensor:
    return nn.functional.pad(block, (0, 0, 0, length - block.shape[-2]))


@dataclass(frozen=True)
class SiteRows:
    """One attention site's view of the call's prefixes, as attention reads it (see ``prefix_attention``)."""

    table: torch.Tensor
    prefixes: RowPrefixes

    def rows(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values (batch, kv_heads, L_max, head_dim) of each row, and the columns it sees (batch, L_max)."""
        entries = self.prefixes.entries(batch)
        blocks = self.table[entries]
        return blocks[:, 0], blocks[:, 1], self.prefixes.columns[entries]

    def bias(self, hook: PrefixBias, bias: torch.Tensor, batch: int, positions: torch.Tensor | None) -> torch.Tensor:
        """Each row's position bias of the prefix columns, (batch, heads, queries, L_max), from the site's ``hook``
        (given the queries' ``positions``): an entry's own length, zero for an entry that does not shift positions
        (and for padding columns)."""
        prefixes = self.prefixes
        longest = prefixes.columns.shape[1]
        bias_rows = max(bias.shape[0], 1 if positions is None else positions.shape[0])
        per_entry = []
        for entry, length in enumerate(prefixes.columns.sum(1).tolist()):
            columns = bias.new_zeros(bias_rows, *bias.shape[1:-1], longest)
            if prefixes.shifts[entry] > 0:
                columns[..., :length] = hook(bias, length, positions)
            per_entry.append(columns)
        table = torch.stack(per_entry)  # (entries, 1 or batch, heads, queries, L_max)
        entries = prefixes.entries(batch)
        rows = torch.arange(batch, device=entries.device) if table.shape[1] == batch else 0
        return table[entries, rows]


class RowInjector(PrefixInjector):
    """The injector of a bank of prefixes: each site reads its rows' prefixes from the call's ``RowPrefixes``
    (``current``, set by the bank for each call).

    ``places`` maps each bound site's (group, index) to its place in the tables; ``biased``: the model passes a
    relative position bias to attention (T5), whose prefix columns depend on each entry's length and shift.
    """

    def __init__(self) -> None:
        super().__init__()
        self.places: dict[tuple[str, int], int] = {}
        self.biased = False
        self.current: RowPrefixes | None = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "current": None}

    traceable = False  # a site's table is found by its (group, index): compiled blocks run its attention eager

    def lookup(self, binding: SiteBinding) -> torch.Tensor | RowsPrefix | None:
        if not self.enabled or self.current is None:
            return None
        current = self.current
        table = current.tables[self.places[(binding.group, binding.index)]]
        entry = current.rows[0]
        # The site's own bias hook assumes a prefix with positions: an entry without them reads rows' view.
        if current.uniform and not (self.biased and current.shifts[entry] == 0):
            return table[entry]
        return SiteRows(table, current)

    def position_shift(self, rows: int) -> int | torch.Tensor:
        if not self.enabled or self.current is None:
            return 0
        return self.current.shift(rows)
