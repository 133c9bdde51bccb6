"""Is it learning? What a round's figures say about whether each encoder fit its pseudo-labels.

A head that fits its targets no better than a constant guess teaches its encoder nothing, and a run
whose rounds all end that way leaves the encoders worse than random ones. The baseline is the best
constant guess *under the sampler*: batches are drawn uniformly over the non-empty clusters of one
clustering (DeepCluster's sampler), so a head learning that clustering has chance 1/k, but a head
learning another clustering (XDC's second encoder) sees a skewed target distribution whose majority
share, and entropy, are the honest chance accuracy and loss.

The verdict uses held-out videos (clustered, never trained on) when there are enough of them: a head
can memorise the targets of its training videos even when they are noise. Otherwise it uses the
training accuracy of the round's last epoch, and says that memorising passes that test too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Share of the way from chance to perfect accuracy: at least FITS is a fit, under AT_CHANCE is nothing.
FITS, AT_CHANCE = 0.2, 0.05
# An accuracy measured on n independent samples scatters around its true value by sqrt(p(1-p)/n): on 30
# held-out videos of noise targets that is 9 points either way, enough to read "weak" or worse "fits"
# by luck. A lift counts only beyond NOISE_Z such standard errors; several heads and rounds are judged
# per run, hence three rather than two.
NOISE_Z = 3.0
# Below this many clips in the epoch, an accuracy is too noisy to judge (one clip moves it by 5 points).
MIN_CLIPS = 20
# Held-out clips of one video are not independent samples, and on a handful of videos the majority
# target's share (the chance level) is itself inflated: below this many held-out videos the verdict
# uses the training clips instead, and says so.
MIN_HELDOUT_VIDEOS = 30
# XDC's premise is that the two modalities share what matters, so clusters that follow it agree across
# the modalities more than the random encoders' clusters of round 0 do; clusters of per-video nuisance
# (colour, size, base pitch) are as learnable but agree no more. A run whose video-vs-audio agreement
# (NMI) rose less than this from round 0 to its last round is warned about. The value is the smallest
# that caught at least 80% of the tuning families' runs ending below random encoders in a modality
# (benchmarks/results/families_tuning.md); the evaluation families report how often it fires on such
# runs and on the others (benchmarks/results/families.md): it separates them poorly, so it is a caution.
AGREEMENT_RISE = 0.08


@dataclass(frozen=True)
class Chance:
    accuracy: float  # the majority share of the sampled targets
    loss: float  # their entropy (nats): the cross-entropy of predicting the target distribution itself


def chance_under_sampler(sampled_by: np.ndarray | None, target: np.ndarray) -> Chance:
    """Chance accuracy and loss of a head learning ``target`` when items are drawn uniformly over the
    non-empty clusters of ``sampled_by``, then uniformly within one (labels -1 are never drawn);
    ``sampled_by`` None: every item once (a held-out set)."""
    if sampled_by is None:
        sampled_by = np.where(target >= 0, 0, -1)
    drawn = (sampled_by >= 0) & (target >= 0)
    sampled_by, target = sampled_by[drawn], target[drawn]
    clusters = np.unique(sampled_by)
    if not len(clusters):
        return Chance(1.0, 0.0)
    probability = np.zeros(int(target.max()) + 1)
    for c in clusters:
        members = target[sampled_by == c]
        probability += np.bincount(members, minlength=len(probability)) / len(members) / len(clusters)
    nonzero = probability[probability > 0]
    return Chance(float(probability.max()), float(-(nonzero * np.log(nonzero)).sum()))


def lift(accuracy: float, chance: float) -> float:
    """How far accuracy went from chance towards 1 (0: chance, 1: perfect, negative: worse)."""
    return (accuracy - chance) / (1 - chance) if chance < 1 else 0.0


def noise_lift(chance: float, samples: int) -> float:
    """The lift that sampling noise alone reaches on ``samples`` independent draws (NOISE_Z standard errors
    of an accuracy whose true value is chance)."""
    if chance >= 1 or samples <= 0:
        return 0.0
    return NOISE_Z * float(np.sqrt(chance * (1 - chance) / samples)) / (1 - chance)


def verdict(accuracy: float, chance: float, clips: int, independent: int | None = None) -> str:
    """``independent``: how many independent samples the accuracy stands on (held-out videos, whose clips
    are not independent of one another); the clips themselves when None."""
    if clips < MIN_CLIPS:
        return "too few clips to tell"
    gained = lift(accuracy, chance)
    floor = max(AT_CHANCE, noise_lift(chance, clips if independent is None else independent))
    return "at chance" if gained < floor else "fits" if gained >= max(FITS, floor) else "weak"


def round_signal(record: dict) -> dict:
    """Per head: accuracy, loss, their chance levels, the lift and the verdict, from an epoch's record.

    On the held-out videos when the record has at least MIN_HELDOUT_VIDEOS of them, which tells
    fitting from memorising; else on the training clips (``chance``), which a head that memorises its
    videos also passes."""
    def judged(on: str, accuracy: float, loss: float, chance_accuracy: float, chance_loss: float, clips: int,
               videos: int | None = None):
        return {"on": on, "accuracy": accuracy, "chance_accuracy": chance_accuracy, "loss": loss,
                "chance_loss": chance_loss, "lift": lift(accuracy, chance_accuracy),
                "verdict": verdict(accuracy, chance_accuracy, clips, videos)}

    held = record.get("heldout")
    if held and all(h.get("videos", 0) >= MIN_HELDOUT_VIDEOS for h in held.values()):
        return {head: judged("held-out", h["accuracy"], h["loss"], h["chance_accuracy"], h["chance_loss"], h["clips"],
                             h["videos"])
                for head, h in held.items() if "chance_accuracy" in h}
    return {head: judged("training", record["pseudo_label_acc"][head], record["loss"][head], chance["accuracy"],
                         chance["loss"], record.get("clips", 0))
            for head, chance in (record.get("chance") or {}).items()
            if record["pseudo_label_acc"].get(head) is not None and record["loss"].get(head) is not None}


def agreement_warns(agreements: list[float | None], rise: float = AGREEMENT_RISE) -> bool:
    """Whether the video-vs-audio agreement of each round (round 0 first) rose too little to trust the
    clusters: see AGREEMENT_RISE."""
    values = [v for v in agreements if v is not None]
    return len(values) >= 2 and values[-1] - values[0] < rise


def nuisance_warning(start: float, end: float, round_index: int) -> str:
    return (f"warning: in round {round_index} the video and audio clusters agree at NMI {end:.2f}, against "
            f"{start:.2f} for the random encoders' clusters of round 0 (a rise under {AGREEMENT_RISE:g}): they "
            "may follow what is specific to one modality (per-video colour, size, base pitch) rather than what "
            "the two share, and encoders trained on such clusters can end worse than random ones; score them "
            "against random ones on labelled data before trusting them (xdc-fast evaluate --checkpoint random). "
            "Augmentations that change such nuisance within a video aim at this: colour_jitter, audio_shift")


def describe_round(record: dict, steps_per_round: int, lr: float, first_agreement: float | None = None,
                   warn_nuisance: bool = True) -> list[str]:
    """The lines a run logs at the end of a round: a one-line verdict, then a warning per head at
    chance naming the likely causes and the settings to change, and one when the video and audio
    clusters agree too little more than round 0's (``first_agreement``) did."""
    signal = round_signal(record)
    if not signal:
        return []
    parts = [f"{head} {s['verdict']} ({s['accuracy']:.0%} vs chance {s['chance_accuracy']:.0%}, loss "
             f"{s['loss']:.2f} vs {s['chance_loss']:.2f})" for head, s in signal.items()]
    moved = record.get("nmi_to_previous") or {}
    if moved:
        parts.append("clusters vs the previous round: NMI " + ", ".join(f"{m} {v:.2f}" for m, v in moved.items()))
    agreement = record.get("nmi_video_audio")
    if agreement is not None:
        parts.append(f"video vs audio clusters: NMI {agreement:.2f}" +
                     (f" (round 0: {first_agreement:.2f})" if first_agreement is not None and record["round"] else ""))
    where = next(iter(signal.values()))["on"]
    if where == "training" and record.get("heldout"):
        videos = min(h.get("videos", 0) for h in record["heldout"].values())
        where += (f" clips (only {videos} held-out videos, fewer than the {MIN_HELDOUT_VIDEOS} a verdict needs; "
                  "memorising also passes this)")
    else:
        where += " clips"
    lines = [f"is it learning? round {record['round']}, on the {where}: " + "; ".join(parts)]
    for head, s in signal.items():
        if s["verdict"] == "at chance":
            lines.append(
                f"warning: the {head.rsplit('_', 1)[0]} encoder did not fit its targets in round {record['round']} "
                f"({s['accuracy']:.0%}, chance {s['chance_accuracy']:.0%}), so this round teaches it nothing. Likely "
                f"causes: a round too short ({steps_per_round} steps run; raise epochs, and epochs_per_round unless "
                f"it is auto), "
                f"a learning rate too low or too high for this data (lr {lr:g}; try 2x either way), or more "
                "clusters than the data can tell apart (lower clusters)")
    # agreement_warns is False while either agreement is missing.
    if warn_nuisance and record["round"] and agreement_warns([first_agreement, agreement]):
        lines.append(nuisance_warning(first_agreement, agreement, record["round"]))
    empty = {m: c["empty"] for m, c in (record.get("clusters") or {}).items()
             if c.get("empty", 0) > len(c.get("sizes", [])) / 2}
    for m, count in empty.items():
        lines.append(f"warning: {count} of the {len(record['clusters'][m]['sizes'])} {m} clusters are empty: the "
                     "features collapsed; lower lr or clusters")
    return lines


