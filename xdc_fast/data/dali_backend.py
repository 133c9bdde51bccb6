"""NVIDIA DALI decoding: one pipeline decodes the video clip and the audio window of each sample.

The samples come from a :class:`~xdc_fast.data.dataset.ClipDataset`'s plans through an external
source (the encoded file, the exact source frames, the resize target, crop position, flip, the WAV
bytes, the audio window and gain), so DALI decodes the very clips the PyAV backend would; only the
decoding, resizing and spectrogram arithmetic differ. On a GPU the video decodes on NVDEC
(``device="mixed"``) and every later step runs there; with ``device="cpu"`` the same graph runs on
the CPU, where DALI's decoder reads VP9/VP8/MJPEG but not H.264 (H.264 needs NVDEC).

``nvidia-dali-cuda130`` is optional and imported only here, only when this backend is chosen.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import numpy as np
import torch

from .clips import VIDEO_MEAN, VIDEO_STD

log = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class _PlanSource:
    """DALI external source: one batch of decoding inputs per call, from the dataset's plans."""

    def __init__(self, dataset, indices: list[int], batch_size: int):
        self.dataset, self.indices, self.batch_size = dataset, indices, batch_size
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
        columns: list[list[np.ndarray]] = [[] for _ in range(9)]
        config = self.dataset.config
        for index in chosen:
            record, plan = self.dataset.plan(index)
            room_w = max(1, plan.size[0] - config.crop)
            room_h = max(1, plan.size[1] - config.crop)
            values = (
                np.fromfile(record["path"], dtype=np.uint8),
                np.asarray(plan.frame_indices, dtype=np.int32),
                np.array([plan.size[0]], dtype=np.float32),
                np.array([plan.size[1]], dtype=np.float32),
                np.array([plan.crop_left / room_w if plan.size[0] > config.crop else 0.5], dtype=np.float32),
                np.array([plan.crop_top / room_h if plan.size[1] > config.crop else 0.5], dtype=np.float32),
                np.array([int(plan.flip)], dtype=np.int32),
                np.fromfile(self.dataset.root / record["audio"], dtype=np.uint8),
                np.array([int(round(plan.audio_start * config.sample_rate)), plan.gain], dtype=np.float32),
            )
            for column, value in zip(columns, values):
                column.append(value)
        return tuple(columns)


def build_pipeline(source: _PlanSource, config, batch_size: int, device: str, num_threads: int,
                   device_id: int | None):
    """The DALI graph; ``device`` "gpu" decodes on NVDEC and computes on the GPU, "cpu" stays on the CPU."""
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.math as dmath

    window = int(round(config.sample_rate * config.window_ms / 1000))
    hop = int(round(config.sample_rate * config.hop_ms / 1000))
    samples = int(round(config.audio_seconds * config.sample_rate))
    # torchaudio's window (periodic Hann), so the PyAV and DALI spectrograms are the same function.
    hann = torch.hann_window(window, periodic=True).tolist()
    gpu = device == "gpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id if gpu else None
                  )
    def clip_pipeline():
        encoded, frames, width, height, crop_x, crop_y, mirror, wav, audio_args = fn.external_source(
            source=source, num_outputs=9, batch=True, cycle="raise")
        video = fn.decoders.video(encoded, device="mixed" if gpu else "cpu", frames=frames, pad_mode="edge")
        video = fn.resize(video, resize_x=width, resize_y=height)
        video = fn.crop_mirror_normalize(
            video, crop_h=config.crop, crop_w=config.crop, crop_pos_x=crop_x, crop_pos_y=crop_y, mirror=mirror,
            mean=[255.0 * m for m in VIDEO_MEAN], std=[255.0 * s for s in VIDEO_STD], dtype=types.FLOAT,
            output_layout="CFHW")
        audio, _ = fn.decoders.audio(wav, dtype=types.FLOAT, downmix=True)  # CPU only in DALI
        start = fn.cast(audio_args[0:1], dtype=types.INT32)
        audio = fn.slice(audio, start, np.array([samples], dtype=np.int32), axes=[0], normalized_anchor=False,
                         normalized_shape=False, out_of_bounds_policy="pad")
        audio = audio * audio_args[1]
        if gpu:
            audio = audio.gpu()
        spectrum = fn.spectrogram(audio, nfft=window, window_length=window, window_step=hop, window_fn=hann,
                                  center_windows=True, reflect_padding=True, power=2)
        mel = fn.mel_filter_bank(spectrum, sample_rate=config.sample_rate, nfilter=config.n_mels, mel_formula="htk",
                                 normalize=False, freq_low=0.0, freq_high=config.sample_rate / 2)
        return video, dmath.log(mel + 1e-6)

    return clip_pipeline()


class DaliClipLoader:
    """Batches ``{video [B,3,T,H,W], audio [B,1,n_mels,frames], index, label, start, skipped}`` decoded
    by DALI, for the samples of ``dataset`` (a ClipDataset with both modalities) in ``indices`` order."""

    def __init__(self, dataset, batch_size: int = 8, *, device: str = "gpu", num_threads: int = 2,
                 device_id: int | None = 0, indices: Iterable[int] | None = None):
        if set(dataset.modalities) != {"video", "audio"}:
            raise ValueError("the DALI backend decodes both modalities; use the PyAV backend for one")
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.source = _PlanSource(dataset, self.indices, batch_size)
        self.pipeline = build_pipeline(self.source, dataset.config, batch_size, device, num_threads, device_id)
        self.pipeline.build()

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        self.source.batches.clear()
        produced = 0
        while True:
            try:
                video, audio = self.pipeline.run()
            except StopIteration:
                break
            chosen = self.source.batches[produced]
            produced += 1
            plans = [self.dataset.plan(i) for i in chosen]
            yield {
                "skipped": 0,
                "index": torch.tensor(chosen),
                "label": torch.tensor([-1 if r["label"] is None else r["label"] for r, _ in plans]),
                "start": torch.tensor([p.start for _, p in plans], dtype=torch.float64),
                "video": _to_torch(video),
                "audio": _to_torch(audio).unsqueeze(1),
            }
        self.pipeline.reset()


def _to_torch(batch) -> torch.Tensor:
    """A dense DALI batch as one torch tensor (on the GPU for GPU outputs, without a host copy)."""
    dense = batch.as_tensor()
    if "GPU" in type(dense).__name__:
        return torch.from_dlpack(dense)
    return torch.from_numpy(np.array(dense))


__all__ = ["DaliClipLoader", "dali_available"]
