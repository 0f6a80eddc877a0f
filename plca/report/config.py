"""What the report shows of each variant (params `variants.<name>.show`, typed `plca.params.ShowConfig`) and which
variant plays which role in it (params `report`, `plca.params.ReportConfig`). The report stage builds a
`Presentation` from params; the tables and figures read labels, table membership, colours and roles from it, never
from a list of their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from plca.report.paper import TABLE1_COLUMNS

if TYPE_CHECKING:  # the schema lives with the other params dataclasses; the report needs only their fields
    from plca.params import PublishedConfig, ReportConfig, ShowConfig

#: Colours of variants that name none (light tab20 shades), picked by a stable hash of the name.
SPARE_COLOURS: tuple[str, ...] = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")


@dataclass(frozen=True)
class Presentation:
    """Every defined variant's `ShowConfig`, in params order, and the report's roles. A name it does not define
    (results of a run made outside the pipeline) is shown by its name, in a spare colour, in every table.
    A `paper` column that the paper's Table 1 lacks, or `published` figures with no source or outside [0, 100],
    raise ValueError naming the variant's key."""

    variants: Mapping[str, ShowConfig]
    roles: ReportConfig
    #: Variant -> the edits of what it trains with since its profile ("options.lsr=True"), for a row trained
    #: otherwise than the method its paper figures belong to: its label names them, its figures are not shown.
    changed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Rank of each defined variant: params order is row order.
    _rank: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, show in self.variants.items():
            if show.paper is not None and show.paper not in TABLE1_COLUMNS:
                raise ValueError(f"variants.{name}.show.paper: '{show.paper}' is not a column of the paper's Table 1; "
                                 f"columns: {list(TABLE1_COLUMNS)} (null: no paper figure)")
            published = show.published
            if published is not None:
                where = f"variants.{name}.show.published"
                if not isinstance(published.source, str) or not published.source.strip():
                    raise ValueError(f"{where}.source: say where the figures come from (paper and table)")
                for key in ("gta5", "synthia16", "synthia13"):
                    value = getattr(published, key)
                    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                              or not 0.0 <= value <= 100.0):
                        raise ValueError(f"{where}.{key}: {value!r} is not an mIoU in [0, 100] (null: none)")
        object.__setattr__(self, "_rank", {name: i for i, name in enumerate(self.variants)})

    def order(self, names: Iterable[str]) -> list[str]:
        """Names in params order, then undefined ones alphabetically."""
        names = set(names)
        known = sorted((n for n in names if n in self._rank), key=self._rank.__getitem__)
        return known + sorted(names - set(known))

    def _mark(self, name: str, text: str) -> str:
        changes = self.changed.get(name)
        return f"{text} (changed: {', '.join(changes)})" if changes else text

    def label(self, name: str) -> str:
        return self._mark(name, self.variants[name].label if name in self.variants else name)

    def short(self, name: str) -> str:
        show = self.variants.get(name)
        text = name if show is None else show.short or show.label
        return f"{text} (changed)" if self.changed.get(name) else text

    def colour(self, name: str) -> str:
        show = self.variants.get(name)
        if show is not None and show.colour is not None:
            return show.colour
        # a sum of bytes, not hash(): the same colour in every process whatever PYTHONHASHSEED is
        return SPARE_COLOURS[sum(name.encode()) % len(SPARE_COLOURS)]

    def paper(self, name: str) -> str | None:
        """The paper's Table 1 column of the row; None when it trained otherwise (`changed`)."""
        return self.variants[name].paper if name in self.variants and not self.changed.get(name) else None

    def published(self, name: str) -> PublishedConfig | None:
        """The method's published figures on the real benchmarks (facts from papers, never ours); None for a name
        params do not define, a variant without any, or one trained otherwise (`changed`)."""
        return self.variants[name].published if name in self.variants and not self.changed.get(name) else None

    def baselines(self) -> dict[str, str]:
        """Variant -> the variant its Table 2 gain is paired against, for rows that name their own
        (`show.baseline`: a row on another network against that network's source-only row)."""
        return {n: s.baseline for n, s in self.variants.items() if s.baseline}

    def in_table(self, name: str, table: str) -> bool:
        return name not in self.variants or table in self.variants[name].tables

    def present(self, role: Iterable[str | None], ran: Iterable[str]) -> list[str]:
        """The variants of a role that ran, in the role's order."""
        ran = set(ran)
        return [name for name in role if name is not None and name in ran]