def run_summary(history: list[dict], warn_nuisance: bool = True) -> str:
    """One line for the end of a run: each head's verdict in each round's last epoch. ``warn_nuisance``: whether
    a flat video-vs-audio agreement is read as a warning (the variant's ``warns_of_nuisance``)."""
    last_of_round = {}
    for record in history:
        last_of_round[record["round"]] = record
    heads: dict[str, list[str]] = {}
    for round_index in sorted(last_of_round):
        for head, s in round_signal(last_of_round[round_index]).items():
            heads.setdefault(head, []).append(f"{s['verdict']} ({s['accuracy']:.0%}/{s['chance_accuracy']:.0%})")
    if not heads:
        return "is it learning? no round has finished"
    at_chance = [head for head, verdicts in heads.items() if verdicts[-1].startswith("at chance")]
    weak = [head for head, verdicts in heads.items() if verdicts[-1].startswith("weak")]
    text = "; ".join(f"{head}: " + ", ".join(v) for head, v in heads.items())
    if at_chance:
        ending = (f" -- {', '.join(at_chance)} ended at chance: the last round taught those encoders nothing they "
                  "carry to new videos; see the warnings above")
    elif weak:
        ending = (f" -- {', '.join(weak)} ended weak, barely above chance: those encoders learnt little from the "
                  "last round")
    else:
        ending = " -- every head fit its targets"
    return f"is it learning? per round, accuracy/chance of each head: {text}{ending}" + _agreement(last_of_round,
                                                                                                  warn_nuisance)


