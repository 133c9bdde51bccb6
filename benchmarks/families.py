"""The study over families: XDC with the defaults (only ``--arch tiny``) against random encoders on
procedural families that no setting was chosen on, and how well label-free signals predict the gain.

    python benchmarks/families.py --out benchmarks/results/families.md                 # 10 evaluation families x 2 seeds
    python benchmarks/families.py --families 0 1 2 --tuning --out /tmp/tuning.md       # tuning families only
    python benchmarks/families.py --set clusters=16 --tag k16 --out /tmp/k16.md ...
    python benchmarks/families.py --ceiling video --out ...                            # and the supervised ceiling
    python benchmarks/families.py --videos-per-class 16 --tuning --families 0 --out ...  # another data size

Each family (xdc_fast.data.families) draws which factor carries the class in each modality; a seed draws
the videos and the run. Families 0-7 are for tuning; evaluation families (8 and above) are refused with
``--tuning``, and a setting must never be chosen on a table of evaluation families. Resumable: every
finished run is appended to ``WORK/results.jsonl`` (the same records as benchmarks/variants.py) and never
recomputed. Not part of CI: a pretraining with the defaults takes minutes on a CPU.

The table gives, per family, XDC's gain over the random encoder of the same seed (same videos, split
and probe) in points of linear-probe video accuracy, then the mean over families (seeds averaged within
a family), the standard deviation across families and a 95% interval (Student's t). Each candidate
harm signal of the XDC run is set against the gain by Spearman's rank correlation over families x seeds.
``--variant`` pretrains one of XDC's baselines instead (mdc, cdc, sdc-video, sdc-audio) under its own tag, so
``--compare`` sets the variants side by side on the same families and seeds.
With ``--ceiling``, a column gives what full supervision reaches over the same random encoder: an encoder
trained from random weights with the true labels of the probe's own training split. Where that ceiling
stays near zero, the family's data is too small for any encoder to learn its class in that modality, and
XDC's gain there measures noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np

from variants import (CLASSES, PROBE_CLIPS, SECONDS, VIDEOS_PER_CLASS, audio_baseline_input, baseline_input, fed,
                      fed_by, parse_overrides, run_one)

from xdc_fast.data.families import TUNING_FAMILIES, draw_family
from xdc_fast.learning import AGREEMENT_RISE, agreement_warns
from xdc_fast.variants import VARIANTS

EVALUATION_FAMILIES = tuple(range(TUNING_FAMILIES, TUNING_FAMILIES + 10))
# The size the study judges at: at 16 videos per class even full supervision gains less over a random video
# encoder (+3.8 on the tuning families) than the scatter of one run, so no setting's video gain can be read
# there; at 48 it gains +13 to +17 (results/families_size48.md).
STUDY_VIDEOS_PER_CLASS = 48


def of_size(records: list[dict], videos_per_class: int) -> list[dict]:
    """The records of one data size (records written before sizes varied have variants.py's size)."""
    return [r for r in records if r.get("videos_per_class", VIDEOS_PER_CLASS) == videos_per_class]


# Runs that pretrain nothing, kept once per family and seed and shared by every tag.
BASELINES = ("random", "supervised")


def pretrained(record: dict) -> bool:
    return record["variant"] not in BASELINES


def variant_of_tag(records: list[dict], tag: str, asked: str | None = None) -> str:
    """What a run under ``tag`` pretrains: ``asked``, else what the tag's runs pretrained, else xdc. One tag
    names one variant, so that its table and its comparisons mix nothing."""
    taken = {r["variant"] for r in records if r["tag"] == tag and pretrained(r)}
    if asked is None:
        return taken.pop() if taken else "xdc"
    if taken - {asked}:
        raise ValueError(f"tag {tag!r} already names {taken.pop()} runs: give --variant {asked} a tag of its own")
    return asked


def per_family(by_family: dict, modality: str) -> list[float]:
    """The mean gain in ``modality`` of each family whose every run was scored on it (an SDC run is scored on one
    modality only)."""
    return [float(np.mean([r[modality] for r in runs])) for runs in by_family.values()
            if all(modality in r for r in runs)]


def random_runs(records: list[dict]) -> dict[tuple[str, int, str], dict]:
    """The random encoders' run of each (family, seed, inputs): the baseline every gain is paired with."""
    return {(r["family"], r["seed"], fed(r)): r for r in records if r["variant"] == "random"}


def gains(records: list[dict], tag: str) -> dict[int, list[dict]]:
    """Per family seed: per run seed, the pretrained encoders' gain over random per modality, with the run's
    signals."""
    random = random_runs(records)
    out: dict[int, list[dict]] = {}
    for r in records:
        key = (r["family"], r["seed"], fed(r))
        if r["tag"] != tag or not pretrained(r) or key not in random:
            continue
        base = random[key]["scores"]
        out.setdefault(int(r["family"][len("family"):]), []).append(
            {"seed": r["seed"], "signals": r.get("signals", {}),
             **{m: 100 * (r["scores"][m]["video_acc"] - base[m]["video_acc"]) for m in ("video", "audio")
                if m in r["scores"]}})  # an SDC run trains, and is scored on, one modality
    return out


def ceilings(records: list[dict], video_input: str = "rgb") -> dict[int, dict[str, list[float]]]:
    """Per family seed and modality: the supervised ceiling's gain over random (benchmarks/variants.py's
    ``supervised``), one value per run seed that has both, of encoders fed ``video_input``."""
    random = random_runs(records)
    out: dict[int, dict[str, list[float]]] = {}
    for r in records:
        key = (r["family"], r["seed"], fed(r))
        if r["variant"] != "supervised" or key not in random or key[2] != video_input:
            continue
        base = random[key]["scores"]
        for m, s in r["scores"].items():
            out.setdefault(int(r["family"][len("family"):]), {}).setdefault(m, []).append(
                100 * (s["video_acc"] - base[m]["video_acc"]))
    return out


def interval(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, std (ddof 1), and the 95% interval of the mean (Student's t)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan"), float("nan")
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(values) - 1) * std / np.sqrt(len(values)))
    return mean, std, mean - half, mean + half


def candidate_signals(run: dict) -> dict[str, float]:
    """Label-free numbers of one XDC run that might foretell its gain."""
    s = run["signals"]
    agreement = [v for v in s.get("nmi_video_audio", []) if v is not None]
    out = {}
    if agreement:
        out["video-audio agreement, last round"] = agreement[-1]
        out["video-audio agreement, last minus random (round 0)"] = agreement[-1] - agreement[0]
    stable = [np.mean(list(v.values())) for v in s.get("nmi_to_previous", []) if v]
    if stable:
        out["agreement with the previous round, last"] = float(stable[-1])
    for modality, agreement in (s.get("nmi_to_first") or [{}])[-1].items():
        out[f"{modality} clusters' agreement with round 0's, last clustering"] = agreement
    lifts = [np.mean(list(v.values())) for v in s.get("lift", []) if v]
    if lifts:
        out["mean head lift over chance, last round"] = float(lifts[-1])
    return out


def warning_record(runs: list[dict], rise: float = AGREEMENT_RISE) -> str:
    """How often the run's own warning (learning.agreement_warns) fires on runs that ended below random
    encoders in a modality, and on the others."""
    warns = lambda run: agreement_warns(run["signals"].get("nmi_video_audio", []), rise)  # noqa: E731
    worst = lambda run: min(run.get(m, np.inf) for m in ("video", "audio"))  # noqa: E731
    harmed = [warns(r) for r in runs if worst(r) < 0]
    fine = [warns(r) for r in runs if worst(r) >= 0]
    share = lambda flags: f"{sum(flags)} of {len(flags)}" + (f" ({np.mean(flags):.0%})" if flags else "")  # noqa: E731
    return f"warned on {share(harmed)} runs with a negative gain in a modality, on {share(fine)} others"


def threshold_sweep(runs: list[dict]) -> list[str]:
    """The warning's record over ``runs`` for a range of thresholds of the agreement's rise, to choose one."""
    return [f"- a rise under {rise:.2f}: {warning_record(runs, rise)}" for rise in np.arange(0.0, 0.105, 0.01)]


def report(records: list[dict], tag: str, tuning: bool = False, families: list[int] | None = None) -> str:
    """The study's table over ``families`` (default: every family with runs of ``tag``)."""
    from scipy import stats

    by_family = {f: runs for f, runs in gains(records, tag).items() if families is None or f in families}
    inputs = {fed(r) for r in records if r["tag"] == tag and pretrained(r)}
    name = variant_of_tag(records, tag).upper()
    fed_here = inputs.pop() if len(inputs) == 1 else "rgb"
    ceiling = {f: c for f, c in ceilings(records, fed_here).items() if f in by_family}
    ceiling_modalities = [m for m in ("video", "audio") if any(m in c for c in ceiling.values())]
    lines = [f"| family | video factor | audio factor | seeds | {name} − random, video | {name} − random, audio |"
             + "".join(f" supervised − random, {m} |" for m in ceiling_modalities),
             "|---|---|---|---|---|---|" + "---|" * len(ceiling_modalities)]
    for seed in sorted(by_family):
        family, runs = draw_family(seed, CLASSES), by_family[seed]
        cells = [f"{np.mean([r[m] for r in runs]):+.1f} (" + ", ".join(f"{r[m]:+.1f}" for r in runs) + ")"
                 if all(m in r for r in runs) else "—" for m in ("video", "audio")]
        cells += [f"{np.mean(ceiling[seed][m]):+.1f}" if m in ceiling.get(seed, {}) else "—"
                  for m in ceiling_modalities]
        lines.append(f"| {seed} | {family.video_factor} | {family.audio_factor} | "
                     f"{','.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if by_family:
        text += "\nAcross families (each family's seeds averaged first):\n\n"
        for m in ("video", "audio"):
            gains_by_family = per_family(by_family, m)
            if not gains_by_family:
                continue
            mean, std, low, high = interval(gains_by_family)
            spread = (f"std {std:.1f}, 95% interval [{low:+.1f}, {high:+.1f}]" if len(gains_by_family) > 1 else
                      "no spread from one family")
            text += (f"- {m}: mean {mean:+.1f}, {spread}, worst family {min(gains_by_family):+.1f} "
                     f"({len(gains_by_family)} families)\n")
        for m in ceiling_modalities:
            ceiling_by_family = [float(np.mean(c[m])) for c in ceiling.values() if m in c]
            seeds = sum(len(c[m]) for c in ceiling.values() if m in c)
            mean, std, low, high = interval(ceiling_by_family)
            text += (f"- the supervised ceiling, {m}: mean {mean:+.1f} over random" +
                     (f", 95% interval [{low:+.1f}, {high:+.1f}]" if len(ceiling_by_family) > 1 else "") +
                     f" ({len(ceiling_by_family)} families, {seeds} runs; about the most an encoder can gain at this "
                     "size)\n")
        runs = [r for family_runs in by_family.values() for r in family_runs]
        names = sorted({name for r in runs for name in candidate_signals(r)})
        if len(runs) >= 3 and names:
            text += "\nLabel-free signals against the gain (Spearman's rank correlation over families x seeds):\n\n"
            for name in names:
                have = [r for r in runs if name in candidate_signals(r)]
                values = [candidate_signals(r)[name] for r in have]
                for m in ("video", "audio"):
                    if not all(m in r for r in have):
                        continue
                    outcome = [r[m] for r in have]
                    if np.ptp(values) == 0 or np.ptp(outcome) == 0:
                        text += f"- {name} vs the {m} gain: ρ undefined (one of them is constant)\n"
                        continue
                    rho = stats.spearmanr(values, outcome).statistic
                    text += f"- {name} vs the {m} gain: ρ = {rho:+.2f} ({len(have)} runs)\n"
        text += (f"\nThe run's own warning (video-vs-audio agreement rising less than {AGREEMENT_RISE:g} from the "
                 f"random encoders' round 0 to the last round): {warning_record(runs)}.\n")
        if tuning:  # where the threshold is chosen: the same record for other values of it
            text += "".join(line + "\n" for line in threshold_sweep(runs))
    return text


def settings_of(record: dict) -> str:
    """A run's settings as a table names them; a run that took a default since changed says which."""
    overrides = record.get("overrides") or {}
    named = ([f"variant={record['variant']}"] if record["variant"] != "xdc" else []) + \
        [f"{k}={v}" for k, v in overrides.items()]
    if "video_input" not in overrides and "audio_input" not in overrides and fed(record) != fed_by({}):
        named.append(f"fed {fed(record)} (then the default)")
    return ", ".join(named) or "the defaults"


def compare(records: list[dict], tags: list[str], families: list[int], sweep: bool = False) -> str:
    """Configurations side by side on the family seeds (and run seeds) every one of them has run, so
    each row is measured on the same videos: the table settings are chosen from, on tuning families.
    ``sweep`` adds the warning's record over all those runs for a range of thresholds, to choose it."""
    by_tag = {tag: gains(records, tag) for tag in tags}
    runs_of = {tag: {(f, r["seed"]) for f, runs in got.items() if f in families for r in runs}
               for tag, got in by_tag.items()}
    shared = set.intersection(*runs_of.values()) if runs_of else set()
    # Each tag's runs on the shared (family, seed) pairs only, by family.
    kept = {tag: {f: [r for r in runs if (f, r["seed"]) in shared] for f, runs in got.items()}
            for tag, got in by_tag.items()}
    kept = {tag: {f: runs for f, runs in got.items() if runs} for tag, got in kept.items()}
    settings = {r["tag"]: settings_of(r) for r in records if pretrained(r)}
    lines = [f"Runs every configuration has (family, seed): {', '.join(f'{f}/{s}' for f, s in sorted(shared))}.", "",
             "| tag | settings | video gain: mean, std, worst family | audio gain: mean, std, worst family | "
             "warning on runs below random |", "|---|---|---|---|---|"]
    for tag in tags:
        runs = [r for family_runs in kept[tag].values() for r in family_runs]
        cells = []
        for m in ("video", "audio"):
            gains_by_family = per_family(kept[tag], m)
            if not gains_by_family:
                cells.append("-")
                continue
            mean, std, _, _ = interval(gains_by_family)
            cells.append(f"{mean:+.1f}, {std:.1f}, {min(gains_by_family):+.1f}")
        lines.append(f"| {tag} | {settings.get(tag, '?')} | " + " | ".join(cells) + f" | {warning_record(runs)} |")
    if sweep:
        every = [r for got in kept.values() for family_runs in got.values() for r in family_runs]
        lines += ["", f"The warning over these {len(every)} runs for other thresholds of the agreement's rise:", ""]
        lines += threshold_sweep(every)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", type=int, default=list(EVALUATION_FAMILIES),
                        help="family seeds (default: the first ten evaluation families)")
    parser.add_argument("--tuning", action="store_true", help="refuse any evaluation family (for choosing settings)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="PretrainConfig override (default: none, the command's defaults)")
    parser.add_argument("--tag", default="defaults", help="name of this configuration in the results")
    parser.add_argument("--variant", choices=tuple(VARIANTS),
                        help="what to pretrain (default: what the tag's runs pretrained, xdc for a new tag; the others "
                             "are XDC's baselines, each under a tag of its own)")
    parser.add_argument("--work", type=Path, default=Path("families-work"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/families.md"))
    parser.add_argument("--videos-per-class", type=int, default=STUDY_VIDEOS_PER_CLASS,
                        help=f"data size of every family and seed (default {STUDY_VIDEOS_PER_CLASS}); runs of each "
                             "size are kept apart in the records and the tables")
    parser.add_argument("--ceiling", nargs="+", default=[], choices=("video", "audio"), metavar="MODALITY",
                        help="also train the supervised ceiling of these modalities per family and seed: an encoder "
                             "trained from random weights with the true labels on the probe's split")
    parser.add_argument("--compare", nargs="+", metavar="TAG",
                        help="run nothing: write these configurations' gains side by side on --families to --out")
    args = parser.parse_args()
    if args.tuning and any(seed >= TUNING_FAMILIES for seed in args.families):
        parser.error(f"--tuning takes only tuning families (below {TUNING_FAMILIES})")
    if args.compare:
        records = of_size([json.loads(line) for line in (args.work / "results.jsonl").read_text().splitlines()],
                          args.videos_per_class)
        text = (f"# Configurations compared on families {', '.join(map(str, args.families))}\n\n"
                f"{datetime.date.today()}, `python benchmarks/families.py --compare`, {CLASSES} classes x "
                f"{args.videos_per_class} videos per family and seed: each configuration's gain over random encoders "
                "in points of probe video accuracy, per family (seeds averaged), mean and std across families.\n\n"
                + compare(records, args.compare, args.families, sweep=args.tuning))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(text)
        return
    overrides = parse_overrides(args.overrides)
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.work / "results.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    records = of_size(records, args.videos_per_class)
    try:
        args.variant = variant_of_tag(records, args.tag, args.variant)
    except ValueError as error:
        parser.error(f"{results}: {error}")
    done = {(r["family"], r["seed"], r["variant"], r["tag"]) for r in records}
    baselines = set(random_runs(records))
    for family_seed in args.families:
        family = f"family{family_seed:03d}"
        for seed in args.seeds:
            for variant in ("random",) + (("supervised",) if args.ceiling else ()) + (args.variant,):
                # Random encoders and the ceiling do not depend on the settings: one per family and seed serves
                # every tag (a random encoder per input); the ceiling trains only the modalities it lacks.
                if variant == "supervised":
                    fed_now = fed_by(overrides)
                    have = {m for r in records if r["variant"] == variant and (r["family"], r["seed"]) == (family, seed)
                            and fed(r) == fed_now for m in r["scores"]}
                    missing = [m for m in args.ceiling if m not in have]
                    if not missing:
                        continue
                    record = run_one(args.work, family, seed, variant,
                                     {"modalities": missing, "video_input": baseline_input(overrides),
                                      "audio_input": audio_baseline_input(overrides)},
                                     args.tag, args.videos_per_class)
                else:
                    baseline = (family, seed, fed_by(overrides))
                    if (variant == "random" and baseline in baselines) or (family, seed, variant, args.tag) in done:
                        continue
                    record = run_one(args.work, family, seed, variant, overrides, args.tag, args.videos_per_class)
                    baselines.add(baseline)
                records.append(record)
                done.add((family, seed, variant, args.tag))
                with results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{family} seed {seed} {variant}: " + ", ".join(
                    f"{m} {s['video_acc']:.1%}" for m, s in record["scores"].items()) + f" ({record['seconds']:.0f} s)",
                    flush=True)
    settings = ", ".join(f"`{k}: {v}`" for k, v in overrides.items()) or "the defaults"
    name = args.variant.upper()
    title = f"{name} on the tuning families, where settings are chosen" if args.tuning else \
        f"{name} on families no setting was chosen on"
    text = (f"# {title}\n\n{datetime.date.today()}, `python benchmarks/families.py`: "
            f"{CLASSES} classes x {args.videos_per_class} videos of {SECONDS:g} s per family and seed; `--arch tiny` "
            f"and {settings} (tag `{args.tag}`); linear probe ({PROBE_CLIPS} clips per video) on a seeded stratified 30% "
            f"test split, chance {1 / CLASSES:.1%}. Gains in points of video accuracy.\n\n" +
            report(records, args.tag, args.tuning, args.families))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
