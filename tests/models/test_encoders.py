import pytest
import torch
import torchvision

from xdc_fast.models import build_audio_encoder, build_video_encoder, load_video_weights


def test_full_video_encoder_is_torchvision_r2plus1d_18_without_classifier():
    reference = torchvision.models.video.r2plus1d_18(weights=None)
    ours = build_video_encoder("r2plus1d_18")
    theirs = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    # Every weight and statistic named as theirs; the one entry of ours alone records what the encoder is fed.
    assert {k: v.shape for k, v in ours.state_dict().items() if k != "frame_differences"} == theirs
    assert set(ours.state_dict()) - set(theirs) == {"frame_differences"}
    dropped = load_video_weights(ours, reference.state_dict())  # strict apart from the classifier
    assert sorted(dropped) == ["fc.bias", "fc.weight"]
    assert ours.video_input == "rgb"
    reference.fc = torch.nn.Identity()
    reference.eval(), ours.eval()
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(clip), reference(clip))
    assert ours.feature_dim == 512


def test_xdc_release_batchnorm_eps():
    model = build_video_encoder("r2plus1d_18", bn_eps=1e-3)
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)}
    assert eps == {1e-3}


def test_tiny_video_encoder_is_the_same_architecture_narrower():
    tiny, full = build_video_encoder("tiny"), build_video_encoder("r2plus1d_18")
    assert sum(p.numel() for p in tiny.parameters()) < sum(p.numel() for p in full.parameters()) / 30  # 0.8M against 31M
    features = tiny(torch.randn(2, 3, 8, 56, 56))
    assert features.shape == (2, tiny.feature_dim) == (2, 128)
    # Same module structure: every tiny parameter name exists in the full model.
    assert set(tiny.state_dict()) <= set(full.state_dict())


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("tiny", 128)])
def test_audio_encoder_on_log_mel(arch, dim):
    model = build_audio_encoder(arch)
    assert model(torch.randn(2, 1, 40, 101)).shape == (2, dim) and model.feature_dim == dim


def test_audio_resnet18_follows_torchvision_names():
    reference = torchvision.models.resnet18(weights=None).state_dict()
    ours = build_audio_encoder("resnet18").state_dict()
    assert set(ours) - {"centred_input"} == {k for k in reference if not k.startswith("fc.")}
    assert ours["conv1.weight"].shape == (64, 1, 7, 7)  # one input channel: the log-mel


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown video arch"):
        build_video_encoder("resnet50")
    with pytest.raises(ValueError, match="unknown audio arch"):
        build_audio_encoder("vgg")


@pytest.mark.parametrize("name", ["tiny", "r2plus1d_18"])
def test_each_arch_of_the_table_builds_encoders_of_its_feature_width(name):
    from xdc_fast.data.clips import clip_for_arch
    from xdc_fast.models import ARCHS

    arch = ARCHS[name]
    video, audio = build_video_encoder(name), build_audio_encoder(name)
    assert video.feature_dim == audio.feature_dim == arch.feature_dim
    clip = clip_for_arch(name)
    assert (clip.resize_short, clip.crop) == (arch.geometry["resize_short"], arch.geometry["crop"])


