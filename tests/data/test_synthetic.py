import numpy as np
import torch

from xdc_fast.data.clips import ClipConfig
from xdc_fast.data.dataset import ClipDataset
from xdc_fast.data.synthetic import CLASS_PITCH, SyntheticSpec, make_synthetic_dataset



def test_same_seed_same_media(tmp_path):
    spec = SyntheticSpec(classes=2, videos_per_class=1, seconds=1.0, fps=8, width=32, height=32, seed=5)
    a = make_synthetic_dataset(tmp_path / "a", spec)
    b = make_synthetic_dataset(tmp_path / "b", spec)
    for pa, pb in zip(a, b):
        assert pa.relative_to(tmp_path / "a") == pb.relative_to(tmp_path / "b")
        assert pa.read_bytes() == pb.read_bytes()
    c = make_synthetic_dataset(tmp_path / "c", SyntheticSpec(**{**spec.__dict__, "seed": 6}))
    assert c[0].read_bytes() != a[0].read_bytes()


def test_both_modalities_carry_the_class(prepared):
    """Each video's strongest frequency is its class's pitch, and its shape moves; colours are nuisance."""
    import wave

    from xdc_fast.data.prepare import load_manifest
    from xdc_fast.data.synthetic import CLASS_NAMES

    colours = {}
    for record in load_manifest(prepared):
        with wave.open(str(prepared / record["audio"])) as w:
            samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)
        spectrum = np.abs(np.fft.rfft(samples))
        peak = np.fft.rfftfreq(len(samples), 1 / 16000)[int(np.argmax(spectrum[1:])) + 1]
        pitch = CLASS_PITCH[CLASS_NAMES.index(record["label_name"])]
        assert abs(peak - pitch) < 0.05 * pitch, (record["id"], peak, pitch)
        ds = ClipDataset(prepared, ClipConfig(frames=8, stride=1, resize_short=48, crop=48, eval_clips=1),
                         train=False, modalities=("video",))
        ds.items = [record]
        video = ds[0]["video"]
        assert float((video[:, 1:] - video[:, :-1]).abs().mean()) > 0.01  # the shape moves
        colours.setdefault(record["label"], []).append(video.mean(dim=(1, 2, 3)))
    # Within a class the mean colour varies as much as between classes: it cannot be the cue.
    within = np.mean([float(torch.stack(v).std(0).mean()) for v in colours.values()])
    assert within > 0.1
