// The page at "/": pick a model, give it images (files, drag and drop, paste, or a drawn
// digit), see the top-5 and the curl command that does the same. Plain JavaScript, no
// build step, nothing loaded from outside this service. Server strings (labels, file
// names, errors) are only ever set as textContent.
"use strict";

const TOKEN_KEY = "cnn-serving-token";
const TOP_K = 5;
const PARALLEL_UPLOADS = 4;

const state = { models: [], model: null };
const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// ---- talking to the service -------------------------------------------------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function authHeaders() {
  const value = token();
  return value ? { Authorization: `Bearer ${value}` } : {};
}

// the service's answer, with the token; an ApiError with the service's message where it refused (401: the token
// panel asks for one)
async function request(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
  if (response.ok) return response;
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;  // not JSON: the status says it
  }
  if (response.status === 401) {
    showTokenPanel(token() ? "That token was refused." : null);
    throw new ApiError(401, "This service needs a token: enter it above.");
  }
  throw new ApiError(response.status, (body && body.error) || `HTTP ${response.status} ${response.statusText}`);
}

async function call(path, options = {}) {
  const response = await request(path, options);
  try {
    return await response.json();
  } catch (_) {
    return null;
  }
}

function classifyUrl(model) {
  return `/classify?model=${encodeURIComponent(model)}&top_k=${TOP_K}`;
}

function contentTypeOf(blob) {
  return blob.type && blob.type.startsWith("image/") ? blob.type : "application/octet-stream";
}

async function classify(blob, model) {
  const started = performance.now();
  const body = await call(classifyUrl(model), {
    method: "POST",
    headers: { "Content-Type": contentTypeOf(blob) },
    body: blob,
  });
  const milliseconds = performance.now() - started;
  // on demand, the answer loaded it (or a canary's candidate): its card (resident) and what it offers (layer maps)
  // come with the load
  const cold = (name) => state.models.some((m) => m.name === name && coldStart(m));
  if (cold(model) || cold(body.model)) await loadModels();
  return { body, milliseconds };
}

// ---- models -----------------------------------------------------------------------

function describeParams(count) {
  if (count == null) return "–";
  return count >= 1e6 ? `${(count / 1e6).toFixed(1)} M` : count.toLocaleString("en");
}

function appendWarning(card, term, text) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.className = "warn";
  dd.textContent = text;
  card.append(dt, dd);
}

function describePrecision(model) {
  const parts = [model.precision.toUpperCase()];
  if (model.derived_from) parts.push(`of ${model.derived_from.model} v${model.derived_from.version}`);
  const accuracy = model.accuracy;
  if (accuracy) {
    parts.push(`top-1 agreement ${(100 * accuracy.top1_agreement).toFixed(1)}%`);
    if (accuracy.accuracy !== undefined) parts.push(`accuracy ${accuracy.accuracy}% (FP32 ${accuracy.accuracy_fp32}%)`);
  }
  return parts.join(", ");
}

function describeWeights(weights) {
  if (!weights) return "–";
  const parts = [weights.kind, weights.source, weights.file].filter(Boolean);
  return parts.join(" · ");
}

// A fine-tuned model's accuracy on the held-out part of its folder (GET /models)
function describeEvaluation(found) {
  const top5 = found.top5 === undefined ? "" : `, top-5 ${(100 * found.top5).toFixed(1)}%`;
  const forced = found.forced ? " (below its floor: written with --force)" : "";
  return `top-1 ${(100 * found.top1).toFixed(1)}%${top5} on ${found.images} held-out images${forced}`;
}

// "per class": each class's held-out top-1, fetched when asked (GET /models?per_class=true)
function perClassToggle(model) {
  const dd = document.createElement("dd");
  dd.className = "per-class";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "link";
  button.textContent = "accuracy per class";
  button.addEventListener("click", async () => {
    let body;
    try {
      body = await call("/models?per_class=true");
    } catch (exc) {  // shown where it was asked for; the button stays, to try again
      const why = dd.querySelector(".per-class-error") || document.createElement("span");
      why.className = "per-class-error";
      why.textContent = ` unavailable: ${exc.message}`;
      dd.append(why);
      return;
    }
    const found = (body.models || []).find((m) => m.name === model.name);
    const list = document.createElement("ul");
    for (const [label, figures] of Object.entries((found && found.evaluation && found.evaluation.per_class) || {})) {
      const item = document.createElement("li");
      item.dataset.label = label;
      item.textContent = `${label}: ${figures.top1 === null ? "–" : (100 * figures.top1).toFixed(1) + "%"} of ${figures.images}`;
      list.append(item);
    }
    dd.replaceChildren(list);
  });
  dd.append(button);
  const dt = document.createElement("dt");
  dt.textContent = "per class";
  const fragment = document.createDocumentFragment();
  fragment.append(dt, dd);
  return fragment;
}

