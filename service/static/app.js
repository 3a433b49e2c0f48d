// The page at /: send an image (or webcam frames) to POST /detect, draw the boxes the API returned.
// One request per image, with score_threshold=0: the slider and the class filter re-filter in the browser
// (score > threshold, as the API does), so they answer at once. No framework, no build step.
"use strict";

// The class colours of the annotated image (model/drawing.py PALETTE), by class_id.
const PALETTE = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]];
const STAGES = ["decode", "preprocess", "queue", "inference", "postprocess"];
const config = JSON.parse(document.getElementById("page-config").textContent);
const $ = (id) => document.getElementById(id);

const state = {
  classes: [],          // class names, by class_id
  hidden: new Set(),    // class_ids unticked in the class filter
  threshold: config.scoreThreshold,
  source: null,         // what the detections were found on: ImageBitmap or canvas
  detections: [],       // as the API returned them (score_threshold=0)
  name: "",
  webcam: null,         // {stream, running, frames, since}
};

function colour(classId, alpha = 1) {
  const [r, g, b] = PALETTE[classId % PALETTE.length];
  return `rgba(${r}, ${g}, ${b}, ${alpha})`;
}

function textColour(classId) {
  const [r, g, b] = PALETTE[classId % PALETTE.length];
  return 0.299 * r + 0.587 * g + 0.114 * b > 160 ? "#111" : "#fff";
}

