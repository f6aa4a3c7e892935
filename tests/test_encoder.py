"""Backbones from local weight files: timm's own loading and stem adaptation, never a download."""

import re
import socket

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import adapt_input_conv

from spine.cervical.models.fracture import Seq25d
from spine.core.models.encoder import build_encoder
from spine.lumbar.models.classifier import Cnn25d
from spine.lumbar.models.heatmap import SliceHeatmapNet

NAME = "test_resnet"  # a tiny timm ResNet (0.5 M weights) with a pretrained config like the real ones
STEM = "conv1.0.weight"  # its first convolution (pretrained_cfg["first_conv"] + ".weight")
LATER = "layer4.0.conv2.weight"  # a weight far from the stem: it must arrive unchanged


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach the network (socket, URL or Hugging Face download) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", refuse)


@pytest.fixture(scope="module")
def saved():
    """The 3-channel model's weights, as an ImageNet file would hold them (random, but known)."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False)
    for buf in model.state_dict().values():  # BN statistics away from their init, so loading shows
        if buf.dtype.is_floating_point:
            buf.add_(torch.rand_like(buf))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _write(state: dict, folder, fmt: str):
    if fmt == "safetensors":
        path = folder / "weights.safetensors"
        save_file(state, path)
    else:
        wrapped = {"pth": state, "state_dict": {"state_dict": state, "epoch": 3}, "model": {"model": state}}
        path = folder / f"weights_{fmt}.pth"
        torch.save(wrapped[fmt], path)
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "state_dict", "model"])
@pytest.mark.parametrize("in_chans", [1, 3, 5, 9])
@pytest.mark.parametrize("features_only", [True, False])
def test_weights_arrive_in_any_number_of_channels(saved, tmp_path, fmt, in_chans, features_only):
    path = _write(saved, tmp_path, fmt)
    state = build_encoder(NAME, in_chans, str(path), features_only=features_only).state_dict()
    torch.testing.assert_close(state[LATER], saved[LATER], rtol=0, atol=0)
    torch.testing.assert_close(state["bn1.running_mean"], saved["bn1.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(state[STEM], adapt_input_conv(in_chans, saved[STEM]), rtol=0, atol=0)
    assert state[STEM].shape[1] == in_chans
    assert "fc.weight" not in state  # the ImageNet classifier is dropped


def test_without_a_file_the_weights_are_random(saved):
    state = build_encoder(NAME, 3, None).state_dict()
    assert not torch.equal(state[LATER], saved[LATER])


def test_every_timm_model_of_the_pipeline_takes_the_file(saved, tmp_path):
    path = str(_write(saved, tmp_path, "safetensors"))
    heads = {"n_groups": 3, "n_conditions": 5, "n_levels": 5}
    models = {
        "lumbar localizer": SliceHeatmapNet(NAME, n_points=5, in_chans=3, checkpoint=path),
        "lumbar 2.5D": Cnn25d(NAME, n_views=3, n_slices=5, heads=heads, checkpoint=path),
        "cervical 2.5D": Seq25d(NAME, n_windows=2, depth=12, n_seq=4, checkpoint=path),
    }
    for what, model in models.items():
        state = model.encoder.state_dict()
        assert torch.equal(state[LATER], saved[LATER]), what


def test_a_file_of_another_backbone_names_the_file_and_the_key(saved, tmp_path):
    other = timm.create_model("resnet10t", pretrained=False).state_dict()
    path = _write(other, tmp_path, "safetensors")
    with pytest.raises(ValueError, match=r"weights\.safetensors does not fit backbone test_resnet") as err:
        build_encoder(NAME, 3, str(path))
    key = next(k for k in saved if k in other and other[k].shape != saved[k].shape)
    assert repr(key) in str(err.value)
    assert str(tuple(saved[key].shape)) in str(err.value) and str(tuple(other[key].shape)) in str(err.value)


def test_a_missing_key_or_a_one_channel_stem_is_named(saved, tmp_path):
    partial = {k: v for k, v in saved.items() if k != LATER}
    with pytest.raises(ValueError, match=rf"{LATER!r}, expected shape .* file has no such key"):
        build_encoder(NAME, 3, str(_write(partial, tmp_path, "pth")))
    gray = {**saved, STEM: saved[STEM].sum(1, keepdim=True)}
    expected = f"{STEM!r}, expected shape {tuple(saved[STEM].shape)}, file shape {tuple(gray[STEM].shape)}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        build_encoder(NAME, 1, str(_write(gray, tmp_path, "model")))


def test_unreadable_or_absent_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth.*set `checkpoint`"):
        build_encoder(NAME, 3, str(tmp_path / "nowhere.pth"))
    whole = tmp_path / "whole_model.pth"
    torch.save(timm.create_model(NAME, pretrained=False), whole)  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="whole_model.pth: not a plain weights file"):
        build_encoder(NAME, 3, str(whole))
