"""The "cannot assess" gate's pure functions (evaluation.quality_gate): image measures and findings on the
committed real HAM10000 fixture images and on blank / degraded / non-skin versions of them, and the model
check's out-of-fold reference and cut."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dermfusion.evaluation.quality_gate import (GATE_SIZE, REASONS, REFERENCE_LEVELS, confidence_reference,
                                                confidence_threshold, image_findings, image_measures, model_findings,
                                                model_view)
from dermfusion.clinical.settings import QualityConfig

FIXTURE = Path(__file__).resolve().parents[2] / "src" / "dermfusion" / "fixtures" / "ham10000_sample" / "images"
CUTS = QualityConfig().image_cuts()


def codes(img: Image.Image) -> list[str]:
    return [c for c, _ in image_findings(image_measures(img), **CUTS)]


@pytest.fixture(scope="module")
def lesions() -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(FIXTURE.glob("*.jpg"))]


def test_real_dermoscopic_fixtures_pass(lesions):
    assert len(lesions) >= 40
    refused = {i: codes(img) for i, img in enumerate(lesions) if codes(img)}
    assert not refused, refused


def test_model_view_is_the_centre_square_never_enlarged():
    img = Image.new("RGB", (900, 500))
    img.paste((255, 0, 0), (200, 0, 700, 500))  # the centre 500 × 500 square is red
    v = model_view(img)
    assert v.shape == (GATE_SIZE, GATE_SIZE, 3) and (v[..., 0] > 250).all() and (v[..., 1] < 5).all()
    assert model_view(Image.new("RGB", (96, 120))).shape == (96, 96, 3)


@pytest.mark.parametrize("colour", [(128, 128, 128), (205, 150, 125), (40, 60, 200)])
def test_blank_and_uniform_colour(colour):
    assert codes(Image.new("RGB", (600, 450), colour)) == ["blank"]


def test_white_and_black_frames_are_exposure_findings():
    assert codes(Image.new("RGB", (600, 450), (255, 255, 255))) == ["overexposed"]
    assert codes(Image.new("RGB", (600, 450), (0, 0, 0))) == ["underexposed"]


def test_blank_with_jpeg_noise_is_still_blank():
    import io

    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (210, 160, 140)).save(buf, format="JPEG", quality=50)
    assert codes(Image.open(buf)) == ["blank"]


def test_exposure(lesions):
    arr = np.asarray(lesions[0], dtype=np.float32)
    dark = Image.fromarray(np.clip(arr * 0.12, 0, 255).astype(np.uint8))
    bright = Image.fromarray(np.clip(arr * 3.0, 0, 255).astype(np.uint8))
    assert codes(dark) == ["underexposed"]
    assert codes(bright) == ["overexposed"]


def test_blur(lesions):
    for img in lesions[:5]:
        assert "blurred" in codes(img.filter(ImageFilter.GaussianBlur(3))), image_measures(img)


def test_not_skin(lesions):
    img = lesions[0]
    grey = img.convert("L").convert("RGB")                            # a lesion without its colour
    green = Image.fromarray(np.asarray(img)[..., [1, 0, 2]].copy())   # red and green swapped: green "skin"
    for bad in (grey, green):
        assert codes(bad) == ["not_skin"], image_measures(bad)


def test_findings_say_why_with_the_numbers():
    m = {"colour_spread": 20.0, "dark_fraction": 0.1, "bright_fraction": 0.0, "sharpness": 0.1, "skin_fraction": 0.3}
    found = dict(image_findings(m, **CUTS))
    assert set(found) == {"blurred", "not_skin"}
    assert found["blurred"].startswith(REASONS["blurred"]) and "0.1 <" in found["blurred"]
    assert "30% of the coloured pixels skin-toned" in found["not_skin"]


def test_confidence_reference_and_threshold():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7) * 0.3, size=2000)
    ref = confidence_reference(probs)
    assert ref["n"] == 2000 and ref["levels"] == list(REFERENCE_LEVELS) and ref["chance"] == pytest.approx(1 / 7)
    top = probs.max(1)
    assert ref["quantiles"][0] == pytest.approx(top.min())
    assert ref["quantiles"] == sorted(ref["quantiles"]) and all(q in top for q in ref["quantiles"])  # real values
    for rate in (0.0, 0.005, 0.01):
        cut = confidence_threshold(ref, rate)
        assert (top < cut).mean() <= rate + 1e-9
    mid = confidence_threshold(ref, 0.0035)  # between stored levels: interpolated
    assert confidence_threshold(ref, 0.002) <= mid <= confidence_threshold(ref, 0.005)
    assert confidence_threshold(ref, 0.005, min_lesions=5000) is None  # too few lesions for a tail quantile
    assert confidence_threshold(None, 0.005) is None
    assert confidence_reference(np.zeros((0, 7))) is None


def test_model_findings():
    uniform = np.full(7, 1 / 7)
    (code, msg), = model_findings(uniform, 0.25)
    assert code == "model_unsure" and "0.14 < 0.25" in msg
    assert model_findings(np.array([0.9, 0.1]), 0.25) == []
    assert model_findings(uniform, None) == []