function selectedModel() {
  return state.models.find((m) => m.name === state.model) || null;
}

function renderModelCard() {
  const card = $("model-card");
  card.replaceChildren();
  const model = selectedModel();
  if (!model) return;
  const rows = [["status", model.status + (model.reason ? `: ${model.reason}` : "")]];
  if (coldStart(model)) rows.push(["memory", "not resident: the first request loads it (a cold start of a second or so)"]);
  else if (model.residency && model.residency.bytes) {
    rows.push(["memory", `${(model.residency.bytes / 2 ** 20).toFixed(0)} MiB resident${model.residency.pinned ? ", pinned" : ""}`]);
  }
  if (model.architecture) {
    const built = model.architecture.built_on ? `, built on ${model.architecture.built_on}` : "";
    rows.push(["family", model.architecture.family + built]);
  }
  rows.push(["version", model.version == null ? "–" : String(model.version)]);
  rows.push(["parameters", describeParams(model.num_params)]);
  const variant = model.precision && model.precision !== "fp32"; // INT8 or FP16: of which model, and how faithful
  rows.push(["precision", variant ? describePrecision(model) : "fp32"]);
  if (model.input) {
    rows.push(["input", `${model.input.size}×${model.input.size}, ${model.input.channels === 1 ? "grayscale" : "RGB"}`]);
  }
  rows.push(["weights", describeWeights(model.weights)]);
  if (model.evaluation) rows.push(["accuracy", describeEvaluation(model.evaluation)]);
  if (model.provider) rows.push(["runs on", model.provider]);
  for (const [term, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    if (term === "status" && model.status !== "ready" && !coldStart(model)) {
      dd.className = model.status === "failed" ? "error" : "warn";
    }
    card.append(dt, dd);
  }
  if (model.evaluation) card.append(perClassToggle(model));
  if (model.forced) {
    appendWarning(card, "accuracy", "written with --force below its accuracy thresholds: it does not agree with its FP32 model");
  }
  if (model.weights && model.weights.kind === "random") {
    appendWarning(card, "note", "random weights (a test or benchmark export): its predictions are meaningless");
  }
  const drawable = answers(model) && model.input && model.input.channels === 1;
  $("draw-panel").hidden = !drawable;
}

// MODEL_CONTROL=on-demand: a model of the store that is not resident answers after a cold start
function coldStart(model) {
  return Boolean(model.residency) && ["not loaded", "evicted"].includes(model.residency.state);
}

function answers(model) {
  return model.status === "ready" || coldStart(model);
}

function renderUnavailable() {
  const list = $("unavailable");
  list.replaceChildren();
  for (const model of state.models.filter((m) => !answers(m))) {
    const item = document.createElement("li");
    item.dataset.model = model.name;
    item.textContent = `${model.name}: ${model.status}${model.reason ? ` (${model.reason})` : ""}`;
    list.append(item);
  }
}

function renderModelSelect(defaultModel) {
  const select = $("model-select");
  const wanted = new URLSearchParams(window.location.search).get("model");
  select.replaceChildren();
  for (const model of state.models) {
    const option = document.createElement("option");
    option.value = model.name;
    const family = model.architecture ? model.architecture.family : "";
    const status = model.status === "ready" ? "" : coldStart(model) ? " — loads on first use" : ` — ${model.status}`;
    option.textContent = `${model.name}${family ? ` (${family})` : ""}${status}`;
    option.disabled = !answers(model);
    select.append(option);
  }
  const ready = state.models.filter(answers).map((m) => m.name);
  const keep = [state.model, wanted, defaultModel].find((name) => name && ready.includes(name));
  state.model = keep || ready[0] || (state.models[0] && state.models[0].name) || null;
  if (state.model) select.value = state.model;
  select.disabled = state.models.length === 0;
  renderModelCard();
  renderUnavailable();
}

let modelsRetry = 1000;  // after a failure: doubled up to 30 s, back to 1 s once /models answers
let modelsTimer = null;  // the one pending reload: a token entered meanwhile replaces it, never adds a second loop

function reloadModels(delay) {
  clearTimeout(modelsTimer);
  modelsTimer = setTimeout(loadModels, delay);
}

let modelsAsked = 0; // /models asked again before an answer came (uploads side by side): only the last one counts

async function loadModels() {
  clearTimeout(modelsTimer);
  modelsTimer = null;
  const error = $("models-error");
  const asked = ++modelsAsked;
  try {
    const body = await call("/models");
    if (asked !== modelsAsked) return;
    error.hidden = true;
    $("token-panel").hidden = true;
    $("forget-token").hidden = !token();
    modelsRetry = 1000;
    state.models = body.models;
    renderModelSelect(body.default_model);
    if (state.models.some((m) => m.status === "loading")) reloadModels(2000);
  } catch (exc) {
    const latest = asked === modelsAsked; // an older one's failure only backs off: the latest says and asks again
    if (latest) {
      error.textContent = exc.message;
      error.hidden = false;
    }
    // a service still starting (503) or out of reach: asked again, so the page needs no reload; a refused token
    // waits for the one entered (the token panel loads the models itself)
    if (!(exc instanceof ApiError && exc.status === 401)) {
      if (latest) reloadModels(modelsRetry);
      modelsRetry = Math.min(2 * modelsRetry, 30000);
    }
  }
}

// ---- the token --------------------------------------------------------------------

function showTokenPanel(message) {
  $("token-panel").hidden = false;
  const error = $("token-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("token-input").focus();
}

function setUpToken() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("token-input");
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    loadModels();
  });
  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    window.location.reload();
  });
}

