"""NVIDIA DALI decoding: one pipeline decodes the video clip and/or the audio window of each sample.

The samples come from a :class:`~xdc_fast.data.dataset.ClipDataset`'s plans through an external
source (the encoded file, the exact source frames, the resize target, crop position, flip, the WAV
bytes, the audio window and gain), so DALI decodes the very clips the PyAV backend would; only the
decoding, resizing and spectrogram arithmetic differ. On a GPU the video decodes on NVDEC
(``device="mixed"``) and every later step runs there; with ``device="cpu"`` the same graph runs on
the CPU, where DALI's decoder reads VP9/VP8/MJPEG but not H.264 (H.264 needs NVDEC). A dataset of one
modality gets a graph of that branch alone (an audio-only dataset has no video; a video-only one needs
no WAV).

A clip DALI cannot decode does not end the epoch. DALI cannot drop one sample of a batch: an operator's
error fails the whole batch and leaves the pipeline unusable. So that batch's samples are decoded again
by the PyAV path (``dataset[i]``, None where it fails too, counted in ``skipped`` as PyAV counts them), the
pipeline is rebuilt for the samples after it, and the epoch goes on. Failures are rare, so the cost
(one batch on the CPU, one rebuild) is paid only where they happen; checking every file beforehand would
decode everything twice.

``nvidia-dali-cuda130`` is optional and imported only here, only when this backend is chosen.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import numpy as np
import torch

from ..errors import LoaderError
from .clips import VIDEO_MEAN, VIDEO_STD

log = logging.getLogger(__name__)

# What DALI's CPU video decoder reads (manifest ``video_codec`` names); anything else needs NVDEC.
CPU_CODECS = ("vp8", "vp9", "mjpeg")
VIDEO_INPUTS = ("encoded", "frames", "width", "height", "crop_x", "crop_y", "mirror")
AUDIO_INPUTS = ("wav", "audio_args")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def check_cpu_codecs(items, shards=None) -> None:
    """Refuse, in one line, a dataset whose videos DALI's CPU graph cannot decode (the shards' codec
    when the dataset reads clip shards)."""
    if shards is not None:
        other = [] if shards.video_codec in CPU_CODECS else [shards.video_codec]
    else:
        other = sorted({str(r.get("video_codec")) for r in items
                        if r.get("fps") and r.get("video_codec") not in CPU_CODECS})
    if other:
        raise LoaderError(f"DALI's CPU decoder reads {'/'.join(CPU_CODECS)} only, and this dataset holds "
                          f"{', '.join(other)} video: use --loader pyav (or auto) on the CPU, or --device cuda "
                          "for NVDEC")


class _PlanSource:
    """DALI external source: one batch of decoding inputs per call, from the dataset's plans."""

    def __init__(self, dataset, indices: list[int], batch_size: int):
        self.dataset, self.indices, self.batch_size = dataset, indices, batch_size
        self.video = "video" in dataset.modalities
        self.audio = "audio" in dataset.modalities
        self.position = 0
        self.batches: list[list[int]] = []  # the indices of every batch handed to DALI, in order

    def __iter__(self):
        self.position = 0
        return self

    def __next__(self):
        if self.position >= len(self.indices):
            raise StopIteration
        chosen = self.indices[self.position : self.position + self.batch_size]
        self.position += len(chosen)
        self.batches.append(chosen)
        columns: list[list[np.ndarray]] = [[] for _ in range(7 * self.video + 2 * self.audio)]
        for index in chosen:
            for column, value in zip(columns, self._inputs(index)):
                column.append(value)
        return tuple(columns)

    def _inputs(self, index: int) -> list[np.ndarray]:
        config = self.dataset.config
        record, plan = self.dataset.plan(index)
        values = []
        if self.video:
            room_w = max(1, plan.size[0] - config.crop)
            room_h = max(1, plan.size[1] - config.crop)
            shards = self.dataset.shards
            values += [
                _read(record["path"]) if shards is None else shards.member_array(record["id"], "mp4"),
                np.asarray(plan.frame_indices, dtype=np.int32),
                np.array([plan.size[0]], dtype=np.float32),
                np.array([plan.size[1]], dtype=np.float32),
                np.array([plan.crop_left / room_w if plan.size[0] > config.crop else 0.5], dtype=np.float32),
                np.array([plan.crop_top / room_h if plan.size[1] > config.crop else 0.5], dtype=np.float32),
                np.array([int(plan.flip)], dtype=np.int32),
            ]
        if self.audio:
            shards = self.dataset.shards
            values += [
                _read(self.dataset.root / record["audio"]) if shards is None else shards.member_array(record["id"], "wav"),
                np.array([int(round(plan.audio_start * config.sample_rate)), plan.gain], dtype=np.float32),
            ]
        return values


