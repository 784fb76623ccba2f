// The live demo: webcam -> WebSocket /stream -> boxes, names and similarities over the video.
// Plain browser JavaScript, no libraries. Protocol: README.md, "Video streams".
"use strict";

const TARGET_FPS = 15;      // frames offered per second at most
const MAX_IN_FLIGHT = 2;    // frames sent but not answered yet: more would only queue (the server drops them)
const JPEG_QUALITY = 0.8;

const $ = (id) => document.getElementById(id);
const video = $("video"), faces = $("faces"), grab = $("grab");
const keyInput = $("api-key");
keyInput.value = new URLSearchParams(location.search).get("key") || localStorage.getItem("facerec-key") || "";

let socket = null, sent = 0, inFlight = 0, sentAt = new Map(), answered = [], latencies = [], timer = null;

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function key() { return keyInput.value.trim(); }

async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("this browser gives no camera here (a page needs https or localhost for getUserMedia)");
  }
  video.srcObject = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  await new Promise((resolve) => { if (video.readyState >= 1) resolve(); else video.onloadedmetadata = resolve; });
  await video.play();
}

function connect() {
  if (socket) { socket.onclose = null; socket.close(1000); }
  const url = new URL("stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  // A browser cannot set headers on a WebSocket: the key travels as the subprotocol key.<KEY>, next to facerec.
  const protocols = key() ? ["facerec", "key." + key()] : ["facerec"];
  socket = new WebSocket(url, protocols);
  socket.binaryType = "arraybuffer";
  sent = 0; inFlight = 0; sentAt = new Map();
  socket.onopen = () => status("streaming");
  socket.onmessage = (event) => onMessage(JSON.parse(event.data));
  socket.onclose = (event) => {
    clearInterval(timer); timer = null;
    status(`stream closed (${event.code}${event.reason ? ": " + event.reason : ""})` +
      (event.code === 4401 ? " — enter an API key below" : ""), event.code !== 1000);
    if (event.code !== 4401 && event.code !== 4422) setTimeout(connect, 2000);
  };
  clearInterval(timer);
  timer = setInterval(sendFrame, 1000 / TARGET_FPS);
}

function sendFrame() {
  if (!socket || socket.readyState !== WebSocket.OPEN || inFlight >= MAX_IN_FLIGHT || !video.videoWidth) return;
  grab.width = video.videoWidth; grab.height = video.videoHeight;
  grab.getContext("2d").drawImage(video, 0, 0);
  inFlight++;
  grab.toBlob((blob) => {
    if (!blob || socket.readyState !== WebSocket.OPEN) { inFlight--; return; }
    sent++;
    sentAt.set(sent, performance.now());
    socket.send(blob);
  }, "image/jpeg", JPEG_QUALITY);
}

function onMessage(message) {
  if (message.type === "hello") return;
  const started = sentAt.get(message.frame);
  // Frames the server dropped (a newer one replaced them) are never answered: forget them too.
  for (const n of sentAt.keys()) { if (n <= message.frame) { sentAt.delete(n); inFlight = Math.max(0, inFlight - 1); } }
  if (message.type === "error") {
    if (message.frame === null) status(`${message.error.code}: ${message.error.message}`, true);
    return;
  }
  const now = performance.now();
  if (started !== undefined) latencies.push(now - started);
  answered.push(now);
  while (answered.length && answered[0] < now - 2000) answered.shift();
  if (latencies.length > 30) latencies.splice(0, latencies.length - 30);
  $("fps").textContent = (answered.length / 2).toFixed(1);
  $("latency").textContent = latencies.length ? `${median(latencies).toFixed(0)} ms` : "–";
  $("server-ms").textContent = `${message.process_ms.toFixed(0)} ms`;
  $("dropped").textContent = `${message.dropped}` + (message.rate_limited ? ` (+${message.rate_limited} over rate)` : "");
  draw(message);
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function draw(message) {
  const { width, height } = message.image;
  faces.replaceChildren(...message.faces.map((face) => {
    const [x1, y1, x2, y2] = face.box;
    const box = document.createElement("div");
    box.className = "face";
    box.dataset.trackId = face.track_id;
    Object.assign(box.style, {
      left: `${(100 * x1) / width}%`, top: `${(100 * y1) / height}%`,
      width: `${(100 * (x2 - x1)) / width}%`, height: `${(100 * (y2 - y1)) / height}%`,
    });
    const label = document.createElement("span");
    label.className = "label";
    const best = face.identity && face.identity.matches[0];
    if (best) {
      box.classList.add("known");
      label.innerHTML = "";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = best.display_name || best.identity_id;
      label.append(`#${face.track_id} `, name, ` ${best.similarity.toFixed(2)}`);
    } else {
      label.textContent = `#${face.track_id} ${face.identity ? "unknown" : "…"}`;
    }
    box.append(label);
    return box;
  }));
}

function slug(name) {
  const s = name.normalize("NFKD").replace(/[^\w.-]+/g, "-").replace(/^[^A-Za-z0-9]+|-+$/g, "").toLowerCase();
  return (s || "person").slice(0, 100);
}

$("enrol").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = $("enrol-name").value.trim();
  const result = $("enrol-result");
  if (!name || !video.videoWidth) return;
  grab.width = video.videoWidth; grab.height = video.videoHeight;
  grab.getContext("2d").drawImage(video, 0, 0);
  const blob = await new Promise((resolve) => grab.toBlob(resolve, "image/jpeg", 0.92));
  const form = new FormData();
  form.append("identity_id", slug(name));
  form.append("display_name", name);
  form.append("multiple_faces", "largest");
  form.append("images", blob, "frame.jpg");
  const headers = key() ? { "X-API-Key": key() } : {};
  result.className = ""; result.textContent = "enrolling…";
  try {
    const response = await fetch(new URL("enroll", location.href), { method: "POST", body: form, headers });
    const body = await response.json();
    if (!response.ok) throw new Error(`${body.error.code}: ${body.error.message}`);
    result.textContent = `enrolled ${name} (${body.identity_id}, ${body.faces.length} face)`;
  } catch (error) {
    result.className = "error"; result.textContent = String(error.message || error);
  }
});

$("settings").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem("facerec-key", key());
  connect();
});

startCamera().then(connect).catch((error) => status(`camera: ${error.message || error}`, true));