// ---- results ----------------------------------------------------------------------

function renderPredictions(list, predictions) {
  list.replaceChildren();
  for (const p of predictions) {
    const item = document.createElement("li");
    item.className = "prediction";
    item.dataset.label = p.label;
    item.dataset.index = String(p.index);
    item.dataset.score = String(p.score);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    label.title = `${p.label} (class ${p.index})`;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(0, Math.min(1, p.score)) * 100}%`;
    bar.append(fill);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${(p.score * 100).toFixed(1)}%`;
    item.append(label, bar, score);
    list.append(item);
  }
}

function answeredBy(body, milliseconds) {
  // a CANARY's candidate answered instead of the model asked for: say so, and which canary
  const canary = body.canary ? ` · canary answer (${body.canary.replace(":", " → ")})` : "";
  return `${body.model} v${body.version}${canary} · ${Math.round(milliseconds)} ms round trip${confidenceNote(body)}`;
}

// `confident` is there where a check applies: the model's abstain threshold (or the request's), or
// its typicality check (`typical`: is the image like the ones the model was trained on)
function confidenceNote(body) {
  const result = body.results[0];
  if (!result || typeof result.confident !== "boolean") return "";
  if (result.confident) return " · confident";
  if (result.typical === false) return " · not confident: unlike the images it was trained on";
  return ` · not confident: top-1 under ${(body.min_confidence * 100).toFixed(1)}%`;
}

function markConfidence(element, body) {
  const result = body.results[0];
  if (result && typeof result.confident === "boolean") element.dataset.confident = String(result.confident);
  else delete element.dataset.confident;
}

function newResultCard(name, blob) {
  const card = document.createElement("article");
  card.className = "result";
  card.dataset.status = "pending";
  card.dataset.name = name;
  const image = document.createElement("img");
  image.alt = name;
  image.src = URL.createObjectURL(blob);
  const body = document.createElement("div");
  const title = document.createElement("h3");
  title.textContent = name;
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.textContent = `classifying with ${state.model}…`;
  const list = document.createElement("ol");
  list.className = "predictions";
  body.append(title, meta, list);
  card.append(image, body);
  $("results").prepend(card);
  return card;
}

async function classifyFile(file) {
  const model = state.model;
  const name = file.name || "pasted image";
  const card = newResultCard(name, file);
  const meta = card.querySelector(".meta");
  try {
    const { body, milliseconds } = await classify(file, model);
    meta.textContent = answeredBy(body, milliseconds);
    card.dataset.model = body.model;
    card.dataset.version = body.version;
    if (body.canary) card.dataset.canary = body.canary;
    markConfidence(card, body);
    renderPredictions(card.querySelector(".predictions"), body.results[0].predictions);
    addWhy(card, file, body.results[0].predictions);
    card.dataset.status = "done";
  } catch (exc) {
    meta.textContent = exc.message;
    meta.className = "meta error";
    card.dataset.status = "error";
  }
  showCurl(model, name, contentTypeOf(file));
}

