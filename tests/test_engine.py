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


def test_the_audio_rate_follows_the_schedule_at_its_own_scale():
    modules = torch.nn.ModuleDict({"video": torch.nn.Linear(3, 2), "audio": torch.nn.Linear(3, 2)})
    before = {m: module.weight.detach().clone() for m, module in modules.items()}
    optimizer = torch.optim.SGD(engine.modality_groups(modules, lr=0.05, audio_lr=0.01), lr=0.05)
    engine.set_lr([optimizer], 0.5 * 0.05)  # a step halfway down a schedule
    for module in modules.values():
        module.weight.grad, module.bias.grad = torch.ones_like(module.weight), torch.ones_like(module.bias)
    optimizer.step()
    for m, rate in (("video", 0.025), ("audio", 0.005)):
        assert torch.allclose(before[m] - modules[m].weight.detach(), torch.full((2, 3), rate))
    # Unset or equal, one group: the optimizer of every checkpoint written before the audio rate existed.
    assert len(torch.optim.SGD(engine.modality_groups(modules, 0.05, None), lr=0.05).param_groups) == 1
    assert len(torch.optim.SGD(engine.modality_groups(modules, 0.05, 0.05), lr=0.05).param_groups) == 1


def test_an_mlp_head_matches_a_float64_oracle_and_a_seed_draws_the_same_heads():
    features = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    head = engine.new_head(6, 4, torch.Generator().manual_seed(3), kind="mlp")
    hidden, classifier = head[0], head[2]
    w1, b1, w2, b2 = (p.detach().double().numpy() for p in (hidden.weight, hidden.bias, classifier.weight,
                                                             classifier.bias))
    expected = np.maximum(features.double().numpy() @ w1.T + b1, 0) @ w2.T + b2
    assert np.allclose(head(features).detach().double().numpy(), expected, atol=1e-5)
    # The hidden layer keeps a ReLU's input variance (He), the classifier starts near silent as a linear head.
    assert abs(float(hidden.weight.detach().std()) - (2 / 6) ** 0.5) < 0.3
    assert float(classifier.weight.detach().abs().max()) < 0.06
    again = engine.new_head(6, 4, torch.Generator().manual_seed(3), kind="mlp")
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), again.parameters()))
    assert isinstance(engine.new_head(6, 4), torch.nn.Linear)
    with pytest.raises(ValueError, match="linear or mlp"):
        engine.new_head(6, 4, kind="deep")


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


def test_video_weights_in_channels_last_compute_the_same():
    """Only the 5-D weights change layout; values, and so the forward pass, stay the same."""
    model = _step_model(0)
    inputs, _ = _batch(torch.device("cpu"))
    with torch.no_grad():
        before = model.eval()(inputs)
        engine.video_weights_channels_last(model)
        after = model(inputs)
    for p in model.parameters():
        assert p.is_contiguous(memory_format=torch.channels_last_3d) if p.dim() == 5 else p.is_contiguous()
    assert any(p.dim() == 5 for p in model.parameters())
    for m in before:
        assert torch.allclose(before[m][0], after[m][0], atol=1e-5)


def test_compiled_encoders_keep_their_outputs_and_checkpoint_keys():
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x = torch.randn(4, 6)
    keys, expected = list(encoder.state_dict()), encoder(x)
    engine.compile_encoders({"audio": encoder}, False)
    assert getattr(encoder, "_compiled_call_impl", None) is None
    engine.compile_encoders({"audio": encoder}, True)
    assert encoder._compiled_call_impl is not None and list(encoder.state_dict()) == keys
    assert torch.allclose(encoder(x), expected, atol=1e-6)


def test_shift_log_mel_moves_each_clip_along_the_mel_axis():
    generator = torch.Generator().manual_seed(3)
    log_mel = torch.randn(4, 1, 9, 5, generator=generator)
    shifts = torch.tensor([0, 2, -3, 20])
    shifted = engine.shift_log_mel(log_mel, shifts).numpy()
    x = log_mel.numpy()
    for b, s in enumerate(shifts.tolist()):  # oracle: bin i takes bin i - s, clamped to the edges
        for i in range(9):
            assert np.array_equal(shifted[b, 0, i], x[b, 0, min(max(i - s, 0), 8)])
    assert np.array_equal(shifted[0], x[0])