function apiHeaders() {
  const headers = {};
  const key = $("api-key").value.trim();
  if (config.apiKeyHeader && key) headers[config.apiKeyHeader] = key;
  return headers;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// ---- the model ------------------------------------------------------------------------------------
async function loadModel() {
  const response = await fetch("v1/model", { headers: apiHeaders() });
  if (response.status === 401) {
    $("model").textContent = "API key needed";
    return;
  }
  if (!response.ok) {
    $("model").textContent = "model not ready";
    setTimeout(loadModel, 2000);
    return;
  }
  const model = await response.json();
  state.classes = model.classes;
  $("model").textContent = `${model.name} · ${model.backend} · ${model.device} · ${model.precision}`;
  $("model").title = model.weights;
  renderClasses();
}

function renderClasses() {
  const counts = new Map();
  for (const d of visible(false)) counts.set(d.class_id, (counts.get(d.class_id) || 0) + 1);
  const rows = state.classes.map((name, id) => {
    const row = document.createElement("label");
    row.className = "class-row";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = !state.hidden.has(id);
    box.dataset.classId = id;
    box.addEventListener("change", () => {
      box.checked ? state.hidden.delete(id) : state.hidden.add(id);
      render();
    });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour(id);
    const n = document.createElement("span");
    n.className = "n";
    n.textContent = counts.get(id) || 0;
    row.append(box, swatch, document.createTextNode(name), n);
    return row;
  });
  $("classes").replaceChildren(...rows);
}

// ---- detection --------------------------------------------------------------------------------------
async function detect(blob, filename) {
  const form = new FormData();
  form.append("file", blob, filename);
  const query = new URLSearchParams({ score_threshold: "0", max_detections: String(config.maxDetections) });
  const started = performance.now();
  const response = await fetch(`detect?${query}`, { method: "POST", body: form, headers: apiHeaders() });
  if (!response.ok) throw new Error(await errorMessage(response));
  const body = await response.json();
  return { body, timing: response.headers.get("Server-Timing") || "", rtt: performance.now() - started };
}

async function detectFile(file) {
  if (!file) return;
  stopWebcam();
  showError("");
  document.body.dataset.state = "busy";
  $("busy").hidden = false;
  try {
    // The API's answer first: its error says what is wrong with a file in one line.
    const decoding = createImageBitmap(file, { imageOrientation: "from-image" }).catch(() => null);
    const { body, timing, rtt } = await detect(file, file.name || "pasted image");
    const bitmap = await decoding;
    if (!bitmap) throw new Error("the server read this image, but this browser cannot display it");
    show(bitmap, body, file.name || "pasted image");
    showTimings(timing, rtt);
    document.body.dataset.state = "done";
  } catch (error) {
    showError(error.message || String(error));
    document.body.dataset.state = "error";
  } finally {
    $("busy").hidden = true;
  }
}

function show(source, body, name) {
  state.source = source;
  state.detections = body.detections;
  state.name = name;
  state.size = body.image;
  $("stage").classList.remove("empty");
  render();
}

// ---- drawing ----------------------------------------------------------------------------------------
function visible(filterClasses = true) {
  return state.detections
    .filter((d) => d.score > state.threshold && !(filterClasses && state.hidden.has(d.class_id)))
    .sort((a, b) => b.score - a.score);
}

function render() {
  const shown = visible();
  if (state.source) draw(shown);
  renderTable(shown);
  renderClasses();
  $("count").textContent = shown.length;
  $("count").dataset.drawn = shown.length;
  if (state.source) {
    const { width, height } = state.size;
    $("summary").textContent = `${state.name} · ${width}×${height} · ${shown.length} of ${state.detections.length} detections shown`;
  }
}

function draw(detections) {
  const canvas = $("canvas");
  const { width, height } = state.size;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(state.source, 0, 0, width, height);
  const short = Math.min(width, height);
  const line = Math.max(2, Math.round(short / 240));
  const font = Math.max(12, Math.round(short * 0.034));
  const [padX, padY] = [Math.max(2, Math.round(font / 4)), Math.max(1, Math.round(font / 7))];
  ctx.lineWidth = line;
  // Every box first (the best on top), then every label (the best first), so no box strikes through a label.
  for (const d of [...detections].reverse()) {
    const b = d.box;
    ctx.strokeStyle = colour(d.class_id);
    ctx.strokeRect(b.x1 + line / 2, b.y1 + line / 2, Math.max(b.x2 - b.x1 - line, 1), Math.max(b.y2 - b.y1 - line, 1));
  }
  ctx.font = `600 ${font}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  const placed = [];
  for (const d of detections) {
    const text = `${d.label} ${d.score.toFixed(2)}`;
    const w = Math.ceil(ctx.measureText(text).width) + 2 * padX;
    const h = font + 2 * padY;
    const rect = placeLabel(d.box, w, h, width, height, placed);
    placed.push(rect);
    ctx.fillStyle = colour(d.class_id);
    ctx.fillRect(rect.x, rect.y, w, h);
    ctx.fillStyle = textColour(d.class_id);
    ctx.fillText(text, rect.x + padX, rect.y + padY);
  }
}

// Above the box's top-left corner, inside its top, below it or inside its bottom, kept inside the image:
// the spot that overlaps the labels placed before least (the first free one); as model/drawing.py.
function placeLabel(box, w, h, width, height, placed) {
  const x = Math.min(Math.max(box.x1, 0), Math.max(width - w, 0));
  const clampY = (y) => Math.min(Math.max(y, 0), Math.max(height - h, 0));
  const spots = [box.y1 - h, box.y1, box.y2, box.y2 - h].map((y) => ({ x, y: clampY(y), w, h }));
  const overlap = (a, b) =>
    Math.max(0, Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x)) *
    Math.max(0, Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y));
  const cost = (s) => placed.reduce((sum, p) => sum + overlap(s, p), 0);
  return spots.reduce((best, s) => (cost(s) < cost(best) ? s : best));
}

function renderTable(detections) {
  const rows = detections.map((d, i) => {
    const row = document.createElement("tr");
    const b = d.box;
    Object.assign(row.dataset, { label: d.label, score: d.score, x1: b.x1, y1: b.y1, x2: b.x2, y2: b.y2 });
    const cells = [i + 1, d.label, d.score.toFixed(3), b.x1.toFixed(1), b.y1.toFixed(1), b.x2.toFixed(1), b.y2.toFixed(1)];
    for (const [column, value] of cells.entries()) {
      const cell = document.createElement("td");
      if (column === 1) {
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = colour(d.class_id);
        cell.append(swatch);
      }
      cell.append(String(value));
      row.append(cell);
    }
    return row;
  });
  $("detections").tBodies[0].replaceChildren(...rows);
}

// "decode;dur=1.2, preprocess;dur=3.4, ..." -> bars, with the browser's round trip beside the total.
function showTimings(header, rtt) {
  const stages = new Map();
  for (const part of header.split(",")) {
    const [name, ...params] = part.trim().split(";");
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    if (name && dur) stages.set(name, parseFloat(dur.slice(4)));
  }
  const total = stages.get("total") || Math.max(0, ...stages.values());
  const rows = [...STAGES.filter((s) => stages.has(s)), "total"].filter((s) => stages.has(s)).map((stage) => {
    const row = document.createElement("div");
    row.className = `t-row ${stage}`;
    row.dataset.stage = stage;
    const bar = document.createElement("div");
    bar.className = "t-bar";
    const fill = document.createElement("span");
    fill.style.width = `${total ? Math.min(100, (100 * stages.get(stage)) / total) : 0}%`;
    bar.append(fill);
    const ms = document.createElement("span");
    ms.className = "t-ms";
    ms.textContent = `${stages.get(stage).toFixed(1)} ms`;
    row.append(stage, bar, ms);
    return row;
  });
  $("timings").replaceChildren(...rows);
  $("rtt").textContent = `round trip ${rtt.toFixed(0)} ms`;
}

// ---- webcam -----------------------------------------------------------------------------------------
async function startWebcam() {
  showError("");
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } } });
  } catch (error) {
    showError(`The webcam is not available: ${error.message || error.name}`);
    return;
  }
  const video = $("video");
  video.srcObject = stream;
  await video.play();
  state.webcam = { stream, running: true, frames: 0, since: performance.now(), fps: 0 };
  $("webcam").textContent = "Stop webcam";
  $("webcam").classList.add("active");
  $("fps").hidden = false;
  $("fps").textContent = "… FPS";
  webcamLoop(state.webcam);
}

function stopWebcam() {
  const cam = state.webcam;
  if (!cam) return;
  cam.running = false;
  cam.stream.getTracks().forEach((t) => t.stop());
  state.webcam = null;
  $("webcam").textContent = "Start webcam";
  $("webcam").classList.remove("active");
}

// Frame after frame: grab, send, draw what came back on that same frame; one request in flight.
async function webcamLoop(cam) {
  const video = $("video");
  const frame = document.createElement("canvas");
  while (cam.running) {
    frame.width = video.videoWidth;
    frame.height = video.videoHeight;
    if (!frame.width) {
      await new Promise((r) => requestAnimationFrame(r));
      continue;
    }
    frame.getContext("2d").drawImage(video, 0, 0);
    const blob = await new Promise((r) => frame.toBlob(r, "image/jpeg", 0.85));
    try {
      const { body, timing, rtt } = await detect(blob, "webcam.jpg");
      if (!cam.running) break;
      const still = await createImageBitmap(frame);
      show(still, body, "webcam");
      showTimings(timing, rtt);
      cam.frames += 1;
      const seconds = (performance.now() - cam.since) / 1000;
      if (seconds >= 1) {
        cam.fps = cam.frames / seconds;
        cam.frames = 0;
        cam.since = performance.now();
      }
      $("fps").textContent = cam.fps ? `${cam.fps.toFixed(1)} FPS` : "… FPS";
      document.body.dataset.state = "done";
    } catch (error) {
      showError(error.message || String(error));
      stopWebcam();
    }
  }
}

// ---- wiring -----------------------------------------------------------------------------------------
function init() {
  const slider = $("threshold");
  slider.value = state.threshold;
  $("threshold-value").textContent = Number(state.threshold).toFixed(2);
  slider.addEventListener("input", () => {
    state.threshold = Number(slider.value);
    $("threshold-value").textContent = state.threshold.toFixed(2);
    render();
  });
  for (const id of ["file", "file2"]) {
    $(id).addEventListener("change", (e) => {
      detectFile(e.target.files[0]);
      e.target.value = "";
    });
  }
  const stage = $("stage");
  stage.addEventListener("dragover", (e) => {
    e.preventDefault();
    stage.classList.add("dragging");
  });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
  stage.addEventListener("drop", (e) => {
    e.preventDefault();
    stage.classList.remove("dragging");
    detectFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) detectFile(item.getAsFile());
  });
  $("webcam").addEventListener("click", () => (state.webcam ? stopWebcam() : startWebcam()));
  if (config.apiKeyHeader) {
    $("key-card").hidden = false;
    $("key-header").textContent = config.apiKeyHeader;
    $("api-key").value = sessionStorage.getItem("refinedet-api-key") || "";
    $("api-key").addEventListener("change", () => {
      sessionStorage.setItem("refinedet-api-key", $("api-key").value.trim());
      loadModel();
    });
  }
  loadModel();
}

init();
