// dermfusion clinician page: plain JS, no build step. Talks to /v1/model and /v1/analyze.
"use strict";

(function () {
  const MODALITIES = ["clinical", "dermoscopic"];
  const ACTION_TEXT = {
    urgent_referral: "Urgent referral",
    routine_referral: "Routine referral",
    monitor: "Monitor",
    cannot_assess: "Image not assessable — retake",
  };
  const $ = (id) => document.getElementById(id);
  const form = $("analyze-form");
  const keyInput = $("api-key");
  let model = null;          // /v1/model response
  let maxBytes = 15 * 1024 * 1024;
  const previews = {};       // modality -> object URL of the chosen file

  // ------------------------------------------------------------------ API key (kept for this tab only)
  try { keyInput.value = sessionStorage.getItem("dermfusion-api-key") || ""; } catch (e) { /* storage off */ }
  keyInput.addEventListener("change", () => {
    try { sessionStorage.setItem("dermfusion-api-key", keyInput.value); } catch (e) { /* ignore */ }
    loadModel();
  });

  function headers() {
    const h = {};
    if (keyInput.value.trim()) h["X-API-Key"] = keyInput.value.trim();
    return h;
  }

  // ------------------------------------------------------------------ model information
  async function loadModel() {
    const line = $("model-line");
    try {
      const r = await fetch("/v1/model", { headers: headers() });
      if (r.status === 401) {
        line.textContent = "This service requires an API key: enter it under Access.";
        $("api-key-help").textContent = "(required by this service)";
        return;
      }
      if (!r.ok) {
        const body = await r.json().catch(() => ({}));
        line.textContent = (body.error && body.error.message) || "Model not available yet.";
        return;
      }
      model = await r.json();
      maxBytes = (model.limits && model.limits.max_upload_bytes) || maxBytes;
      line.textContent = `Model ${model.model.name} · ${model.task} · version ${model.model.version} · ` +
        `hash ${model.model.hash.slice(0, 12)} · ${model.calibrated ? "calibrated" : "uncalibrated"}`;
      $("disclaimer").textContent = model.disclaimer;
      const uses = model.modalities.join(" and ");
      $("modality-note").textContent = `This model analyses ${uses} images.` +
        (model.modalities.length < 2 ? " Another image type can be uploaded but will not be analysed." : "");
      for (const m of MODALITIES) {
        $("drop-" + m).classList.toggle("unused", !model.modalities.includes(m));
      }
      if (model.auth_required) $("api-key-help").textContent = "(required by this service)";
    } catch (e) {
      line.textContent = "Could not reach the service.";
    }
  }

  // ------------------------------------------------------------------ images: choose, drop, preview
  function setError(id, msg) {
    const el = $(id + "-error");
    const input = $(id);
    if (el) el.textContent = msg || "";
    if (input) {
      if (msg) input.setAttribute("aria-invalid", "true"); else input.removeAttribute("aria-invalid");
    }
  }

  // A result belongs to the inputs it was computed from: it goes as soon as an image is chosen, dropped or
  // removed, a new analysis starts, or an analysis fails — never left on screen beside other inputs.
  function clearResults() {
    $("results").hidden = true;
    for (const id of ["action-reasons", "review-reasons", "warning-list", "differential", "heatmaps", "fusion"]) {
      $(id).replaceChildren();
    }
    for (const id of ["action", "risk-score", "primary", "heatmap-note", "result-meta", "prediction-set", "prior-note",
                      "operating-point"]) $(id).textContent = "";
  }

  function showPreview(m) {
    clearResults();
    const input = $(m), img = $("preview-" + m), zone = $("drop-" + m);
    const clear = document.querySelector(`[data-clear="${m}"]`);
    if (previews[m]) { URL.revokeObjectURL(previews[m]); delete previews[m]; }
    const f = input.files && input.files[0];
    if (!f) {
      img.hidden = true; img.removeAttribute("src"); img.alt = "";
      zone.classList.remove("has-image"); clear.hidden = true; setError(m, "");
      return;
    }
    previews[m] = URL.createObjectURL(f);
    img.src = previews[m];
    img.alt = `${m} photo preview`;
    img.hidden = false;
    zone.classList.add("has-image");
    clear.hidden = false;
    setError(m, checkFile(f));
  }

  function checkFile(f) {
    if (f.type && !f.type.startsWith("image/")) return `${f.name} is not an image (${f.type}).`;
    if (f.size > maxBytes) return `${f.name} is larger than ${(maxBytes / 1048576).toFixed(0)} MB.`;
    if (f.size === 0) return `${f.name} is empty.`;
    return "";
  }

  for (const m of MODALITIES) {
    const input = $(m), zone = $("drop-" + m);
    input.addEventListener("change", () => showPreview(m));
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      if (!e.dataTransfer || !e.dataTransfer.files.length) return;
      const dt = new DataTransfer();
      dt.items.add(e.dataTransfer.files[0]);
      input.files = dt.files;
      showPreview(m);
    });
    document.querySelector(`[data-clear="${m}"]`).addEventListener("click", () => {
      input.value = "";
      showPreview(m);
    });
  }

  form.addEventListener("reset", () => {
    setTimeout(() => { for (const m of MODALITIES) showPreview(m); }, 0);
    clearResults();
    $("form-error").textContent = "";
    for (const id of ["age", "skin_tone", "site", "elevation", "concepts"]) setError(id, "");
  });

  // ------------------------------------------------------------------ validation
  function collectMetadata() {
    let ok = true;
    const meta = {};
    const ageRaw = $("age").value.trim();
    setError("age", "");
    if (ageRaw !== "") {
      const age = Number(ageRaw);
      if (!Number.isFinite(age) || age < 0 || age > 120) {
        setError("age", "Age must be a number between 0 and 120."); ok = false;
      } else meta.age = age;
    }
    if ($("sex").value) meta.sex = $("sex").value;
    if ($("skin_tone").value !== "") meta.skin_tone = Number($("skin_tone").value);
    if ($("site").value) meta.site = $("site").value;
    if ($("elevation").value) meta.elevation = $("elevation").value;
    const c = $("concepts").value.trim();
    setError("concepts", "");
    if (c) {
      try {
        const parsed = JSON.parse(c);
        if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new Error("not an object");
        meta.concepts = parsed;
      } catch (e) {
        setError("concepts", 'Concept scores must be a JSON object such as {"dermoscopic": {"pigmented": 0.8}}.');
        ok = false;
      }
    }
    return ok ? meta : null;
  }

  // ------------------------------------------------------------------ submit
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const err = $("form-error");
    err.textContent = "";
    clearResults();
    const fd = new FormData();
    let nImages = 0, bad = false;
    for (const m of MODALITIES) {
      const f = $(m).files && $(m).files[0];
      if (f) {
        const msg = checkFile(f);
        setError(m, msg);
        if (msg) bad = true;
        fd.append(m, f, f.name);
        nImages++;
      }
    }
    const meta = collectMetadata();
    if (!nImages) { err.textContent = "Add at least one image (clinical and/or dermoscopic)."; $("clinical").focus(); return; }
    if (bad || meta === null) { err.textContent = "Please correct the highlighted fields."; return; }
    fd.append("metadata", JSON.stringify(meta));
    const btn = $("submit");
    btn.disabled = true;
    btn.textContent = "Analysing…";
    try {
      const r = await fetch("/v1/analyze", { method: "POST", body: fd, headers: headers() });
      const body = await r.json().catch(() => null);
      if (!r.ok) {
        showServerError(r, body);
        return;
      }
      render(body);
    } catch (ex) {
      clearResults();
      err.textContent = "The service could not be reached. Check the connection and try again.";
    } finally {
      btn.disabled = false;
      btn.textContent = "Analyse";
    }
  });

  function showServerError(r, body) {
    clearResults();
    const err = $("form-error");
    const e = (body && body.error) || {};
    let msg = e.message || `The service answered ${r.status}.`;
    if (r.status === 401) msg = "A valid API key is required: enter it under Access.";
    if (r.status === 503) {
      const after = r.headers.get("Retry-After");
      msg = `${e.message || "The service is busy."}${after ? ` Try again in ${after} s.` : ""}`;
    }
    if (e.field && MODALITIES.includes(e.field)) setError(e.field, e.message);
    if (e.field === "metadata" && Array.isArray(e.details)) {
      for (const d of e.details) {
        const f = String(d.field || "").split(".")[0];
        if (["age", "skin_tone", "site", "sex", "elevation", "concepts"].includes(f)) setError(f, d.message);
      }
    }
    err.textContent = msg;
  }

  // ------------------------------------------------------------------ results
  function pct(p) { return (100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1) + "%"; }

  function li(text) { const el = document.createElement("li"); el.textContent = text; return el; }

  function barRow(label, code, p, malignant) {
    const row = document.createElement("li");
    if (malignant) row.classList.add("mal");
    const name = document.createElement("span");
    name.className = "name";
    if (code) {
      const c = document.createElement("span"); c.className = "code"; c.textContent = code + " ";
      name.appendChild(c);
    }
    name.appendChild(document.createTextNode(label));
    if (malignant) {
      const mm = document.createElement("span"); mm.className = "malignant"; mm.textContent = "malignant";
      name.appendChild(mm);
    }
    const track = document.createElement("div");
    track.className = "track";
    track.setAttribute("role", "meter");
    track.setAttribute("aria-valuemin", "0");
    track.setAttribute("aria-valuemax", "100");
    track.setAttribute("aria-valuenow", (100 * p).toFixed(1));
    track.setAttribute("aria-label", `${code ? code + " " : ""}${label}: ${pct(p)}`);
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = Math.max(0, Math.min(100, 100 * p)).toFixed(1) + "%";
    track.appendChild(fill);
    const v = document.createElement("span");
    v.className = "pct";
    v.textContent = pct(p);
    row.append(name, track, v);
    return row;
  }

  function render(res) {
    $("results").hidden = false;
    // "cannot assess": the reasons and a retake request only — no risk, differential or heat maps (CSS hides them)
    $("results").classList.toggle("not-assessable", res.action === "cannot_assess");
    const card = $("action-card");
    card.className = "card action-card " + res.action;
    $("action").textContent = ACTION_TEXT[res.action] || res.action;
    const ar = $("action-reasons"); ar.replaceChildren(...res.action_reasons.map(li));
    $("risk-score").textContent = res.risk_score.toFixed(0);
    $("risk-fill").style.width = Math.min(100, res.risk_score) + "%";
    $("primary").textContent = `${res.primary_diagnosis.name} (${res.primary_diagnosis.code}, ${pct(res.primary_diagnosis.probability)})`;

    $("review").hidden = !res.review_recommended;
    $("review-reasons").replaceChildren(...res.review_reasons.map(li));
    $("warnings").hidden = !res.warnings.length;
    $("warning-list").replaceChildren(...res.warnings.map(li));

    $("differential").replaceChildren(...res.differential.map((d) => {
      const row = barRow(d.name, d.code, d.probability, d.malignant);
      if (d.in_prediction_set) row.classList.add("in-set");
      return row;
    }));
    // the conformal differential: "with 95 % confidence: MEL, NV or BKL" beside the ranked list
    const ps = res.prediction_set, psEl = $("prediction-set");
    psEl.hidden = !ps;
    psEl.textContent = ps ? ps.text.charAt(0).toUpperCase() + ps.text.slice(1) +
      (ps.melanoma_in_set ? " — melanoma cannot be ruled out at this level." : "") : "";
    // which case mix the probabilities assume, and which operating point decided the action
    const pr = res.prior;
    $("prior-note").textContent = pr.name === "deployment"
      ? "Probabilities assume this clinic's case mix (deployment prior set by the service)."
      : pr.name === "training"
        ? "Probabilities assume the case mix of the training data (no deployment prior set)."
        : "Probabilities: an older model whose outputs are not calibrated posteriors.";
    const op = res.operating_point;
    const cuts = (o) => Object.entries(o).map(([c, v]) => `P(${c}) ≥ ${v.toFixed(3)}`).join(", ");
    const oof = op.out_of_fold;
    $("operating-point").textContent =
      `Operating point from the ${op.source}: routine referral when the risk score ≥ ${op.routine_risk > 100 ? "— (off)" : op.routine_risk.toFixed(1)}` +
      (Object.keys(op.routine_class_probability).length ? ` or ${cuts(op.routine_class_probability)}` : "") +
      `; urgent referral when ${Object.keys(op.urgent_class_probability).length ? cuts(op.urgent_class_probability) : "—"}` +
      (op.urgent_risk <= 100 ? ` or risk ≥ ${op.urgent_risk.toFixed(1)}` : "") + ` (applied to ${op.applied_to}).` +
      (oof && oof.melanoma_sensitivity !== undefined
        ? ` On ${op.evidence === "local_sample" ? "this clinic's labelled local sample" : "the model's out-of-fold lesions"}` +
          ` it referred ${(100 * oof.melanoma_sensitivity).toFixed(0)}% of melanomas ` +
          `and ${(100 * oof.benign_referral_rate).toFixed(0)}% of benign lesions.` : "");

    const hm = $("heatmaps");
    hm.replaceChildren();
    for (const h of res.explanations.heatmaps) {
      const pair = document.createElement("div");
      pair.className = "pair";
      const f1 = document.createElement("figure");
      const orig = document.createElement("img");
      orig.src = previews[h.modality] || "";
      orig.alt = `${h.modality} photo as uploaded`;
      const c1 = document.createElement("figcaption"); c1.textContent = `${h.modality} photo`;
      f1.append(orig, c1);
      const f2 = document.createElement("figure");
      const ov = document.createElement("img");
      ov.src = "data:image/png;base64," + h.overlay_png_base64;
      ov.alt = `${h.modality} photo with heat map of the regions the model relied on (${h.method.replace(/_/g, " ")})`;
      ov.width = h.width; ov.height = h.height;
      const c2 = document.createElement("figcaption"); c2.textContent = `heat map · ${h.method.replace(/_/g, " ")}`;
      f2.append(ov, c2);
      pair.append(f1, f2);
      hm.appendChild(pair);
    }
    $("heatmap-note").textContent = res.explanations.heatmaps.length
      ? res.explanations.note + " Dimmed borders were cropped away before analysis."
      : "No heat maps for this result.";

    const fb = $("fusion-block"), fl = $("fusion");
    const fu = res.explanations.fusion;
    if (fu) {
      const rows = [];
      for (const [m, w] of Object.entries(fu.image)) rows.push(barRow(`${m} image`, "", w, false));
      for (const d of fu.metadata) rows.push(barRow(d.present ? d.label : `${d.label} (unknown)`, "", d.weight, false));
      for (const d of fu.concepts) if (d.present) rows.push(barRow(d.label, "", d.weight, false));
      fl.replaceChildren(...rows);
      fb.hidden = false;
    } else fb.hidden = true;

    const t = res.timings_ms;
    $("result-meta").textContent = `Request ${res.request_id} · model ${res.model.name} (${res.model.hash.slice(0, 12)}) · ` +
      `${res.calibrated ? "calibrated" : "uncalibrated"} · ${Math.round(t.total_ms || t.analysis_ms)} ms`;
    $("result-disclaimer").textContent = res.disclaimer;
    $("results-title").focus && $("results").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  // ------------------------------------------------------------------ model card (a plain link, unless an API
  // key is needed: then fetched with the key and opened from memory, since a link cannot send the header)
  for (const id of ["model-card-link", "model-card-foot"]) {
    const a = $(id);
    if (!a) continue;
    a.addEventListener("click", async (ev) => {
      if (!keyInput.value.trim()) return;
      ev.preventDefault();
      const w = window.open("", "_blank");
      try {
        const r = await fetch("/v1/model-card?format=html", { headers: headers() });
        const text = await r.text();
        const url = URL.createObjectURL(new Blob([text], { type: r.ok ? "text/html" : "text/plain" }));
        if (w) w.location = url; else window.location = url;
      } catch (e) {
        if (w) w.close();
        $("model-line").textContent = "Could not load the model card.";
      }
    });
  }

  loadModel();
})();
