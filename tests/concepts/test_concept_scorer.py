"""The concept scorer's mechanics on a tiny randomly initialised open_clip model: MONET's concept-presence score
(per-template mean cosine over the terms against the paired reference, softmax at MONET's temperature, mean over
templates), probabilities in [0, 1], MILK10k's column names, the content-hash cache, the monotone mapping, clear
errors for missing weights, and `dermfusion concepts` through the CLI."""
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


def test_prompts_and_terms_are_monets():
    """MONET's tutorial templates with their paired references; MILK10k's terms are its column names' words."""
    cs = load_concept_set()
    assert cs.templates == ("This is skin image of {}", "This is dermatology image of {}", "This is image of {}")
    assert cs.reference == ("This is skin image", "This is dermatology image", "This is image")
    assert cs.groups() == [(("This is skin image of {}",), ("This is skin image",)),
                           (("This is dermatology image of {}",), ("This is dermatology image",)),
                           (("This is image of {}",), ("This is image",))]
    assert cs.concepts["gel_water_drop_fluid_dermoscopy_liquid"] == ["gel", "water drop", "fluid", "dermoscopy liquid"]
    assert cs.concepts["skin_markings_pen_ink_purple_pen"] == ["skin markings", "pen ink", "purple pen"]
    for name, terms in cs.concepts.items():  # every word of the column name is in a term
        assert set(name.split("_")) == {w for t in terms for w in t.split()}
    seven = load_concept_set("seven_point")  # MONET's Derm7pt experiment: dermoscopy templates, one pooled group
    assert seven.groups() == [(("This is dermatoscopy of {}", "This is dermoscopy of {}"),
                               ("This is dermatoscopy", "This is dermoscopy"))]


def monet_presence_score(clip, concept_set, images) -> np.ndarray:
    """MONET's calculate_concept_presence_score, written out from its definition: per template, the image's cosine
    similarities to template(term) averaged over the terms, against the similarity to that template's reference,
    softmax([t, r] / T)[0] with T = 1 / exp(4.5944), averaged over templates."""
    temp = 1 / np.exp(4.5944)
    with torch.no_grad():
        f = F.normalize(clip.model.encode_image(images), dim=-1)
        out = []
        for name in concept_set.names:
            per_template = []
            for template, ref in zip(concept_set.templates, concept_set.reference):
                e = F.normalize(clip.model.encode_text(clip.tokenizer([template.format(t) for t in
                                                                        concept_set.concepts[name]])), dim=-1)
                r = F.normalize(clip.model.encode_text(clip.tokenizer([ref])), dim=-1)
                t_sim, r_sim = (f @ e.T).mean(1), (f @ r.T).mean(1)
                logits = torch.stack([t_sim / temp, r_sim / temp])
                per_template.append(logits.softmax(0)[0])
            out.append(torch.stack(per_template).mean(0))
    return torch.stack(out, 1).numpy()


def test_scores_are_monets_concept_presence_scores(clip, images):
    scorer = ConceptScorer(clip)
    scores = scorer.score_files(images)
    assert len(scores) == len(images) and all(set(s) == set(scorer.names) for s in scores)
    values = np.array([[s[c] for c in scorer.names] for s in scores])
    assert np.all((values >= 0) & (values <= 1))
    x = torch.stack([scorer.preprocess(Image.open(p)) for p in images])
    np.testing.assert_allclose(values, monet_presence_score(clip, scorer.concept_set, x), rtol=1e-4, atol=1e-5)
    # the directions: per concept and template the mean of the normalised term embeddings (not renormalised)
    concepts, reference = scorer.directions()
    assert concepts.shape[:2] == (7, 3) and reference.shape[0] == 3
    with torch.no_grad():
        each = F.normalize(clip.model.encode_text(clip.tokenizer(["This is image of ulceration",
                                                                  "This is image of crust"])), dim=-1)
    torch.testing.assert_close(concepts[0, 2], each.mean(0))


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


def test_cache_keys_of_a_long_model_path_keep_their_fingerprints(tmp_path):
    """The weights / concept-set fingerprints end the key: a model under a long path must not lose them to the
    folder name's length limit (two scorers would share, and return each other's, scores)."""
    model = "open_clip:" + "/a_very_long_directory_name" * 8 + "/clip"
    a, b = ConceptCache(tmp_path, f"{model}-w1-prompts1"), ConceptCache(tmp_path, f"{model}-w1-prompts2")
    assert a.root != b.root and len(a.root.name) <= 120 and a.root.parent == tmp_path
    assert ConceptCache(tmp_path, "open_clip:clip-w1-prompts1").root.name == "open_clip_clip-w1-prompts1"  # as before


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
