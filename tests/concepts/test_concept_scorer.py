"""The concept scorer's mechanics on a tiny randomly initialised open_clip model: prompt ensembles averaged in
embedding space, probabilities in [0, 1], MILK10k's column names, the content-hash cache, the monotone mapping,
clear errors for missing weights, and `dermfusion concepts` through the CLI."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from clip_fixtures import save_open_clip_dir, tiny_clip_model
from typer.testing import CliRunner

from dermfusion.concepts import (ConceptCache, ConceptMapping, ConceptScorer, fill_concepts, load_concept_set,
                                 load_scorer)
from dermfusion.concepts.prompts import ConceptSetError
from dermfusion.models.checkpoint import HubUnavailableError
from dermfusion.models.clip_family import ClipWeightsError, create_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the header of MILK10k_Training_Metadata.csv's concept columns, as the ISIC archive ships it
MILK10K_HEADER = ("MONET_ulceration_crust,MONET_hair,MONET_vasculature_vessels,MONET_erythema,MONET_pigmented,"
                  "MONET_gel_water_drop_fluid_dermoscopy_liquid,MONET_skin_markings_pen_ink_purple_pen")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_open_clip_dir(tiny_clip_model(), tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def clip(clip_dir):
    return create_clip(f"open_clip:{clip_dir}")


@pytest.fixture(scope="module")
def images(fixture_dir):
    return sorted((fixture_dir / "images").glob("*.jpg"))[:4]


def test_default_concepts_are_milk10k_monet_columns():
    names = load_concept_set().names
    assert names == [c.removeprefix("MONET_").lower() for c in MILK10K_HEADER.split(",")]
    assert len(names) == 7


def test_prompt_ensemble_is_averaged_in_embedding_space(clip):
    scorer = ConceptScorer(clip)
    concepts, reference = scorer.directions()
    for k, name in enumerate(scorer.names):
        prompts = scorer.concept_set.prompts(name)
        assert len(prompts) > 1  # an ensemble: several phrasings × templates
        with torch.no_grad():
            each = F.normalize(clip.model.encode_text(clip.tokenizer(prompts)), dim=-1)
        torch.testing.assert_close(concepts[k], F.normalize(each.mean(0), dim=-1))
        # not the embedding of any single prompt
        assert (concepts[k] - each).norm(dim=-1).min() > 1e-4
    with torch.no_grad():
        ref = F.normalize(clip.model.encode_text(clip.tokenizer(list(scorer.concept_set.reference))), dim=-1)
    torch.testing.assert_close(reference, F.normalize(ref.mean(0), dim=-1))


def test_scores_are_probabilities_of_concept_against_reference(clip, images):
    scorer = ConceptScorer(clip)
    scores = scorer.score_files(images)
    assert len(scores) == len(images) and all(set(s) == set(scorer.names) for s in scores)
    values = np.array([[s[c] for c in scorer.names] for s in scores])
    assert np.all((values >= 0) & (values <= 1))
    # the same number by hand: sigmoid(scale · (cos(image, concept) − cos(image, reference)))
    x = torch.stack([scorer.preprocess(Image.open(p)) for p in images])
    concepts, reference = scorer.directions()
    with torch.no_grad():
        f = F.normalize(clip.model.encode_image(x), dim=-1)
    scale = min(clip.model.logit_scale.exp().item(), 100.0)
    want = torch.sigmoid(scale * (f @ concepts.T - (f @ reference)[:, None])).numpy()
    np.testing.assert_allclose(values, want, rtol=1e-4, atol=1e-5)


def test_cache_hits_skip_the_model(clip, images, tmp_path):
    first = ConceptScorer(clip)
    first.cache = ConceptCache(tmp_path, first.key)
    a = first.score_files(images + images[:1])  # a repeated image is scored once
    assert first.model_calls == len(images)
    second = ConceptScorer(clip)
    second.cache = ConceptCache(tmp_path, second.key)
    b = second.score_files(images)
    assert second.model_calls == 0 and second.cache.hits == len(images)
    assert a[: len(images)] == b
    assert len(list(tmp_path.rglob("*.json"))) == len(images)
    # other prompts → another key → no stale hits
    other = ConceptScorer(clip, load_concept_set("seven_point"))
    assert ConceptCache(tmp_path, other.key).root != second.cache.root


def test_mapping_is_monotone_and_lands_on_the_reference_scale(tmp_path):
    rng = np.random.default_rng(0)
    computed = rng.uniform(0.4, 0.6, 300)  # another scorer: same order, squeezed scale, noise
    milk = np.clip((computed - 0.4) * 4 + rng.normal(0, 0.05, 300), 0, 1)
    for m in (ConceptMapping.fit_isotonic({"hair": computed}, {"hair": milk}),
              ConceptMapping.fit_quantiles({"hair": computed}, {"hair": milk})):
        grid = np.linspace(0, 1, 501)
        out = m.apply("hair", grid)
        assert np.all(np.diff(out) >= 0) and out.min() >= 0 and out.max() <= 1
        assert abs(np.median(m.apply("hair", computed)) - np.median(milk)) < 0.05
        loaded = ConceptMapping.load(m.save(tmp_path / f"{m.method}.json"))
        np.testing.assert_allclose(loaded.apply("hair", grid), out)
        np.testing.assert_array_equal(m.apply("erythema", grid), grid)  # unmapped concepts pass through


def test_missing_weights_and_offline_hub_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(ClipWeightsError, match="MONET weights not found"):
        create_clip(f"monet:{tmp_path / 'monet.pt'}")
    with pytest.raises(ClipWeightsError, match="needs its weights"):
        create_clip("monet:")
    with pytest.raises(ClipWeightsError, match="needs weights"):
        create_clip("open_clip:ViT-B-32")
    with pytest.raises(ClipWeightsError, match="not found"):
        create_clip(f"open_clip:{tmp_path / 'nowhere'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="huggingface-cli download"):
        load_scorer("open_clip:hf-hub:redlessone/DermLIP_PanDerm-base-w-PubMed-256")
    with pytest.raises(HubUnavailableError):
        create_clip("monet:hf-hub:suinleelab/monet")
    assert time.perf_counter() - t < 5


def test_concept_set_yaml(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\nconcepts:\n  scale: [scale, scaly skin]\n  crust: crust\n")
    cs = load_concept_set(f)
    assert cs.names == ["scale", "crust"] and len(cs.prompts("scale")) == 2 * len(cs.templates)
    f.write_text("concepts:\n  Bad Name: [x]\n")
    with pytest.raises(ConceptSetError, match="lower_snake_case"):
        load_concept_set(f)


def test_fill_keeps_supplied_scores_and_fits_the_mapping(clip, fixture_dir, tmp_path):
    paths = sorted((fixture_dir / "images").glob("*.jpg"))[:24]
    df = pd.DataFrame({"lesion_id": [p.stem for p in paths], "image_dermoscopic": [str(p) for p in paths],
                       "image_clinical": [""] * len(paths)})
    supplied = np.linspace(0.1, 0.9, 12)
    df.loc[:11, "concept_dermoscopic_hair"] = supplied
    scorer = ConceptScorer(clip)
    out, report = fill_concepts(df, scorer, fit_mapping=True)
    np.testing.assert_array_equal(out.loc[:11, "concept_dermoscopic_hair"], supplied)
    assert out[[f"concept_dermoscopic_{c}" for c in scorer.names]].notna().all(axis=None)
    assert out[[f"concept_clinical_{c}" for c in scorer.names]].isna().all(axis=None)  # no clinical image
    assert report.supplied == 12 and report.computed == 24 * 7 - 12 and report.no_image == 24 * 7
    assert list(report.mapping.knots) == ["hair"]  # the only concept with supplied scores to fit on
    hair = out.loc[12:, "concept_dermoscopic_hair"]
    assert hair.between(supplied.min(), supplied.max()).all()  # on the supplied scale


def test_concepts_verb_fills_a_manifest(clip_dir, ham_manifest, tmp_path):
    from dermfusion.cli import app
    from dermfusion.data.manifest import load_manifest

    out = tmp_path / "filled.parquet"
    args = ["concepts", f"open_clip:{clip_dir}", "--manifest", str(ham_manifest), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    df = load_manifest(out)
    cols = [f"concept_dermoscopic_{c}" for c in load_concept_set().names]
    assert df[cols].notna().all(axis=None) and df[cols].to_numpy().max() <= 1
    assert "48 images scored" in " ".join(res.output.split())
    res = CliRunner().invoke(app, args)  # again: every score from the cache
    assert res.exit_code == 0 and "0 images scored, 48 from the cache" in " ".join(res.output.split()), res.output
    res = CliRunner().invoke(app, ["concepts", f"monet:{tmp_path / 'monet.pt'}", "--manifest", str(ham_manifest),
                                   "--out", str(out)])
    assert res.exit_code == 2 and "MONET weights not found" in res.output