def _colour_jitter_oracle(rgb: np.ndarray, brightness, contrast, saturation, hue) -> np.ndarray:
    """float64, pixel by pixel with colorsys: [T,H,W,3] in [0, 1] through torchvision's jitter order."""
    import colorsys

    grey = lambda x: x @ np.array([0.2989, 0.587, 0.114])  # noqa: E731  (ITU-R 601, as torchvision)
    x = np.clip(rgb * brightness, 0, 1)
    x = np.clip(contrast * x + (1 - contrast) * grey(x).mean(axis=(1, 2))[:, None, None, None], 0, 1)
    x = np.clip(saturation * x + (1 - saturation) * grey(x)[..., None], 0, 1)
    out = np.empty_like(x)
    for index in np.ndindex(x.shape[:3]):
        h, s, v = colorsys.rgb_to_hsv(*x[index])
        out[index] = colorsys.hsv_to_rgb((h + hue) % 1.0, s, v)
    return out


def test_jitter_colours_matches_a_pixelwise_float64_oracle_and_keeps_each_clip_consistent():
    from xdc_fast.data.clips import VIDEO_MEAN, VIDEO_STD

    generator = torch.Generator().manual_seed(5)
    rgb = torch.rand(3, 2, 4, 5, 3, generator=generator, dtype=torch.float64)  # [B,T,H,W,3] in [0, 1]
    mean, std = np.array(VIDEO_MEAN), np.array(VIDEO_STD)
    video = torch.from_numpy((rgb.numpy() - mean) / std).permute(0, 4, 1, 2, 3).float()  # [B,3,T,H,W]
    draws = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.9, 0.1, 0.3, 0.8], [0.0, 1.0, 0.99, 0.02]])
    strength = 0.4
    jittered = engine.jitter_colours(video, draws, strength)
    assert jittered.shape == video.shape and jittered.dtype == video.dtype
    got = jittered.permute(0, 2, 3, 4, 1).double().numpy() * std + mean
    for b, (u_brightness, u_contrast, u_saturation, u_hue) in enumerate(draws.double().tolist()):
        factor = lambda u: 1 + strength * (2 * u - 1)  # noqa: E731
        expected = _colour_jitter_oracle(rgb[b].numpy(), factor(u_brightness), factor(u_contrast),
                                         factor(u_saturation), strength / 2 * (2 * u_hue - 1))
        assert np.abs(got[b] - expected).max() < 2e-5, b
    assert np.abs(got[0] - rgb[0].numpy()).max() < 1e-5  # the middle draw changes nothing


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


def test_a_step_without_a_host_sync_takes_the_same_step_and_flags_a_nan_instead_of_raising():
    def fresh():
        torch.manual_seed(0)
        encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 4))
        encoder.feature_dim = 4
        model = engine.EncodersWithHeads({"video": encoder}, {"video": [engine.new_head(4, 3)]})
        return model, torch.optim.SGD(model.parameters(), lr=0.5)

    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    (synced, synced_opt), (deferred, deferred_opt) = fresh(), fresh()
    for _ in range(3):
        loss, correct = engine.supervised_step(synced, [synced_opt], {"video": x}, {"video": [y]})["video_0"]
        figures = engine.supervised_step(deferred, [deferred_opt], {"video": x}, {"video": [y]}, sync=False)
        assert isinstance(figures["video_0"][0], torch.Tensor) and bool(figures["finite"])
        assert float(figures["video_0"][0]) == loss and int(figures["video_0"][1]) == correct
    for a, b in zip(synced.parameters(), deferred.parameters()):
        assert torch.equal(a, b)
    figures = engine.supervised_step(deferred, [deferred_opt], {"video": x * float("nan")}, {"video": [y]}, sync=False)
    assert not bool(figures["finite"])


# ---- on a GPU (skipped without one; benchmarks/gpu_train_check.sh runs them) -------------------------

def _step_model(seed: int):
    from xdc_fast.models import build_audio_encoder, build_video_encoder

    torch.manual_seed(seed)
    encoders = {"video": build_video_encoder("tiny"), "audio": build_audio_encoder("tiny")}
    heads = {m: [engine.new_head(e.feature_dim, 5)] for m, e in encoders.items()}
    return engine.EncodersWithHeads(encoders, heads)


