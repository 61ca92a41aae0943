// RAVEN-video browser demo: receives JPEG frames over a WebSocket and draws them at the video's frame rate.
// Protocol (docs/demo.md): JSON text messages both ways; binary messages = 4-byte big-endian frame index + JPEG.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  prompt: $("prompt"), seed: $("seed"), length: $("length"), endless: $("endless"),
  start: $("start"), switch: $("switch"), pause: $("pause"), stop: $("stop"),
  status: $("status"), message: $("message"), download: $("download"), log: $("log"), canvas: $("screen"),
};
const ctx = ui.canvas.getContext("2d");

// everything the page knows, readable by tests as window.demoState
const state = window.demoState = {
  config: null, connected: false, running: false, queued: false, stopping: false, paused: false, generated: null,
  received: 0, shown: 0, drawn: 0, chunks: [], positions: [], errors: [], video: null, status: "connecting",
  fps: 0, latency: null, chunkSeconds: null, startedAt: 0, clickedAt: 0, prompt: null, switchAt: null,
};
let frames = new Map();  // frame index -> ImageBitmap, not drawn yet
let nextDue = 0;
let drawTimes = [];
let lastAck = 0;
let ws = null;

function setStatus(text) { state.status = text; ui.status.textContent = text; }
function showError(text) { state.errors.push(text); ui.message.textContent = text; }
function clearError() { ui.message.textContent = ""; }
function send(obj) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj)); }
function logLine(text) {
  const li = document.createElement("li");
  li.textContent = text;
  ui.log.prepend(li);
  while (ui.log.children.length > 200) ui.log.lastChild.remove();
}

function updateButtons() {
  const active = state.running || state.queued;
  ui.start.disabled = !state.connected || active || state.stopping;
  ui.switch.disabled = !active || state.generated !== null;
  ui.pause.disabled = !state.running;
  ui.stop.disabled = !active;
  ui.pause.textContent = state.paused ? "Resume" : "Pause";
  ui.length.disabled = ui.endless.checked;
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${scheme}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { state.connected = true; setStatus("connected"); updateButtons(); };
  ws.onclose = () => {
    state.connected = false; state.running = false; state.queued = false; state.stopping = false;
    setStatus("disconnected from the server; reload the page"); updateButtons();
  };
  ws.onmessage = (event) => {
    if (typeof event.data === "string") onMessage(JSON.parse(event.data));
    else onFrame(event.data);
  };
}

function onMessage(msg) {
  switch (msg.type) {
    case "hello": {
      state.config = msg;
      $("model-info").textContent = `${msg.model} · ${msg.width}×${msg.height} · ${msg.fps} fps`;
      $("stat-video-fps").textContent = `${msg.fps} fps`;
      ui.canvas.width = msg.width; ui.canvas.height = msg.height;
      ui.length.value = msg.default_frames; ui.length.max = msg.max_frames;
      ui.seed.max = msg.max_seed;
      ui.prompt.maxLength = msg.max_prompt_chars;
      if (!ui.prompt.value) ui.prompt.value = msg.example_prompt;
      $("endless-hint").textContent = `Endless = the longest stream the model allows: ${msg.endless_frames} frames ` +
        `(${Math.round(msg.endless_seconds)} s at ${msg.fps} fps). RoPE positions limit a stream to 1024 latent ` +
        `frames; a local attention window with an attention sink keeps memory flat. Lengths fit whole chunks ` +
        `(${msg.first_chunk_frames} frames, then ${msg.chunk_frames} per chunk).`;
      $("prompt-hint").textContent = msg.world_vocabulary ? "(world captions only: the model knows " +
        msg.world_vocabulary.length + " words)" : "";
      updateButtons();
      break;
    }
    case "queued":
      state.queued = true; state.positions.push(msg.position);
      setStatus(`waiting for the GPU: position ${msg.position} in the queue`); updateButtons();
      break;
    case "started":
      state.queued = false; state.running = true; state.startedAt = performance.now();
      setStatus(`streaming ${msg.endless ? "endless" : msg.num_frames + " frames"} (seed ${msg.seed})`);
      updateButtons();
      break;
    case "chunk": {
      state.chunks.push(msg);
      state.received += msg.num_frames;
      state.chunkSeconds = msg.seconds;
      $("stat-chunk").textContent = `${(msg.seconds * 1000).toFixed(0)} ms (${(msg.num_frames / msg.seconds).toFixed(1)})`;
      $("stat-chunks").textContent = `${msg.index + 1} / ${msg.num_chunks}`;
      logLine(`chunk ${msg.index}: ${msg.num_frames} frames in ${(msg.seconds * 1000).toFixed(0)} ms — "${msg.prompt}"`);
      if (state.switchAt !== null && msg.index >= state.switchAt) {
        setStatus(`streaming; prompt switched at chunk ${state.switchAt}`);
        state.switchAt = null;
      }
      break;
    }
    case "prompt":
      logLine(`prompt switch scheduled at chunk ${msg.chunk}: "${msg.prompt}"`);
      state.switchAt = msg.chunk;
      setStatus(`prompt switches at chunk ${msg.chunk}`);
      break;
    case "paused": case "resumed":
      break;
    case "generated":
      state.generated = msg.frames;
      if (!msg.stopped) setStatus(`generated ${msg.frames} frames; playing out`);
      updateButtons();
      break;
    case "video":
      state.video = msg; state.running = false; state.queued = false; state.paused = false; state.stopping = false;
      frames.forEach((bitmap) => bitmap.close()); frames.clear();
      if (msg.url) {
        ui.download.href = msg.url; ui.download.hidden = false;
        ui.download.textContent = `Download the mp4 of what was shown (${msg.frames} frames)`;
        setStatus(`done: ${msg.frames} frames shown`);
      } else {
        setStatus("stopped before any frame was shown");
      }
      updateButtons();
      break;
    case "error":
      showError(msg.message);
      if (msg.fatal) { state.running = false; state.queued = false; state.stopping = false; setStatus("failed"); }
      updateButtons();
      break;
  }
}