def _agreement(last_of_round: dict[int, dict], warn_nuisance: bool = True) -> str:
    """How far the video and audio clusters agree, first round to last. Heads that fit their targets show
    the targets are learnable, not that they follow what the two modalities share (XDC's premise):
    clusters of per-video nuisance (colour, size, base pitch) are learnable too, and agree across the
    modalities no more than the random encoders' clusters of round 0 do."""
    values = [(r, last_of_round[r]["nmi_video_audio"]) for r in sorted(last_of_round)
              if last_of_round[r].get("nmi_video_audio") is not None]
    if not values:
        return ""
    (first, start), (last, end) = values[0], values[-1]
    if last == first:
        return f"; video vs audio clusters agree at NMI {start:.2f} (round {first})"
    return (f"; video vs audio clusters agree at NMI {end:.2f} in round {last}, against {start:.2f} in round {first}"
            + (f" (a rise under {AGREEMENT_RISE:g}: the clusters may follow per-video nuisance rather than what the "
               "two modalities share, and the encoders may be no better than random ones)"
               if warn_nuisance and agreement_warns([start, end]) else ""))


def chance_of_heads(learns: dict[str, tuple[str, ...]], labels: dict[str, np.ndarray],
                    sampled_by: np.ndarray) -> dict[str, dict]:
    """``chance`` for every head key (``video_0``...) of a variant, given per-video labels of each
    clustering on the training videos."""
    out = {}
    for modality, sources in learns.items():
        for h, source in enumerate(sources):
            if source not in labels:  # a cluster transfer from a variant without this clustering
                continue
            chance = chance_under_sampler(sampled_by, labels[source])
            out[f"{modality}_{h}"] = {"accuracy": chance.accuracy, "loss": chance.loss}
    return out


__all__ = ["Chance", "chance_under_sampler", "lift", "verdict", "round_signal", "agreement_warns", "describe_round",
           "run_summary", "chance_of_heads"]