async function classifyFiles(files) {
  const images = Array.from(files);
  if (!images.length) return;
  if (!state.model) {
    $("models-error").textContent = "No model is ready yet.";
    $("models-error").hidden = false;
    return;
  }
  let next = 0;
  const worker = async () => {
    while (next < images.length) await classifyFile(images[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL_UPLOADS, images.length) }, worker));
}

// ---- why? (POST /explain) -----------------------------------------------------------

function explainUrl(model, version, index) {
  return `/explain?model=${encodeURIComponent(model)}&version=${encodeURIComponent(version)}&class=${index}`;
}

// The heat map of class `index` over the crop the network saw, in place of the card's image
async function explainInto(card, blob, index) {
  const meta = card.querySelector(".meta");
  card.dataset.explaining = String(index);
  let response;
  try {
    response = await request(explainUrl(card.dataset.model, card.dataset.version, index), {
      method: "POST",
      headers: { "Content-Type": contentTypeOf(blob), Accept: "image/png" },
      body: blob,
    });
  } catch (exc) {  // the service's refusal or the network's failure: said, and the card is not left "explaining"
    meta.textContent = `no explanation: ${exc.message}`;
    return false;
  } finally {
    delete card.dataset.explaining;
  }
  const image = card.querySelector("img");
  image.src = URL.createObjectURL(await response.blob());
  image.title = `${response.headers.get("X-Explanation-Method") || "heat"} map of class ${index}`;
  card.dataset.explained = String(index);
  for (const item of card.querySelectorAll(".prediction")) item.classList.toggle("explained", item.dataset.index === String(index));
  return true;
}

// "why?" lays the top-1's heat map over the image (again: back to the image); a click on any
// prediction explains that class instead
function addWhy(card, blob, predictions) {
  const image = card.querySelector("img");
  const original = image.src;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "link why";
  button.textContent = "why?";
  button.title = "Where the network looked (POST /explain)";
  const show = async (index) => {
    if (await explainInto(card, blob, index)) button.textContent = "show the image";
  };
  button.addEventListener("click", () => {
    if (card.dataset.explained === undefined) return show(predictions[0].index);
    image.src = original;
    image.removeAttribute("title");
    delete card.dataset.explained;
    for (const item of card.querySelectorAll(".prediction")) item.classList.remove("explained");
    button.textContent = "why?";
  });
  for (const item of card.querySelectorAll(".prediction")) {
    item.title = `${item.dataset.label}: click to see where the network looked for it`;
    item.addEventListener("click", () => show(Number(item.dataset.index)));
  }
  card.querySelector(".predictions").after(button);
}

// ---- curl -------------------------------------------------------------------------

function shellQuote(text) {
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replace(/'/g, "'\\''")}'`;
}

function showCurl(model, fileName, contentType) {
  const lines = ["curl -X POST"];
  if (token()) lines.push('-H "Authorization: Bearer $API_TOKEN"');
  lines.push(`-H "Content-Type: ${contentType}"`);
  lines.push(`--data-binary @${shellQuote(fileName)}`);
  lines.push(`"${window.location.origin}${classifyUrl(model)}"`);
  $("curl").textContent = lines.join(" \\\n  ");
  $("curl-panel").hidden = false;
}

// ---- images in: chooser, drag and drop, paste ---------------------------------------

function setUpInputs() {
  const input = $("file-input");
  input.addEventListener("change", () => {
    classifyFiles(input.files);
    input.value = "";
  });
  const zone = $("dropzone");
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") input.click();
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  // A file dropped anywhere on the page is classified rather than opened by the browser.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    classifyFiles(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData.items)
      .filter((item) => item.kind === "file")
      .map((item) => item.getAsFile())
      .filter(Boolean);
    if (files.length) classifyFiles(files);
  });
  $("model-select").addEventListener("change", (event) => {
    state.model = event.target.value;
    renderModelCard();
    if (drawing.dirty && !$("draw-panel").hidden) drawing.request();
  });
  $("copy-curl").addEventListener("click", () => navigator.clipboard.writeText($("curl").textContent));
}

// ---- drawing a digit ----------------------------------------------------------------

