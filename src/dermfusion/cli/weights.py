"""``dermfusion weights check FILE --encoder NAME``: does a downloaded foundation-model file load and run?

Exit codes: 0 the file matches the upstream key set, loads strictly and embeds the bundled images; 1 it does not
(the report says which keys, by their upstream names); 2 a usage error (no such file, unknown encoder).
"""
from __future__ import annotations

from pathlib import Path

import typer

from ..console import console

LIST_LIMIT = 12


def _names(keys: list[str]) -> str:
    more = f", … (+{len(keys) - LIST_LIMIT} more)" if len(keys) > LIST_LIMIT else ""
    return ", ".join(keys[:LIST_LIMIT]) + more


def weights_check_cmd(
    file: Path = typer.Argument(..., help="the downloaded weights file (or, for dermlip-vit-b16 / dermlip-*, the "
                                          "download directory)"),
    encoder: str = typer.Option(..., help="panderm-base | panderm-large | panderm-cae-v2-base | panderm-cae-v2-large "
                                          "| dermlip-panderm-base | dermfm-zero | dermlip-vit-b16 | monet"),
    images: int = typer.Option(4, min=2, max=48, help="bundled sample images to embed"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
):
    """Check a foundation-model file before spending GPU hours on it: its keys against the upstream key set (by the
    upstream names), dermfusion's strict load, one forward pass on the bundled sample images, embedding statistics.
    Exits 1 when anything does not fit."""
    from ..models.foundations import get_foundation
    from ..models.weights_check import check_weights

    f = get_foundation(encoder)
    r = check_weights(file, f, n_images=images, device=device)
    k = r.keys
    console.print(f"[bold]{file}[/] as [bold]{f.name}[/]: {f.description}")
    console.print(f"upstream key set: {k.expected} keys ({', '.join(r.sources)}; models/upstream_keys/"
                  f"{f.keyset}.json); file: {k.in_file} tensors")
    if k.stripped:
        console.print("  prefixes removed: " + ", ".join(f"{p!r} × {n}" for p, n in k.stripped.items()))
    if k.ignored:
        console.print(f"  not parameters, ignored: {_names(k.ignored)}")
    console.print(f"  missing: {len(k.missing)} · unexpected: {len(k.unexpected)} · "
                  f"wrong shape: {len(k.wrong_shape)}")
    for label, keys in (("missing", k.missing), ("unexpected", k.unexpected), ("wrong shape", k.wrong_shape)):
        if keys:
            console.print(f"  [red]{label}[/]: {_names(keys)}")
    for got, want in list(k.did_you_mean.items())[:LIST_LIMIT]:
        console.print(f"  {got!r} — did you mean {want!r}?")
    if any(u.startswith(("regresser.", "decoder.", "mask_token", "rd_pos_embed")) for u in k.unexpected) \
            and f.name in ("panderm-base", "panderm-large"):
        console.print(f"  hint: this is a CAE-v2 pre-training checkpoint: check it as --encoder "
                      f"{f.name.replace('panderm-', 'panderm-cae-v2-')}, and train with "
                      f"--set model.encoder.ignore_pretraining_keys=true")
    if r.load_error:
        console.print(f"strict load into dermfusion: [red]refused[/]\n  {r.load_error}")
    else:
        console.print(f"strict load into dermfusion: OK ({r.loaded_as})")
    if r.forward:
        s, p = r.forward, r.preprocess
        console.print(f"forward pass on {s['n_images']} bundled images ({p['size']} px, {p['interpolation']}, crop "
                      f"{p['crop_pct']:g}, mean {tuple(round(x, 4) for x in p['mean'])}, std "
                      f"{tuple(round(x, 4) for x in p['std'])}; {p['source'] or 'no recorded source'}) on "
                      f"{s['device']}: {s['seconds']:.2f} s")
        if s["nonfinite"]:
            console.print(f"  [red]embedding: dim {s['dim']}, {s['nonfinite']} non-finite values[/]")
        else:
            console.print(f"  embedding: dim {s['dim']}, mean {s['mean']:.4f}, std {s['std']:.4f}, min {s['min']:.3f}, "
                          f"max {s['max']:.3f}, norm {s['norm_mean']:.3f} ± {s['norm_std']:.3f}, non-finite 0")
            console.print(f"  mean cosine similarity between different images: {s['mean_cosine']:.3f}"
                          + ("  [yellow](close to 1: every image embeds alike — untrained or collapsed weights, or "
                             "the wrong preprocessing)[/]" if s["mean_cosine"] > 0.98 else ""))
    if r.ok:
        console.print(f"[green]verdict: OK[/] — the file matches {f.description} and runs")
        return
    console.print("[red]verdict: does not fit[/] — fix the file (or choose the right --encoder) before training")
    raise typer.Exit(1)
