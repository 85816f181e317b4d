"""The classical lesion mask (hair removal, Otsu, morphology, component choice) and the Dice / IoU metrics."""
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dermfusion.data.lesion_mask import LesionMaskError, dice, iou, otsu_lesion_mask, otsu_threshold, remove_hair

SKIN = np.array([0.87, 0.70, 0.60])
LESION = np.array([0.45, 0.28, 0.18])
HAIR = np.array([0.12, 0.09, 0.07])


def disc(h, w, cy, cx, r):
    y, x = np.ogrid[:h, :w]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def synthetic(h=160, w=200, cy=None, cx=None, r=40, hairs=True, seed=0, noise=0.04):
    """Dark-brown disc on light skin, Gaussian noise, a few thin dark hairs crossing skin and lesion."""
    rng = np.random.default_rng(seed)
    cy = h // 2 if cy is None else cy
    cx = w // 2 if cx is None else cx
    truth = disc(h, w, cy, cx, r)
    img = np.where(truth[:, :, None], LESION, SKIN) + rng.normal(0, noise, (h, w, 3))
    if hairs:
        y, x = np.mgrid[:h, :w]
        for (y0, x0, angle) in ((10, 0, 0.35), (h - 20, 5, -0.5), (0, w // 3, 1.3), (0, 2 * w // 3, 1.9)):
            a, b = np.sin(angle), -np.cos(angle)                  # line through (y0, x0) at this angle
            dist = np.abs(a * (x - x0) + b * (y - y0))
            img[dist < 1.0] = HAIR
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), truth


def test_disc_with_hair_and_noise():
    img, truth = synthetic()
    mask = otsu_lesion_mask(img)
    assert mask.dtype == bool and mask.shape == truth.shape
    assert dice(mask, truth) > 0.9
    assert iou(mask, truth) > 0.8


def test_pil_input_matches_array_input():
    img, truth = synthetic(seed=3)
    assert np.array_equal(otsu_lesion_mask(Image.fromarray(img)), otsu_lesion_mask(img))


def test_hair_is_found_and_removed():
    img, _ = synthetic()
    _, hair_truth = synthetic(hairs=False)
    rgb = img.astype(float) / 255
    filled, hair = remove_hair(rgb)
    plain, _ = synthetic(hairs=False)
    hairs_drawn = np.abs(img.astype(int) - plain.astype(int)).max(axis=2) > 60
    assert hair[hairs_drawn].mean() > 0.9                      # the drawn hairs are detected …
    near_hairs = ndimage.binary_dilation(hairs_drawn, iterations=2)
    assert (hair & ~near_hairs).mean() < 0.03                  # … and little else (lesion rim, noise)
    # after inpainting, hair pixels on skin look like skin again
    on_skin = hairs_drawn & ~hair_truth
    assert np.abs(filled[on_skin] - SKIN).max(axis=1).mean() < 0.15


def test_disc_without_hair():
    img, truth = synthetic(hairs=False, seed=1)
    assert dice(otsu_lesion_mask(img), truth) > 0.95


def test_off_centre_disc_is_found():
    img, truth = synthetic(h=180, w=240, cy=50, cx=60, r=30, seed=2)
    mask = otsu_lesion_mask(img)
    assert dice(mask, truth) > 0.9


def test_centre_lesion_beats_dark_corner():
    img, truth = synthetic(seed=4, hairs=False)
    corner = disc(*truth.shape, 0, 0, 45)                       # a dark dermatoscope corner touching two edges
    img[corner] = (LESION * 0.6 * 255).astype(np.uint8)
    mask = otsu_lesion_mask(img)
    assert dice(mask, truth) > 0.9 and not mask[corner].any()


def test_large_image_is_downscaled_and_mask_scaled_back():
    img, truth = synthetic(h=900, w=1200, r=250, hairs=False, seed=5)
    mask = otsu_lesion_mask(img)                               # works at ≤ 512 px, answers at full size
    assert mask.shape == (900, 1200) and dice(mask, truth) > 0.95


@pytest.mark.parametrize("noise", [0.0, 0.03])
def test_uniform_image_gives_an_empty_mask(noise):
    rng = np.random.default_rng(0)
    img = np.clip(np.broadcast_to(SKIN, (64, 80, 3)) + rng.normal(0, noise, (64, 80, 3)), 0, 1)
    mask = otsu_lesion_mask(img)
    assert mask.shape == (64, 80) and not mask.any()
    assert not otsu_lesion_mask(np.full((32, 32), 128, np.uint8)).any()   # grey, uint8


def test_bad_inputs_are_clear():
    with pytest.raises(LesionMaskError, match="shape"):
        otsu_lesion_mask(np.zeros((10, 10, 2)))
    with pytest.raises(LesionMaskError, match="too small"):
        otsu_lesion_mask(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(LesionMaskError, match=r"\[0, 1\]"):
        otsu_lesion_mask(np.full((16, 16, 3), 200.0))


def test_otsu_threshold_splits_two_modes():
    v = np.concatenate([np.full(100, 0.2), np.full(50, 0.8)])
    t = otsu_threshold(v)
    assert 0.2 <= t < 0.8 and otsu_threshold(np.ones(5)) == 1.0


def test_dice_and_iou():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :5] = True                                            # 50 pixels
    b[:, 3:8] = True                                           # 50 pixels, 20 shared
    assert dice(a, b) == pytest.approx(2 * 20 / 100)
    assert iou(a, b) == pytest.approx(20 / 80)
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0
    assert dice(a, ~a) == 0.0 and iou(a, ~a) == 0.0
    empty = np.zeros((10, 10), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0   # nothing to find, nothing found
    assert dice(empty, a) == 0.0 and iou(empty, a) == 0.0
    d, j = dice(a, b), iou(a, b)
    assert d == pytest.approx(2 * j / (1 + j))                 # the two are tied
    with pytest.raises(LesionMaskError, match="shape"):
        dice(a, np.zeros((5, 5), bool))