def test_the_default_arch_follows_the_device():
    from xdc_fast.models import ARCHS, default_arch

    assert ARCHS[default_arch("cpu")].meant_for == "cpu" and ARCHS[default_arch("cuda")].meant_for == "cuda"


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_2d_views_give_the_conv3d_outputs_and_gradients_with_the_same_parameters(layout):
    """Oracle: the same encoder with its Conv3d modules, in float64; parameters and their names unchanged,
    and every (2+1)D convolution changed but the temporally strided shortcut."""
    from xdc_fast.models.r2plus1d import Conv3dOnViews, use_2d_views

    torch.manual_seed(0)
    reference = build_video_encoder("tiny").double().eval()
    views = build_video_encoder("tiny").double().eval()
    views.load_state_dict(reference.state_dict())
    changed = use_2d_views(views)
    convs = [m for m in views.modules() if isinstance(m, torch.nn.Conv3d)]
    strided_shortcuts = [m for m in convs if m.kernel_size == (1, 1, 1) and m.stride[0] == 2]
    assert changed == len(convs) - len(strided_shortcuts) and len(strided_shortcuts) == 3
    assert all(type(m) is torch.nn.Conv3d for m in strided_shortcuts)
    assert list(views.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 4, 24, 24, dtype=torch.float64).contiguous(memory_format=layout)
    outputs = []
    for model in (reference, views):
        model.zero_grad()
        out = model(x)
        out.pow(2).sum().backward()
        outputs.append((out, [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(outputs[0][0], outputs[1][0], atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(outputs[0][1], outputs[1][1]))
    assert use_2d_views(views, on=False) == changed
    assert not any(isinstance(m, Conv3dOnViews) for m in views.modules())


def test_residual_input_is_the_rgb_network_on_frame_differences():
    """Oracle: the same weights fed the differences of consecutive frames, computed here in float64."""
    torch.manual_seed(0)
    residual = build_video_encoder("tiny", video_input="residual").double().eval()
    rgb = build_video_encoder("tiny", video_input="rgb").double().eval()
    rgb.load_state_dict({k: v for k, v in residual.state_dict().items() if k != "frame_differences"})
    assert (residual.video_input, rgb.video_input) == ("residual", "rgb")
    clip = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    differences = torch.stack([clip[:, :, t + 1] - clip[:, :, t] for t in range(7)], dim=2)
    with torch.no_grad():
        torch.testing.assert_close(residual(clip), rgb(differences))
        # What stands still cancels: a static scene under the same motion gives the same features.
        scene = torch.randn(1, 3, 1, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(residual(clip + scene), residual(clip))
        assert not torch.allclose(rgb(clip + scene), rgb(clip))


def test_what_the_encoder_is_fed_travels_with_its_state_dict():
    residual_state = build_video_encoder("tiny", video_input="residual").state_dict()
    loaded = build_video_encoder("tiny", video_input="rgb")  # built for frames: the state decides
    loaded.load_state_dict(residual_state)
    assert loaded.video_input == "residual" and int(loaded.frame_differences) == 1
    older = {k: v for k, v in residual_state.items() if k != "frame_differences"}  # written before the choice
    again = build_video_encoder("tiny", video_input="residual")
    again.load_state_dict(older)
    assert again.video_input == "rgb" and int(again.frame_differences) == 0
    with pytest.raises(ValueError, match="video_input"):
        build_video_encoder("tiny", video_input="flow")
    # Unasked, each arch is fed as its pretraining feeds it.
    assert build_video_encoder("tiny").video_input == "residual"
    assert build_video_encoder("r2plus1d_18").video_input == "rgb"


def test_centred_audio_input_is_the_logmel_network_on_the_clip_less_its_mean():
    """Oracle: the same weights fed each clip's log-mel less its mean, computed here in float64."""
    torch.manual_seed(0)
    centred = build_audio_encoder("tiny", audio_input="centred").double().eval()
    logmel = build_audio_encoder("tiny", audio_input="logmel").double().eval()
    logmel.load_state_dict({k: v for k, v in centred.state_dict().items() if k != "centred_input"})
    assert (centred.audio_input, logmel.audio_input) == ("centred", "logmel")
    clips = torch.randn(3, 1, 40, 51, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(centred(clips), logmel(clips - clips.mean(dim=(1, 2, 3), keepdim=True)))
        # A louder clip is the same log-mel plus a constant: centred, the features do not change.
        louder = clips + torch.tensor([2.0, -3.0, 0.5], dtype=torch.float64)[:, None, None, None]
        torch.testing.assert_close(centred(louder), centred(clips))
        assert not torch.allclose(logmel(louder), logmel(clips))


def test_what_the_audio_encoder_is_fed_travels_with_its_state_dict():
    centred_state = build_audio_encoder("tiny", audio_input="centred").state_dict()
    loaded = build_audio_encoder("tiny", audio_input="logmel")
    loaded.load_state_dict(centred_state)
    assert loaded.audio_input == "centred" and int(loaded.centred_input) == 1
    older = {k: v for k, v in centred_state.items() if k != "centred_input"}
    again = build_audio_encoder("tiny", audio_input="centred")
    again.load_state_dict(older)
    assert again.audio_input == "logmel" and int(again.centred_input) == 0
    with pytest.raises(ValueError, match="audio_input"):
        build_audio_encoder("tiny", audio_input="mfcc")
    assert build_audio_encoder("tiny").audio_input == build_audio_encoder("resnet18").audio_input == "logmel"
