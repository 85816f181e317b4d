"""``dermfusion weights check FILE --encoder NAME`` on synthetic checkpoints in the upstream layouts (reduced widths,
the same key names): a good file passes, a renamed key and a wrong shape are named by their upstream names and fail
with exit code 1, and the forward pass on the bundled images reports embedding statistics."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dermfusion.cli.app import app
from dermfusion.models import foundations

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from upstream_fixtures import SMALL_B, U, small_dermlip_config, small_open_clip_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = U.catalogue(small=True)
# encoder name → (catalogue entry, how dermfusion builds the reduced variant)
REDUCED = {
    "panderm-base": ("panderm_base", {"name": "panderm:vit_base_patch16_224", **SMALL_B}),
    "panderm-cae-v2-base": ("panderm_cae_v2_pretraining_base",
                            {"name": "panderm:vit_base_patch16_224", "ignore_pretraining_keys": True, **SMALL_B}),
    "dermlip-panderm-base": ("dermlip_panderm_base",
                             {"name": "dermlip:PanDerm-base-w-PubMed-256",
                              "arch": small_dermlip_config(16, SMALL_B, "PanDerm-base-w-PubMed-256")}),
    "monet": ("monet_vit_l14", {"arch": small_open_clip_config(16, 32, 2)}),
    "dermlip-vit-b16": ("dermlip_vit_b16", {}),
}


@pytest.fixture
def reduced(monkeypatch):
    """The registry's encoders at reduced width: the key sets of the small descriptions, small build options."""
    for name, (entry, spec) in REDUCED.items():
        keys = U.key_set(SMALL[entry]["build"]())
        monkeypatch.setitem(foundations.FOUNDATIONS, name,
                            dataclasses.replace(foundations.FOUNDATIONS[name], keys=keys, spec=spec))


def write(name: str, path: Path, edit=None, prefix: str = "") -> Path:
    module = SMALL[REDUCED[name][0]]["build"]()
    sd = U.random_state_dict(module)
    if edit:
        edit(sd)
    if name == "dermlip-vit-b16":  # a download directory: config + weights
        path.mkdir()
        (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": small_open_clip_config(24, 48, 3),
                                                                 "preprocess_cfg": {}}))
        torch.save(sd, path / "open_clip_pytorch_model.bin")
        return path
    torch.save({prefix + k: v for k, v in sd.items()}, path)
    return path


def check(*args):
    return CliRunner().invoke(app, ["weights", "check", *map(str, args)])


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_a_good_file_passes_with_embedding_statistics(reduced, tmp_path, name):
    f = write(name, tmp_path / "w.pth", prefix="encoder." if name == "panderm-base" else "")
    r = check(f, "--encoder", name, "--images", 3)
    assert r.exit_code == 0, r.output
    assert "missing: 0 · unexpected: 0 · wrong shape: 0" in r.output and "strict load into dermfusion: OK" in r.output
    assert "forward pass on 3 bundled images" in r.output and "non-finite 0" in r.output
    assert "mean cosine similarity between different images" in r.output and "verdict: OK" in r.output
    if name == "panderm-base":
        assert "prefixes removed: 'encoder.' × 36" in r.output  # the released ViT-L file's layout
        assert "SiyuanYan1/PanDerm@97e09d0" in r.output and "crop 0.875" in r.output


def test_a_renamed_key_is_named_by_its_upstream_name(reduced, tmp_path):
    def rename(sd):
        sd["blocks.1.attn.q_bais"] = sd.pop("blocks.1.attn.q_bias")

    r = check(write("panderm-base", tmp_path / "w.pth", rename), "--encoder", "panderm-base")
    assert r.exit_code == 1
    assert "missing: 1 · unexpected: 1 · wrong shape: 0" in r.output
    assert "missing: blocks.1.attn.q_bias" in r.output and "unexpected: blocks.1.attn.q_bais" in r.output
    assert "did you mean 'blocks.1.attn.q_bias'?" in r.output
    assert "strict load into dermfusion: refused" in r.output and "verdict: does not fit" in r.output


def test_a_wrong_shape_is_named_with_both_shapes(reduced, tmp_path):
    def widen(sd):
        sd["visual.head.weight"] = torch.zeros(24, 32)  # a 24-wide embedding where the model has 16

    r = check(write("dermlip-panderm-base", tmp_path / "w.bin", widen), "--encoder", "dermlip-panderm-base")
    assert r.exit_code == 1
    assert "wrong shape: 1" in r.output and "visual.head.weight: file (24, 32) vs upstream (16, 32)" in r.output
    assert "refused" in r.output


def test_a_pretraining_checkpoint_checked_as_the_encoder_says_what_to_do(reduced, tmp_path):
    r = check(write("panderm-cae-v2-base", tmp_path / "w.pth"), "--encoder", "panderm-base")
    assert r.exit_code == 1 and "regresser." in r.output
    assert "--encoder panderm-cae-v2-base" in r.output and "ignore_pretraining_keys=true" in r.output


def test_usage_errors_exit_2(tmp_path):
    r = check(tmp_path / "nothing.pth", "--encoder", "panderm-base")
    assert r.exit_code == 2 and "panderm_bb_data6_checkpoint-499.pth" in r.output
    (tmp_path / "x.pth").write_bytes(b"")
    r = check(tmp_path / "x.pth", "--encoder", "panderm-huge")
    assert r.exit_code == 2 and "panderm-base" in r.output