function chunkPrompt(frameIndex) {
  for (let i = state.chunks.length - 1; i >= 0; i--) {
    if (state.chunks[i].frame_start <= frameIndex) return state.chunks[i].prompt;
  }
  return null;
}

async function onFrame(buffer) {
  const index = new DataView(buffer).getUint32(0);
  const bitmap = await createImageBitmap(new Blob([buffer.slice(4)], { type: "image/jpeg" }));
  if (!state.running || index < state.shown) { bitmap.close(); return; }
  frames.set(index, bitmap);
}

function ack(force) {
  const now = performance.now();
  if (force || now - lastAck > 100) { send({ type: "shown", frames: state.shown }); lastAck = now; }
}

// draw frames at the video's frame rate; a late frame restarts the clock instead of causing a burst
function tick() {
  const now = performance.now();
  const period = 1000 / (state.config ? state.config.fps : 16);
  if (state.running && !state.paused && frames.has(state.shown) && now >= nextDue) {
    const bitmap = frames.get(state.shown);
    frames.delete(state.shown);
    ctx.drawImage(bitmap, 0, 0, ui.canvas.width, ui.canvas.height);
    bitmap.close();
    nextDue = (now - nextDue > period) ? now + period : nextDue + period;
    if (state.shown === 0) {
      state.latency = (now - state.startedAt) / 1000;
      const queued = (state.startedAt - state.clickedAt) / 1000;
      $("stat-latency").textContent = `${state.latency.toFixed(2)} s` + (queued > 0.05 ? ` (+${queued.toFixed(1)} s queue)` : "");
    }
    state.shown += 1; state.drawn += 1;
    drawTimes.push(now);
    const prompt = chunkPrompt(state.shown - 1);
    if (prompt !== state.prompt) { state.prompt = prompt; $("shown-prompt").textContent = prompt; }
    ack(state.generated !== null && state.shown >= state.generated);
  }
  while (drawTimes.length && drawTimes[0] < now - 1000) drawTimes.shift();
  state.fps = state.running && !state.paused ? drawTimes.length : 0;
  $("stat-fps").textContent = state.running ? String(state.fps) : "–";
  $("stat-frames").textContent = `${state.shown} / ${state.received}`;
  if (state.running) ack(false);
  requestAnimationFrame(tick);
}

ui.start.onclick = () => {
  clearError();
  const length = ui.endless.checked ? "endless" : ui.length.value.trim();
  frames.forEach((bitmap) => bitmap.close()); frames = new Map();
  Object.assign(state, { generated: null, received: 0, shown: 0, chunks: [], video: null, latency: null,
                         paused: false, prompt: null, switchAt: null, clickedAt: performance.now(), startedAt: performance.now() });
  drawTimes = []; nextDue = 0;
  ui.download.hidden = true; ui.log.textContent = "";
  ["stat-latency", "stat-chunk", "stat-chunks", "shown-prompt"].forEach((id) => { $(id).textContent = "–"; });
  send({ type: "start", prompt: ui.prompt.value, seed: ui.seed.value.trim(), length: length });
  setStatus("starting…");
};
ui.switch.onclick = () => { clearError(); send({ type: "prompt", prompt: ui.prompt.value }); };
ui.prompt.onkeydown = (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    if (!ui.switch.disabled) ui.switch.click(); else if (!ui.start.disabled) ui.start.click();
  }
};
ui.pause.onclick = () => {
  state.paused = !state.paused;
  send({ type: state.paused ? "pause" : "resume" });
  if (!state.paused) nextDue = performance.now();
  setStatus(state.paused ? "paused" : "streaming");
  updateButtons();
};
ui.stop.onclick = () => {
  send({ type: "stop", shown: state.shown });
  state.paused = false;
  frames.forEach((bitmap) => bitmap.close()); frames.clear();
  setStatus("stopping…");
  state.running = false; state.queued = false; state.stopping = true;
  updateButtons();
};
ui.endless.onchange = updateButtons;

connect();
requestAnimationFrame(tick);
