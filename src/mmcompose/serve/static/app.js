// The chat page: attachments of each modality the model has, streamed answers over the same
// OpenAI-compatible API that any client uses. No build step.
"use strict";

const PARTS = {
  image: { label: "Image", accept: "image/*", part: "image_url" },
  audio: { label: "Audio", accept: ".wav,.flac,.mp3,audio/*", part: "input_audio" },
  video: { label: "Video", accept: "video/*", part: "video_url" },
  point: { label: "Point cloud", accept: ".npy,.ply,.off", part: "point_cloud_url" },
};
const POINT_TYPES = { npy: "application/x-npy", ply: "model/ply", off: "model/off" };

const state = { model: null, modalities: [], history: [], pending: [], busy: false };
const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

async function loadModel() {
  const health = await (await fetch("/health")).json();
  $("api-key").hidden = !health.auth;
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    showError(await errorText(response));
    $("model-name").textContent = health.model;
    return;
  }
  const model = (await response.json()).data[0];
  state.model = model.id;
  state.modalities = model.modalities;
  $("model-name").textContent = model.id;
  $("modalities").innerHTML = "";
  for (const m of model.modalities.length ? model.modalities : ["text only"]) {
    const tag = document.createElement("span");
    tag.className = "modality";
    tag.textContent = m;
    $("modalities").appendChild(tag);
  }
  const buttons = $("attach-buttons");
  buttons.innerHTML = "";
  for (const m of model.modalities.filter((m) => PARTS[m])) {
    const label = document.createElement("label");
    label.className = "attach";
    label.textContent = `+ ${PARTS[m].label} `;
    const input = document.createElement("input");
    input.type = "file";
    input.accept = PARTS[m].accept;
    input.dataset.modality = m;
    input.multiple = true;
    input.addEventListener("change", () => {
      for (const file of input.files) attach(m, file);
      input.value = "";
    });
    label.appendChild(input);
    buttons.appendChild(label);
  }
  showError("");
}

function modalityOf(file) {
  const ext = file.name.split(".").pop().toLowerCase();
  if (POINT_TYPES[ext]) return "point";
  for (const m of ["image", "audio", "video"]) {
    if (file.type.startsWith(`${m}/`)) return m;
  }
  if (["wav", "flac", "mp3"].includes(ext)) return "audio";
  return null;
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(modality, file) {
  if (!state.modalities.includes(modality)) {
    showError(`${file.name}: this model has no ${modality} modality (it has: ${state.modalities.join(", ") || "text only"})`);
    return;
  }
  let url = await readDataURL(file);
  const ext = file.name.split(".").pop().toLowerCase();
  if (modality === "point") url = `data:${POINT_TYPES[ext] || "application/octet-stream"};base64,${url.split(",")[1]}`;
  let part;
  if (modality === "audio") {
    if (!["wav", "flac", "mp3"].includes(ext)) {
      showError(`${file.name}: audio must be .wav, .flac or .mp3`);
      return;
    }
    part = { type: "input_audio", input_audio: { data: url.split(",")[1], format: ext } };
  } else {
    const kind = PARTS[modality].part;
    part = { type: kind, [kind]: { url } };
  }
  state.pending.push({ modality, name: file.name, part, preview: modality === "image" ? url : null });
  renderAttachments();
  showError("");
}

function renderAttachments() {
  const box = $("attachments");
  box.innerHTML = "";
  state.pending.forEach((item, index) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.textContent = `${item.modality}: ${item.name} `;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "remove";
    remove.addEventListener("click", () => { state.pending.splice(index, 1); renderAttachments(); });
    chip.appendChild(remove);
    box.appendChild(chip);
  });
}

function addMessage(role, text, items) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  for (const item of items || []) {
    if (item.preview) {
      const img = document.createElement("img");
      img.src = item.preview;
      img.alt = item.name;
      div.appendChild(img);
    } else {
      const span = document.createElement("span");
      span.className = "file";
      span.textContent = `[${item.modality}] ${item.name}`;
      div.appendChild(span);
    }
  }
  div.appendChild(document.createTextNode(text));
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

async function send(event) {
  event.preventDefault();
  if (state.busy) return;
  const text = $("prompt").value.trim();
  if (!text && !state.pending.length) return;
  const items = state.pending;
  const content = [...items.map((item) => item.part), ...(text ? [{ type: "text", text }] : [])];
  const message = { role: "user", content };
  addMessage("user", text, items);
  const answer = addMessage("assistant", "");
  answer.classList.add("streaming");
  state.busy = true;
  $("send").disabled = true;
  showError("");
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ model: state.model, messages: [...state.history, message], stream: true }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
        if (delta) {
          reply += delta;
          answer.lastChild.textContent = reply;
        }
      }
    }
    state.history.push(message, { role: "assistant", content: reply });
    state.pending = [];
    renderAttachments();
    $("prompt").value = "";
  } catch (error) {
    answer.remove();
    showError(error.message);
  } finally {
    answer.classList.remove("streaming");
    answer.dataset.done = "true";
    state.busy = false;
    $("send").disabled = false;
  }
}

function setUpDragAndDrop() {
  const zone = document.body;
  zone.addEventListener("dragover", (event) => { event.preventDefault(); $("drop-zone").classList.add("dragging"); });
  zone.addEventListener("dragleave", () => $("drop-zone").classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    $("drop-zone").classList.remove("dragging");
    for (const file of event.dataTransfer.files) {
      const modality = modalityOf(file);
      if (modality) attach(modality, file);
      else showError(`${file.name}: not a file type this page recognises`);
    }
  });
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) send(event);
});
$("reset").addEventListener("click", () => {
  state.history = [];
  state.pending = [];
  renderAttachments();
  $("messages").innerHTML = "";
  showError("");
});
$("api-key").addEventListener("change", loadModel);
setUpDragAndDrop();
loadModel().catch((error) => showError(error.message));