def _batch(device):
    generator = torch.Generator().manual_seed(1)
    inputs = {"video": torch.randn(4, 3, 4, 32, 32, generator=generator),
              "audio": torch.randn(4, 1, 20, 51, generator=generator)}
    targets = {m: [torch.randint(0, 5, (4,), generator=generator)] for m in inputs}
    return ({m: v.to(device) for m, v in inputs.items()}, {m: [t.to(device) for t in ts] for m, ts in targets.items()})


def _one_step(device, autocast_dtype=None):
    """Weights and losses after one SGD step from the same start; ``autocast_dtype`` forces autocast on
    (on the CPU too), None leaves ``engine.autocast`` as it is."""
    model = _step_model(0).to(device)
    start = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs, targets = _batch(device)
    original = engine.autocast
    if autocast_dtype is not None:
        engine.autocast = lambda d: torch.autocast(d.type, dtype=autocast_dtype)
    try:
        figures = engine.supervised_step(model, [optimizer], inputs, targets, max_grad_norm=10.0)
    finally:
        engine.autocast = original
    update = {k: v.detach().cpu() - start[k] for k, v in model.state_dict().items() if v.is_floating_point()}
    return figures, update


@pytest.mark.cuda
def test_a_bf16_step_on_cuda_is_as_close_to_fp32_as_bf16_allows():
    """The encoders run under bf16 autocast on CUDA, the heads in fp32. Oracle: the fp32 step on the CPU.
    bf16's 8-bit mantissa moves a weight update by more than any fixed tolerance could say, so the yardstick
    is the same step under bf16 autocast on the CPU: the GPU step must stray from fp32 no further than
    bf16 itself makes a step stray (with room for the other kernels' other summation orders)."""
    fp32_figures, fp32 = _one_step(torch.device("cpu"))
    _, cpu_bf16 = _one_step(torch.device("cpu"), torch.bfloat16)
    gpu_figures, gpu = _one_step(torch.device("cuda"))
    for key, (loss, _) in fp32_figures.items():
        assert gpu_figures[key][0] == pytest.approx(loss, rel=0.05)
    for name, reference in fp32.items():
        scale = float(reference.norm()) + 1e-12
        gpu_error = float((gpu[name] - reference).norm()) / scale
        bf16_error = float((cpu_bf16[name] - reference).norm()) / scale
        print(f"{name}: GPU {gpu_error:.4f}, CPU bf16 {bf16_error:.4f}")
        assert gpu_error <= 3 * bf16_error + 0.01, (name, gpu_error, bf16_error)


@pytest.mark.cuda
def test_one_nccl_rank_steps_like_a_single_process(tmp_path):
    """DDP over NCCL with one rank (torchrun) takes the same step as the model without DDP, and the CPU
    collectives of clustering and logging work beside it (NCCL alone refuses CPU tensors)."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "step.py"
    script.write_text(
        "import sys, torch\n"
        "from tests.test_engine import _batch, _step_model\n"
        "from xdc_fast import distributed as xdist, engine\n"
        "device = xdist.setup_device('cuda', 120)\n"
        "assert xdist.is_distributed() and 'cuda:nccl' in torch.distributed.get_backend()\n"
        "assert xdist.all_reduce_sum(torch.tensor([2.0])).tolist() == [2.0]\n"  # a CPU tensor: gloo
        "assert xdist.all_reduce_sum(torch.tensor([3.0], device=device)).tolist() == [3.0]\n"
        "assert xdist.all_gather_objects({'rank': 0}) == [{'rank': 0}]\n"
        "model = engine.distributed(_step_model(0).to(device), device)\n"
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "engine.supervised_step(model, [optimizer], *_batch(device))\n"
        "torch.save({k: v.cpu() for k, v in model.module.state_dict().items()}, sys.argv[1])\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
                             "127.0.0.1", "--master_port", str(port), str(script), str(tmp_path / "ddp.pt")],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(os.getcwd())))
    assert result.returncode == 0, result.stderr[-3000:]
    device = torch.device("cuda")
    model = _step_model(0).to(device)
    engine.supervised_step(model, [torch.optim.SGD(model.parameters(), lr=0.1)], *_batch(device))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name, weight in model.state_dict().items():
        assert torch.allclose(ddp[name], weight.cpu(), atol=1e-5), name