const drawing = {
  dirty: false,
  busy: false,
  again: false,
  generation: 0, // bumped by Clear: an answer for an erased drawing is not shown
  request() {
    // One request in flight; strokes made meanwhile are sent when it returns.
    if (this.busy) {
      this.again = true;
      return;
    }
    this.busy = true;
    this.again = false;
    $("canvas").toBlob((blob) => this.send(blob), "image/png");
  },
  async send(blob) {
    const model = state.model;
    const generation = this.generation;
    try {
      const { body, milliseconds } = await classify(blob, model);
      if (generation !== this.generation) return;
      const predictions = body.results[0].predictions;
      $("draw-digit").textContent = predictions[0].label;
      renderPredictions($("draw-predictions"), predictions);
      $("draw-meta").textContent = answeredBy(body, milliseconds);
      $("draw-panel").dataset.version = body.version;
      markConfidence($("draw-panel"), body);
      await showLayers(blob, body.model, body.version, generation); // a canary's candidate may have answered
    } catch (exc) {
      $("draw-meta").textContent = exc.message;
    } finally {
      showCurl(model, "digit.png", "image/png");
      this.busy = false;
      if (this.again) this.request();
    }
  },
};

// ---- what each layer sees (LeNet-5) ------------------------------------------------

function featureMapsOf(model) {
  const info = state.models.find((m) => m.name === model);
  return (info && info.explanation && info.explanation.feature_maps) || null;
}

// One small canvas per feature map, grey levels scaled to the layer's own range
function drawMaps(row, name, maps) {
  let low = Infinity;
  let high = -Infinity;
  for (const map of maps) for (const line of map) for (const v of line) {
    low = Math.min(low, v);
    high = Math.max(high, v);
  }
  const span = high - low || 1;
  const title = document.createElement("h4");
  title.textContent = `${name} · ${maps.length} maps of ${maps[0].length}×${maps[0][0].length}`;
  const grid = document.createElement("div");
  grid.className = "maps";
  for (const map of maps) {
    const canvas = document.createElement("canvas");
    canvas.width = map[0].length;
    canvas.height = map.length;
    const context = canvas.getContext("2d");
    const image = context.createImageData(canvas.width, canvas.height);
    map.forEach((line, y) => line.forEach((v, x) => {
      const level = Math.round((255 * (v - low)) / span);
      image.data.set([level, level, level, 255], 4 * (y * canvas.width + x));
    }));
    context.putImageData(image, 0, 0);
    grid.append(canvas);
  }
  row.replaceChildren(title, grid);
}

async function showLayers(blob, model, version, generation) {
  if (!featureMapsOf(model)) {
    $("layers").hidden = true;
    return;
  }
  const url = `/explain?model=${encodeURIComponent(model)}&version=${encodeURIComponent(version)}&layers=true&top_k=1`;
  const body = await call(url, { method: "POST", headers: { "Content-Type": "image/png" }, body: blob });
  if (generation !== drawing.generation) return;
  const layers = body.results[0].layers;
  const panel = $("layers");
  for (const [name, maps] of Object.entries(layers)) {
    let row = panel.querySelector(`[data-layer="${name}"]`);
    if (!row) {
      row = document.createElement("div");
      row.className = "layer";
      row.dataset.layer = name;
      panel.append(row);
    }
    drawMaps(row, name, maps);
  }
  panel.dataset.drawn = String(Number(panel.dataset.drawn || 0) + 1);
  panel.hidden = false;
}

function setUpCanvas() {
  const canvas = $("canvas");
  const context = canvas.getContext("2d");
  const clear = () => {
    context.fillStyle = "#fff";
    context.fillRect(0, 0, canvas.width, canvas.height);
    drawing.dirty = false;
    drawing.again = false;
    drawing.generation += 1;
    $("draw-digit").textContent = "?";
    $("draw-predictions").replaceChildren();
    $("draw-meta").textContent = "";
    $("layers").hidden = true;
  };
  clear();
  context.lineWidth = 22;
  context.lineCap = "round";
  context.lineJoin = "round";
  context.strokeStyle = "#000";
  let last = null;
  let lastSent = 0;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [((event.clientX - box.left) * canvas.width) / box.width, ((event.clientY - box.top) * canvas.height) / box.height];
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    context.beginPath();
    context.arc(last[0], last[1], context.lineWidth / 2, 0, 2 * Math.PI);
    context.fillStyle = "#000";
    context.fill();
    drawing.dirty = true;
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const here = point(event);
    context.beginPath();
    context.moveTo(last[0], last[1]);
    context.lineTo(here[0], here[1]);
    context.stroke();
    last = here;
    if (performance.now() - lastSent > 150) {
      lastSent = performance.now();
      drawing.request();
    }
  });
  const finish = () => {
    if (!last) return;
    last = null;
    drawing.request();
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  $("clear-canvas").addEventListener("click", clear);
}

document.addEventListener("DOMContentLoaded", () => {
  setUpToken();
  setUpInputs();
  setUpCanvas();
  loadModels();
});
