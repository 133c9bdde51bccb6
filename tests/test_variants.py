import numpy as np
import pytest

from xdc_fast.variants import VARIANTS, variant


def test_who_learns_what():
    y = {"video": np.array([0, 1]), "audio": np.array([1, 0]), "concat": np.array([2, 2])}
    xdc = VARIANTS["xdc"].targets(y)
    assert xdc["video"][0] is y["audio"] and xdc["audio"][0] is y["video"]  # cross-modal: the other's clusters
    mdc = VARIANTS["mdc"].targets(y)
    assert mdc["video"][0] is y["video"] and mdc["video"][1] is y["audio"]
    assert mdc["audio"][0] is y["audio"] and mdc["audio"][1] is y["video"]
    cdc = VARIANTS["cdc"].targets(y)
    assert cdc["video"][0] is y["concat"] and cdc["audio"][0] is y["concat"]
    assert VARIANTS["sdc-video"].targets(y) == {"video": [y["video"]]}
    assert VARIANTS["sdc-audio"].targets(y) == {"audio": [y["audio"]]}


def test_modalities_and_clusterings_follow_from_the_table():
    assert VARIANTS["xdc"].modalities == ("video", "audio") and VARIANTS["xdc"].clusterings == ("video", "audio")
    assert VARIANTS["cdc"].clusterings == ("video", "audio", "concat")
    assert VARIANTS["sdc-audio"].modalities == ("audio",)
    with pytest.raises(ValueError, match="unknown variant 'sdc'"):
        variant("sdc")


def test_the_cli_offers_exactly_the_table():
    from xdc_fast.cli import pretrain as command

    choices = next(p for p in command.params if p.name == "variant").type.choices
    assert tuple(choices) == tuple(VARIANTS)


def test_the_sampler_draws_over_the_first_encoders_first_head():
    assert VARIANTS["xdc"].sampled_by == "audio"  # the video encoder learns the audio clusters
    assert VARIANTS["cdc"].sampled_by == "concat" and VARIANTS["sdc-audio"].sampled_by == "audio"