def _read(path) -> np.ndarray:
    """The file's bytes; an unreadable file gives no bytes, so its batch fails inside DALI (where the
    PyAV fallback takes it) rather than in this callback, whose errors DALI may raise a batch early."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError:
        return np.zeros(0, dtype=np.uint8)


def build_pipeline(source: _PlanSource, config, batch_size: int, device: str, num_threads: int,
                   device_id: int | None):
    """The DALI graph of the dataset's modalities; ``device`` "gpu" decodes on NVDEC and computes on the
    GPU, "cpu" stays on the CPU. Outputs: video (if asked for), then log-mel (if asked for)."""
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.math as dmath

    window = int(round(config.sample_rate * config.window_ms / 1000))
    hop = int(round(config.sample_rate * config.hop_ms / 1000))
    samples = int(round(config.audio_seconds * config.sample_rate))
    # torchaudio's window (periodic Hann), so the PyAV and DALI spectrograms are the same function.
    hann = torch.hann_window(window, periodic=True).tolist()
    gpu = device == "gpu"
    names = VIDEO_INPUTS * source.video + AUDIO_INPUTS * source.audio

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id if gpu else None
                  )
    def clip_pipeline():
        inputs = dict(zip(names, fn.external_source(source=source, num_outputs=len(names), batch=True,
                                                    cycle="raise")))
        outputs = []
        if source.video:
            video = fn.decoders.video(inputs["encoded"], device="mixed" if gpu else "cpu", frames=inputs["frames"],
                                      pad_mode="edge")
            video = fn.resize(video, resize_x=inputs["width"], resize_y=inputs["height"])
            video = fn.crop_mirror_normalize(
                video, crop_h=config.crop, crop_w=config.crop, crop_pos_x=inputs["crop_x"],
                crop_pos_y=inputs["crop_y"], mirror=inputs["mirror"], mean=[255.0 * m for m in VIDEO_MEAN],
                std=[255.0 * s for s in VIDEO_STD], dtype=types.FLOAT, output_layout="CFHW")
            outputs.append(video)
        if source.audio:
            audio_args = inputs["audio_args"]
            audio, _ = fn.decoders.audio(inputs["wav"], dtype=types.FLOAT, downmix=True)  # CPU only in DALI
            start = fn.cast(audio_args[0:1], dtype=types.INT32)
            audio = fn.slice(audio, start, np.array([samples], dtype=np.int32), axes=[0], normalized_anchor=False,
                             normalized_shape=False, out_of_bounds_policy="pad")
            audio = audio * audio_args[1]
            if gpu:
                audio = audio.gpu()
            spectrum = fn.spectrogram(audio, nfft=window, window_length=window, window_step=hop, window_fn=hann,
                                      center_windows=True, reflect_padding=True, power=2)
            mel = fn.mel_filter_bank(spectrum, sample_rate=config.sample_rate, nfilter=config.n_mels,
                                     mel_formula="htk", normalize=False, freq_low=0.0,
                                     freq_high=config.sample_rate / 2)
            outputs.append(dmath.log(mel + 1e-6))
        return tuple(outputs)

    return clip_pipeline()


# NVDEC engines per card (NVIDIA's video codec support matrix): one DALI pipeline drives about one, so
# a card is fed by as many pipelines as it has engines. Cards not listed get one pipeline.
NVDEC_ENGINES = {"H200": 7, "H100": 7, "GH200": 7, "A100": 5, "A800": 5, "A30": 4, "L4": 4, "L40": 3, "L40S": 3,
                 "A40": 2, "A10": 1, "T4": 2, "V100": 1}


def default_pipelines(device: str, device_id: int | None) -> int:
    """One pipeline per NVDEC engine of the card (see NVDEC_ENGINES); one on the CPU."""
    if device != "gpu" or not torch.cuda.is_available():
        return 1
    words = torch.cuda.get_device_name(device_id or 0).upper().replace("-", " ").split()
    return max((engines for card, engines in NVDEC_ENGINES.items() if card in words), default=1)


class _Lane:
    """One pipeline and its share of the batches (every ``pipelines``-th batch of the pass)."""

    def __init__(self, loader: "DaliClipLoader", indices: list[int]):
        self.rest = indices  # the samples this lane has not yet delivered
        self.source, self.pipeline = loader._build(indices)
        self.produced = 0  # batches delivered by the current pipeline


class DaliClipLoader:
    """Batches ``{video [B,3,T,H,W], audio [B,1,n_mels,frames], index, label, start, skipped}`` decoded
    by DALI (the dataset's modalities only), for the samples of ``dataset`` (a ClipDataset) in
    ``indices`` order, from the dataset's clip shards where it has them.

    ``pipelines`` DALI pipelines take the batches in turn (batch b to pipeline b % pipelines) and decode
    ahead concurrently, so a card's NVDEC engines work in parallel; batches come out in order. "auto":
    one per NVDEC engine of the card, one on the CPU.

    A batch DALI fails to decode is decoded by PyAV instead (see the module's notes); if DALI fails on
    each of the first ``GIVE_UP`` batches of a pass (a decoder that does not work here, not a bad file),
    PyAV decodes the rest of that pass and every later one, said once in the log."""

    GIVE_UP = 3

    def __init__(self, dataset, batch_size: int = 8, *, device: str = "gpu", num_threads: int = 2,
                 device_id: int | None = 0, indices: Iterable[int] | None = None, pipelines: int | str = "auto"):
        if device == "cpu" and "video" in dataset.modalities:
            check_cpu_codecs(dataset.items, dataset.shards)
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        self.num_threads = num_threads
        self.device_id = device_id
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        wanted = default_pipelines(device, device_id) if pipelines == "auto" else int(pipelines)
        if wanted < 1:
            raise LoaderError(f"DALI pipelines should be at least 1, got {pipelines}")
        self.pipelines = max(1, min(wanted, len(self)))
        self.fallbacks = 0  # batches DALI failed on, decoded by PyAV instead
        self.gave_up: str | None = None  # why PyAV decodes everything, once DALI failed systematically
        self.lanes = self._lanes()
        self._fresh = True  # the pipelines have not run yet (else they are rebuilt before the next pass)

    def _lanes(self) -> list[_Lane]:
        batches = [self.indices[i:i + self.batch_size] for i in range(0, len(self.indices), self.batch_size)]
        return [_Lane(self, [i for batch in batches[lane::self.pipelines] for i in batch])
                for lane in range(self.pipelines)]

    def _build(self, indices: list[int]):
        source = _PlanSource(self.dataset, indices, self.batch_size)
        pipeline = build_pipeline(source, self.dataset.config, self.batch_size, self.device, self.num_threads,
                                  self.device_id)
        pipeline.build()
        return source, pipeline

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        if self.gave_up is not None:
            yield from self._pyav_batches(self.indices)
            return
        if not self._fresh:
            self.lanes = self._lanes()
        self._fresh = False
        failures = successes = 0
        for number in range(len(self)):
            lane = self.lanes[number % self.pipelines]
            try:
                outputs = lane.pipeline.run()
            except StopIteration:
                break
            except Exception as error:  # noqa: BLE001 - DALI reports a bad file as an error of its batch
                if lane.produced >= len(lane.source.batches):
                    raise
                failed = lane.source.batches[lane.produced]
                failures += 1
                self.fallbacks += 1
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                log.warning("DALI could not decode a batch of %d clips (%s, e.g. %s); decoding them with PyAV",
                            len(failed), first_line, self.dataset.plan(failed[0])[0].get("path"))
                lane.rest = lane.rest[sum(len(b) for b in lane.source.batches[: lane.produced + 1]):]
                yield self._pyav_batch(failed)
                if successes == 0 and failures >= self.GIVE_UP:
                    self.gave_up = f"DALI failed on each of the first {failures} batches ({first_line})"
                    log.warning("%s; PyAV decodes the rest of this pass", self.gave_up)
                    later = [i for batch_number in range(number + 1, len(self))
                             for i in self._batch_of(batch_number)]
                    yield from self._pyav_batches(later)
                    return
                if lane.rest:  # the pipeline is unusable after an error: a new one takes the lane's rest
                    lane.source, lane.pipeline = self._build(lane.rest)
                    lane.produced = 0
                continue
            chosen = lane.source.batches[lane.produced]
            lane.produced += 1
            successes += 1
            yield self._dali_batch(chosen, outputs)
        for lane in self.lanes:
            lane.pipeline.reset()

    def _batch_of(self, number: int) -> list[int]:
        return self.indices[number * self.batch_size:(number + 1) * self.batch_size]

    def _dali_batch(self, chosen: list[int], outputs) -> dict:
        plans = [self.dataset.plan(i) for i in chosen]
        batch = {
            "skipped": 0,
            "index": torch.tensor(chosen),
            "label": torch.tensor([-1 if r["label"] is None else r["label"] for r, _ in plans]),
            "start": torch.tensor([p.start for _, p in plans]),  # float32, as collate_clips gives it
        }
        outputs = list(outputs)
        if "video" in self.dataset.modalities:
            batch["video"] = _to_torch(outputs.pop(0))
        if "audio" in self.dataset.modalities:
            batch["audio"] = _to_torch(outputs.pop(0)).unsqueeze(1)
        return batch

    def _pyav_batch(self, chosen: list[int]) -> dict:
        from .dataset import collate_clips

        return collate_clips([self.dataset[i] for i in chosen])

    def _pyav_batches(self, indices: list[int]) -> Iterator[dict]:
        for first in range(0, len(indices), self.batch_size):
            yield self._pyav_batch(indices[first : first + self.batch_size])


def _to_torch(batch) -> torch.Tensor:
    """A dense DALI batch as one torch tensor (on the GPU for GPU outputs, without a host copy)."""
    dense = batch.as_tensor()
    if "GPU" in type(dense).__name__:
        return torch.from_dlpack(dense)
    return torch.from_numpy(np.array(dense))


__all__ = ["DaliClipLoader", "dali_available", "check_cpu_codecs", "default_pipelines", "CPU_CODECS", "NVDEC_ENGINES"]
