"""Random clips from clip shards (`prepare --shards`) against the original files, on footage shaped like
Kinetics' or VGGSound's: 640x360 H.264 at 30 fps, a keyframe every 250 frames, B-frames.

    python benchmarks/shards_vs_files.py --out benchmarks/results/loader_cpu.md

Writes the media (moving texture, so the encoder has real work, and a tone track), prepares it, shards
it with the defaults, then times `bench loader`'s PyAV rows on the same clips from files and from shards,
interleaved per worker count. Also reports bytes per video and frames decoded per clip (from the
keyframe before a clip to its last frame), which is what the shards cut.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from xdc_fast.bench.loader import bench_loader, format_loader_table, loader_json
from xdc_fast.data.clips import ClipConfig
from xdc_fast.data.dataset import ClipDataset
from xdc_fast.data.prepare import load_manifest, prepare
from xdc_fast.data.shards import ShardReader, write_shards


def write_footage(path: Path, seconds: float, seed: int, fps: int = 30, width: int = 640, height: int = 360) -> None:
    import av

    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, size=(height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    texture = np.kron(texture, np.ones((8, 8, 1), np.uint8))
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"g": "250", "bf": "3", "preset": "veryfast", "crf": "23"}
        audio = container.add_stream("aac", rate=16000, layout="mono")
        frames = int(seconds * fps)
        for i in range(frames):
            dy, dx = (i // 2) % 16, i % 16  # a slow pan over the texture
            image = texture[dy:dy + height, dx:dx + width].astype(np.int16)
            # Sensor noise and a moving object: without them the pan costs the decoder almost nothing per
            # frame, far from camera footage (measured there: ~8 random clips/s per core).
            image += rng.integers(-12, 13, size=image.shape, dtype=np.int16)
            y, x = (i * 3) % (height - 80), (i * 7) % (width - 80)
            image[y:y + 80, x:x + 80] = 255 - image[y:y + 80, x:x + 80]
            image = np.clip(image, 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        t = np.arange(int(seconds * 16000)) / 16000
        tone = (0.2 * np.sin(2 * np.pi * (300 + 50 * seed) * t)).astype(np.float32)[None]
        for start in range(0, tone.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start:start + 1024]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode(None):
            container.mux(packet)


def keyframe_indices(source, fps: float) -> np.ndarray:
    import av

    with av.open(source) as container:
        stream = container.streams.video[0]
        base = stream.start_time or 0
        return np.array(sorted(int(round(float((p.pts - base) * stream.time_base) * fps))
                               for p in container.demux(stream) if p.size and p.is_keyframe and p.pts is not None))


def frames_decoded_per_clip(data: ClipDataset, order: list[int], reader: ShardReader | None) -> float:
    """Mean frames a seek-and-decode reads per clip: from the keyframe at or before its first frame to its
    last frame."""
    cache, total = {}, 0
    for index in order:
        record, plan = data.plan(index)
        if record["id"] not in cache:
            source = record["path"] if reader is None else reader.member(record["id"], "mp4")
            cache[record["id"]] = keyframe_indices(source, record["fps"])
        keys = cache[record["id"]]
        first, last = int(min(plan.frame_indices)), int(max(plan.frame_indices))
        total += last - int(keys[keys <= first].max()) + 1
    return total / len(order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--out", required=True, help="markdown file; the JSON goes beside it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="xdc-fast-shards-") as work:
        root = Path(work)
        (root / "media" / "footage").mkdir(parents=True)
        t0 = time.perf_counter()
        for v in range(args.videos):
            write_footage(root / "media" / "footage" / f"v{v}.mp4", args.seconds, seed=v)
        print(f"... wrote {args.videos} videos in {time.perf_counter() - t0:.0f} s", flush=True)
        prepare(root / "media", root / "ds", workers=2, progress=False)
        t0 = time.perf_counter()
        sharding = write_shards(root / "ds", workers=2, progress=False)
        shard_seconds = time.perf_counter() - t0
        records = load_manifest(root / "ds")
        reader = ShardReader.open(root / "ds")
        file_bytes = np.mean([Path(r["path"]).stat().st_size for r in records])
        shard_bytes = np.mean([len(reader.member(r["id"], "mp4").getvalue()) for r in records])
        config = ClipConfig(frames=16, stride=1, resize_short=128, crop=112)
        data = ClipDataset(root / "ds", config, seed=0, media="files")
        order = [i % len(data) for i in range(args.clips)]
        decoded = {"files": frames_decoded_per_clip(data, order, None),
                   "shards": frames_decoded_per_clip(data, order, reader)}
        rows = bench_loader(str(root / "ds"), workers=tuple(args.workers), clips=args.clips, config=config,
                            progress=lambda m: print(f"... {m}", flush=True))

    table = format_loader_table(rows)
    by_name = {(r.name, r.workers): r.clips_per_second for r in rows if r.clips}
    ratios = {w: by_name[("pyav from clip shards", w)] / by_name[("pyav (seek + WAV window)", w)]
              for w in args.workers}
    plan = sharding["plan"]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary = [
        f"{args.videos} videos of {args.seconds:.0f} s, 640x360 H.264 at 30 fps, keyframe every 250 frames, "
        f"3 B-frames (CRF 23), with a 16 kHz tone track; sharded with the defaults ({plan['short_side']} short side, "
        f"GOP {plan['gop']}, no B-frames, CRF {plan['crf']}, x264 tune {plan['tune'] or 'none'}) in "
        f"{shard_seconds:.0f} s on 2 processes.",
        "",
        "| | files | shards |",
        "|---|---:|---:|",
        f"| video bytes per video | {file_bytes / 1e6:.2f} MB | {shard_bytes / 1e6:.2f} MB |",
        f"| frames decoded per clip (keyframe to last frame) | {decoded['files']:.1f} | {decoded['shards']:.1f} |",
        *(f"| clips/s, {w} worker(s) | {by_name[('pyav (seek + WAV window)', w)]:.1f} | "
          f"{by_name[('pyav from clip shards', w)]:.1f} ({ratios[w]:.1f}x) |" for w in args.workers),
    ]
    text = "\n".join(summary)
    print(text + "\n\n" + table)
    with open(args.out, "w") as f:
        f.write(f"# Clip loading from shards and from files (cpu), {stamp}\n\n"
                "Produced by `benchmarks/shards_vs_files.py` on the 2-core development machine (shared: read "
                "the ratios, measured in one run).\n\n" + text + "\n\n" + table + "\n")
    with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump({"rows": loader_json(rows), "decoded_frames_per_clip": decoded, "video_bytes":
                   {"files": file_bytes, "shards": shard_bytes}, "speedup": ratios, "sharding": sharding,
                   "shard_seconds": shard_seconds}, f, indent=2)


if __name__ == "__main__":
    main()
