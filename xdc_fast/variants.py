"""The clustering variants of the XDC paper, as data: which clusterings each encoder's heads learn.

The variants differ only in that; everything else (the CLI's choices, the modalities a run needs, which
clusterings a round computes, the clustering the balanced sampler draws over, this docstring's table)
is read from :data:`VARIANTS`. Adding a variant is one entry here and a test.

"""

from __future__ import annotations

from dataclasses import dataclass

from .choices import MODALITIES
from .errors import ConfigError

# The clustering of the concatenated features [f_v ; f_a] (cdc's targets).
CONCAT = "concat"
CLUSTERINGS = (*MODALITIES, CONCAT)


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str
    learns: dict[str, tuple[str, ...]]  # encoder -> the clusterings its heads learn, one head each
    # Whether a run warns when its video and audio clusters grow no closer than round 0's (learning.py). Only
    # XDC's: on the evaluation families MDC's and CDC's clusters grew no closer even where both encoders gained
    # over random ones, so it fired on 14 of their 15 runs without a loss
    # (benchmarks/results/families_variants.md); SDC has one clustering and nothing to compare.
    warns_of_nuisance: bool = False

    @property
    def modalities(self) -> tuple[str, ...]:
        """Encoders the variant trains (and whose features it clusters), video first."""
        return tuple(m for m in MODALITIES if m in self.learns)

    @property
    def clusterings(self) -> tuple[str, ...]:
        """Clusterings one round computes: each trained modality's, and the concatenation when learnt."""
        wanted = {c for sources in self.learns.values() for c in sources}
        return self.modalities + ((CONCAT,) if CONCAT in wanted else ())

    @property
    def sampled_by(self) -> str:
        """The clustering whose clusters the class-balanced sampler draws videos over: the first head's
        of the first encoder (one sampler feeds every encoder, so one clustering must choose)."""
        return self.learns[next(iter(self.learns))][0]

    def targets(self, labels: dict) -> dict[str, list]:
        """Each encoder's targets, one array per head, from the round's labels per clustering."""
        return {m: [labels[c] for c in sources] for m, sources in self.learns.items()}


VARIANTS = {v.name: v for v in (
    Variant("xdc", "video learns the audio clusters, audio learns the video clusters",
            {"video": ("audio",), "audio": ("video",)}, warns_of_nuisance=True),
    Variant("mdc", "each encoder has two heads: its own modality's clusters and the other's",
            {"video": ("video", "audio"), "audio": ("audio", "video")}),
    Variant("cdc", "both learn the clusters of the concatenated features [f_v ; f_a]",
            {"video": (CONCAT,), "audio": (CONCAT,)}),
    Variant("sdc-video", "the video encoder learns its own clusters", {"video": ("video",)}),
    Variant("sdc-audio", "the audio encoder learns its own clusters", {"audio": ("audio",)}),
)}

__doc__ += "\n".join(f"    {v.name:<10} {v.summary}" for v in VARIANTS.values()) + "\n"


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]
