import numpy as np
import pytest
import torch

from tests.conftest import prepared_synthetic
from xdc_fast import engine
from xdc_fast.data.clips import ClipConfig
from xdc_fast.data.dataset import ClipDataset


def test_schedule_warms_up_then_decays():
    rates = engine.lr_schedule(0.1, epochs=4, steps_per_epoch=10, warmup_epochs=1)
    assert len(rates) == 40 and rates[9] == pytest.approx(0.1) and rates[0] == pytest.approx(0.01)
    assert np.all(np.diff(rates[10:]) < 0) and rates[-1] < 0.001
    assert np.all(engine.lr_schedule(0.3, 2, 5, schedule="constant") == 0.3)
    assert np.array_equal(engine.rates_of_epoch(rates, 1, 10), rates[10:20])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepared_synthetic(tmp_path_factory.mktemp("engine"), classes=2, videos_per_class=3, seconds=1.5, fps=8,
                              width=32, height=32, seed=4)


def test_encode_clips_equals_the_encoders_applied_clip_by_clip(dataset):
    from xdc_fast.models import build_audio_encoder, build_video_encoder

    torch.manual_seed(0)
    encoders = {"video": build_video_encoder("tiny"), "audio": build_audio_encoder("tiny")}
    clips = ClipDataset(dataset, ClipConfig(frames=4, resize_short=32, crop=28, audio_seconds=0.5, n_mels=20,
                                            eval_clips=2), train=False)
    features, position = engine.encode_clips(encoders, clips, batch_size=4, device=torch.device("cpu"))
    assert position.tolist() == list(range(2 * len(clips.items)))  # video * eval_clips + clip
    with torch.no_grad():
        for m, encoder in encoders.items():
            expected = torch.stack([encoder.eval()(clips[i][m][None])[0] for i in range(len(clips))])
            assert np.allclose(features[m], expected.numpy(), atol=1e-5)


def test_shards_cover_every_video_once():
    class Items:
        items = list(range(7))

    shards = [engine.shard_items(Items(), rank, 3) for rank in range(3)]
    assert sorted(v for shard, _ in shards for v in shard.items) == list(range(7))
    assert all(list(positions) == shard.items for shard, positions in shards)


def test_supervised_step_lowers_the_loss_and_stops_on_nan():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 4))
    encoder.feature_dim = 4
    model = engine.EncodersWithHeads({"video": encoder}, {"video": [engine.new_head(4, 3)]})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    first = engine.supervised_step(model, [optimizer], {"video": x}, {"video": [y]})["video_0"][0]
    for _ in range(20):
        last = engine.supervised_step(model, [optimizer], {"video": x}, {"video": [y]})["video_0"][0]
    assert last < first
    with pytest.raises(FloatingPointError, match="the loss became nan at step 3"):
        engine.supervised_step(model, [optimizer], {"video": x * float("nan")}, {"video": [y]}, where="at step 3")
