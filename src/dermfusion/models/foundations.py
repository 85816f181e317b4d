"""The foundation encoders dermfusion claims, by the name ``dermfusion weights check --encoder NAME`` takes.

Each names its upstream key set (``upstream_keys/<keyset>.json``: every state-dict key with its shape, the prefixes a
published file may add, and the upstream repository / path / commit each fact was read from; written by
``tools/foundation_keysets.py``) and how dermfusion loads it (the same entry point training and the scorer use).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DermfusionError

KEYSET_DIR = Path(__file__).with_name("upstream_keys")


@dataclass(frozen=True)
class Foundation:
    """``load``: "backbone" (``create_backbone(spec, pretrained_path=FILE)``), "monet" (``create_clip('monet:FILE')``)
    or "open_clip" (``create_clip('open_clip:DIR')``: a directory with open_clip_config.json). ``drop``: entries a
    published file may hold that are not parameters (listed, never compared). ``keys``: the key set itself instead
    of the shipped file (tests use a reduced-width one with the same names)."""

    name: str
    keyset: str
    load: str
    description: str
    spec: dict = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    keys: dict | None = None
    download: str = ""

    def upstream(self) -> dict:
        """The key-set document (``keys``, ``accepted_prefixes``, ``upstream`` sources)."""
        doc = json.loads((KEYSET_DIR / f"{self.keyset}.json").read_text(encoding="utf-8"))
        if self.keys is not None:
            doc["keys"] = {k: list(v) for k, v in self.keys.items()}
        return doc


_PANDERM = "Google Drive, linked from the README of github.com/SiyuanYan1/PanDerm: "
FOUNDATIONS = {f.name: f for f in [
    Foundation("panderm-base", "panderm_base", "backbone", "PanDerm ViT-B/16 encoder",
               {"name": "panderm:vit_base_patch16_224"},
               download=_PANDERM + "panderm_bb_data6_checkpoint-499.pth (file id 17J4MjsZu3gdBP6xAQi_NMDVvH65a00HB)"),
    Foundation("panderm-large", "panderm_large", "backbone", "PanDerm ViT-L/16 encoder (the paper's model)",
               {"name": "panderm:vit_large_patch16_224"},
               download=_PANDERM + "panderm_ll_data6_checkpoint-499.pth (file id 1SwEzaOlFV_gBKf2UzeowMC8z9UH7AQbE)"),
    Foundation("panderm-cae-v2-base", "panderm_cae_v2_pretraining_base", "backbone",
               "a CAE-v2 pre-training checkpoint around PanDerm ViT-B/16 (encoder + regressor + decoder)",
               {"name": "panderm:vit_base_patch16_224", "ignore_pretraining_keys": True}),
    Foundation("panderm-cae-v2-large", "panderm_cae_v2_pretraining_large", "backbone",
               "a CAE-v2 pre-training checkpoint around PanDerm ViT-L/16 (encoder + regressor + decoder)",
               {"name": "panderm:vit_large_patch16_224", "ignore_pretraining_keys": True}),
    Foundation("dermlip-panderm-base", "dermlip_panderm_base", "backbone",
               "DermLIP PanDerm-base-w-PubMed-256 (image tower; the text tower's keys are compared too)",
               {"name": "dermlip:PanDerm-base-w-PubMed-256"}, drop=("text.transformer.embeddings.position_ids",),
               download="huggingface-cli download redlessone/DermLIP_PanDerm-base-w-PubMed-256 --local-dir DIR"),
    Foundation("dermfm-zero", "dermfm_zero", "backbone", "DermFM-Zero (PanDerm-large image tower + PubMedBERT)",
               {"name": "dermlip:DermFM-Zero"}, drop=("text.transformer.embeddings.position_ids",),
               download="huggingface-cli download redlessone/DermFM-Zero --local-dir DIR (private at the time of "
                        "writing: needs a token from the authors)"),
    Foundation("dermlip-vit-b16", "dermlip_vit_b16", "open_clip", "DermLIP ViT-B/16 (a stock open_clip CLIP)",
               download="huggingface-cli download redlessone/DermLIP_ViT-B-16 --local-dir DIR"),
    Foundation("monet", "monet_vit_l14", "monet", "MONET (OpenAI CLIP ViT-L/14, QuickGELU)",
               drop=("input_resolution", "context_length", "vocab_size"),
               download="https://aimslab.cs.washington.edu/MONET/weight_clip.pt"),
]}


def get_foundation(name: str) -> Foundation:
    key = name.strip().lower().replace("_", "-")
    if key not in FOUNDATIONS:
        raise DermfusionError(f"unknown encoder {name!r}; choose one of {', '.join(FOUNDATIONS)}")
    return FOUNDATIONS[key]
