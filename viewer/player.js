// gstalk's web player: plays a talking avatar written by `gstalk export AVATAR --format web`.
//
// avatar.json describes avatar.bin: for each Gaussian attribute (centres, rotations, log-scales,
// opacities) the values of the Gaussians that never move, and for those that move a mean plus
// a few principal components (int16 rows) with per-frame weights. Each shown frame is rebuilt
// here (components x moving values multiply-adds) and written into Spark's packed splats.
// The frame shown is the audio clock's (the Web Audio context's time x fps), so picture and
// sound stay in sync through play, pause and scrubbing. From viewpoints away from the tracked camera the
// view fill and ray cut are faded in as gstalk's own render does (gstalk/avatar/views.py).
//
// At the tracked camera the splats are drawn over the clip's background plate (background.png,
// as gstalk render composites them), which fades out as the view turns away from it.
//
// URL options: ?w=256&h=256 (a fixed canvas size), bg=rrggbb (background), plate=0 (no plate),
// bare=1 (no controls), preset=tracked|front|left|right|above.

import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { VRButton } from "three/addons/webxr/VRButton.js";
import { PackedSplats, SparkRenderer, SplatMesh, setPackedSplat } from "@sparkjsdev/spark";

const params = new URLSearchParams(location.search);
const statusEl = document.getElementById("status");
if (params.get("bare") === "1") document.body.classList.add("bare");

function fail(msg) {
  statusEl.textContent = msg;
  window.gstalk = { error: msg };
  throw new Error(msg);
}

async function load() {
  const r = await fetch("avatar.json");
  if (!r.ok) fail(`cannot load avatar.json (${r.status})`);
  const man = await r.json();
  if (man.format !== "gstalk-web-player" || man.version !== 1) fail("avatar.json is not a gstalk web player file");
  const b = await fetch(man.binary);
  if (!b.ok) fail(`cannot load ${man.binary} (${b.status})`);
  const buf = await b.arrayBuffer();
  if (buf.byteLength !== man.binary_bytes) fail(`${man.binary} has ${buf.byteLength} bytes, not ${man.binary_bytes}`);
  return { man, buf };
}

const TYPES = { float32: Float32Array, int32: Int32Array, int16: Int16Array };
function view(buf, e) {
  const n = e.shape.reduce((a, b) => a * b, 1);
  return new TYPES[e.dtype](buf, e.offset, n);
}

// One attribute's frames: still values, and the moving ones rebuilt from their components.
class Attribute {
  constructor(buf, a, channels) {
    this.C = channels;
    this.values = Float32Array.from(view(buf, a.still));
    this.moving = view(buf, a.moving);
    this.mean = view(buf, a.moving_mean);
    this.rows = view(buf, a.rows);
    this.weights = view(buf, a.weights);
    this.K = a.components;
    this.D = this.moving.length * channels;
    this.tmp = new Float32Array(this.D);
  }
  frame(t) {
    const { K, D, C, tmp, rows, weights, moving, values } = this;
    if (D === 0) return values;
    tmp.set(this.mean);
    for (let k = 0; k < K; k++) {
      const w = weights[t * K + k];
      if (w === 0) continue;
      const off = k * D;
      for (let d = 0; d < D; d++) tmp[d] += w * rows[off + d];
    }
    for (let i = 0; i < moving.length; i++) {
      const g = moving[i] * C;
      for (let c = 0; c < C; c++) values[g + c] = tmp[i * C + c];
    }
    return values;
  }
}

const { man, buf } = await load();
const N = man.gaussians, T = man.num_frames, fps = man.fps;
const attrs = {
  means: new Attribute(buf, man.attributes.means, 3),
  quats: new Attribute(buf, man.attributes.quats, 4),
  logScales: new Attribute(buf, man.attributes.log_scales, 3),
  opacities: new Attribute(buf, man.attributes.opacities, 1),
};
const colors = view(buf, man.colors);
const V = man.views;
const fill = V.fill ? { idx: view(buf, V.fill), rgb: view(buf, V.fill_rgb), scale: view(buf, V.fill_scale) } : null;
const cut = V.cut ? { idx: view(buf, V.cut), scale: view(buf, V.cut_scale) } : null;

// --- three.js, Spark ---------------------------------------------------------------------
const fixed = params.has("w") && params.has("h");
const width = () => (fixed ? +params.get("w") : window.innerWidth);
const height = () => (fixed ? +params.get("h") : window.innerHeight);
const renderer = new THREE.WebGLRenderer({ antialias: false, preserveDrawingBuffer: true, alpha: true });
renderer.setPixelRatio(fixed ? 1 : window.devicePixelRatio);
const viewEl = document.getElementById("view"), plateEl = document.getElementById("plate");
const bgColour = "#" + (params.get("bg") || "202226");
viewEl.style.background = bgColour;
renderer.setClearColor(0x000000, 0);  // transparent: the plate or the background shows through
viewEl.appendChild(renderer.domElement);
const usePlate = Boolean(man.background) && params.get("plate") !== "0";
if (usePlate) {
  plateEl.src = man.background;
  await plateEl.decode().catch(() => fail(`cannot load ${man.background}`));
  plateEl.style.display = "block";
}
// the canvas, and the plate where the tracked camera's picture lies on it (fitted to its height)
function layout() {
  const W = width(), H = height();
  renderer.setSize(W, H);
  viewEl.style.width = `${W}px`;
  viewEl.style.height = `${H}px`;
  Object.assign(plateEl.style, { width: `${H}px`, height: `${H}px`, left: `${(W - H) / 2}px` });
}
layout();
const scene = new THREE.Scene();
const camera = new THREE.PerspectiveCamera(30, width() / height(), 0.01, 100);
scene.add(new SparkRenderer({ renderer }));
const packed = new PackedSplats({ maxSplats: N });
packed.ensureSplats(N);
packed.numSplats = N;
const mesh = new SplatMesh({ packedSplats: packed });
scene.add(mesh);
await mesh.initialized;

// --- cameras -----------------------------------------------------------------------------
const cam = man.camera;
const c2w = cam.camera_to_world;  // OpenCV axes (y down, z forward) in gstalk's world (y up)
const trainPos = new THREE.Vector3(c2w[0][3], c2w[1][3], c2w[2][3]);
// three.js cameras look down -z with y up: flip the camera's own y and z
const trainBasis = new THREE.Matrix4().set(
  c2w[0][0], -c2w[0][1], -c2w[0][2], 0,
  c2w[1][0], -c2w[1][1], -c2w[1][2], 0,
  c2w[2][0], -c2w[2][1], -c2w[2][2], 0,
  0, 0, 0, 1);
const trainQuat = new THREE.Quaternion().setFromRotationMatrix(trainBasis);
let centred = false;  // presets other than the tracked one put the principal point in the middle

// The tracked camera's intrinsics (pixels at size x size), fitted to the canvas's height.
function setProjection() {
  const W = width(), H = height(), S = cam.size, sc = H / S, K = cam.K;
  const fx = K[0][0] * sc, fy = K[1][1] * sc;
  const cx = centred ? W / 2 : W / 2 + (K[0][2] - S / 2) * sc;
  const cy = centred ? H / 2 : H / 2 + (K[1][2] - S / 2) * sc;
  const n = camera.near, f = camera.far;
  camera.fov = 2 * Math.atan(H / (2 * fy)) * 180 / Math.PI;
  camera.aspect = W / H;
  camera.projectionMatrix.set(
    2 * fx / W, 0, 1 - 2 * cx / W, 0,
    0, 2 * fy / H, 2 * cy / H - 1, 0,
    0, 0, -(f + n) / (f - n), -2 * f * n / (f - n),
    0, 0, -1, 0);
  camera.projectionMatrixInverse.copy(camera.projectionMatrix).invert();
}

const controls = new OrbitControls(camera, renderer.domElement);
controls.target.set(0, 0, 0);  // the head's centre
controls.enableDamping = false;
controls.addEventListener("change", () => { centred = true; setProjection(); });

const PRESETS = ["tracked", "front", "left", "right", "above"];
function preset(name) {
  if (!PRESETS.includes(name)) throw new Error(`unknown camera preset ${name}: ${PRESETS.join(", ")}`);
  centred = name !== "tracked";
  const d = trainPos.length();
  if (name === "tracked") {
    camera.position.copy(trainPos);
    camera.quaternion.copy(trainQuat);
  } else {
    const flat = new THREE.Vector3(trainPos.x, 0, trainPos.z);
    if (flat.lengthSq() < 1e-12) flat.set(0, 0, 1);
    flat.normalize();
    const turn = { front: 0, left: -45, right: 45, above: 0 }[name] * Math.PI / 180;
    const p = flat.applyAxisAngle(new THREE.Vector3(0, 1, 0), turn);
    if (name === "above") p.multiplyScalar(Math.cos(0.6)).add(new THREE.Vector3(0, Math.sin(0.6), 0));
    camera.position.copy(p.multiplyScalar(d));
    camera.up.set(0, 1, 0);
    camera.lookAt(0, 0, 0);
  }
  camera.updateMatrixWorld();
  setProjection();
}

// How much of the view fill this viewpoint shows: 0 within 5 degrees of the tracked camera
// (round the head's centre), 1 from 25, smooth between (gstalk.avatar.views.fill_weight).
const viewCentre = new THREE.Vector3(...V.view_centre);
const toTraining = new THREE.Vector3(...V.training_centre).sub(viewCentre), toCamera = new THREE.Vector3();
function fillWeight() {
  const a = toCamera.copy(camera.position).sub(viewCentre), b = toTraining;
  const cos = a.dot(b) / Math.max(1e-12, a.length() * b.length());
  const deg = Math.acos(Math.min(1, Math.max(-1, cos))) * 180 / Math.PI;
  const t = Math.min(1, Math.max(0, (deg - V.fill_angles[0]) / (V.fill_angles[1] - V.fill_angles[0])));
  return t * t * (3 - 2 * t);
}

// --- frames ------------------------------------------------------------------------------
const scales = new Float32Array(N * 3), rgb = Float32Array.from(colors), opac = new Float32Array(N);
function write(t, w) {
  const m = attrs.means.frame(t), q = attrs.quats.frame(t), ls = attrs.logScales.frame(t), o = attrs.opacities.frame(t);
  for (let i = 0; i < 3 * N; i++) scales[i] = Math.exp(ls[i]);
  opac.set(o);
  rgb.set(colors);
  if (w > 0) {
    if (cut) for (let j = 0; j < cut.idx.length; j++) {
      const g = cut.idx[j] * 3;
      for (let c = 0; c < 3; c++) scales[g + c] *= Math.pow(cut.scale[j * 3 + c], w);
    }
    if (fill) for (let j = 0; j < fill.idx.length; j++) {
      const i = fill.idx[j], g = i * 3;
      for (let c = 0; c < 3; c++) {
        rgb[g + c] += w * (fill.rgb[j * 3 + c] - rgb[g + c]);
        scales[g + c] *= Math.pow(fill.scale[j * 3 + c], w);
      }
      opac[i] += w * (Math.max(opac[i], V.fill_opacity) - opac[i]);
    }
  }
  const arr = packed.packedArray;
  for (let i = 0; i < N; i++) {
    const i3 = i * 3, i4 = i * 4;
    let qw = q[i4], qx = q[i4 + 1], qy = q[i4 + 2], qz = q[i4 + 3];  // gstalk's order: w, x, y, z
    const qn = 1 / Math.max(1e-12, Math.hypot(qw, qx, qy, qz));
    qw *= qn; qx *= qn; qy *= qn; qz *= qn;
    setPackedSplat(arr, i, m[i3], m[i3 + 1], m[i3 + 2], scales[i3], scales[i3 + 1], scales[i3 + 2],
                   qx, qy, qz, qw, Math.min(1, Math.max(0, opac[i])), rgb[i3], rgb[i3 + 1], rgb[i3 + 2]);
  }
  packed.needsUpdate = true;
  mesh.needsUpdate = true;
}

// --- playback: the audio's clock ---------------------------------------------------------
// The speech is decoded whole and played through Web Audio: its context's clock (the sound
// card's) gives the time, and seeking needs nothing of the server (plain static servers such
// as python -m http.server answer no range requests, so a media element could not seek).
const duration = T / fps;
let ctx = null, sound = null;
if (man.audio) {
  const r = await fetch(man.audio);
  if (!r.ok) fail(`cannot load ${man.audio} (${r.status})`);
  const bytes = await r.arrayBuffer();
  ctx = new AudioContext();
  sound = await ctx.decodeAudioData(bytes).catch(() => fail(`cannot decode ${man.audio}`));
}
let source = null, startedAt = 0, offset = 0, running = false;  // running: time advances
let wallStart = 0;
const now = () => {
  if (!running) return offset;
  const t = offset + (ctx ? ctx.currentTime - startedAt : (performance.now() - wallStart) / 1000);
  return Math.min(duration, t);
};
const playing = () => running;
function startSound() {
  if (!ctx) { wallStart = performance.now(); return; }
  source = ctx.createBufferSource();
  source.buffer = sound;
  source.connect(ctx.destination);
  startedAt = ctx.currentTime;
  source.start(0, Math.min(offset, sound.duration));
}
function stopSound() {
  if (source) { source.onended = null; source.stop(); source.disconnect(); source = null; }
}
function play() {
  if (running) return;
  if (offset >= duration - 1e-3) offset = 0;
  if (ctx && ctx.state !== "running") ctx.resume();
  running = true;
  startSound();
}
function pause() {
  if (!running) return;
  offset = now();
  running = false;
  stopSound();
}
function seek(t) {
  t = Math.min(duration, Math.max(0, t));
  if (running) { stopSound(); offset = t; startSound(); } else offset = t;
}

const playBtn = document.getElementById("play"), slider = document.getElementById("time");
const clockEl = document.getElementById("clock"), presetSel = document.getElementById("preset");
playBtn.onclick = () => (playing() ? pause() : play());
slider.oninput = () => seek(slider.value * duration);
presetSel.onchange = () => preset(presetSel.value);
window.addEventListener("resize", () => { layout(); setProjection(); });
if ("xr" in navigator) {
  navigator.xr.isSessionSupported("immersive-vr").then((ok) => {
    if (!ok) return;
    renderer.xr.enabled = true;
    document.body.appendChild(VRButton.createButton(renderer));
  }).catch(() => {});
}

let shown = -1, shownW = -1, drawn = 0, writeMs = 0, frameChanges = 0, draws = 0;
const waiters = [];
preset(params.get("preset") || "tracked");
presetSel.value = params.get("preset") || "tracked";
renderer.setAnimationLoop(() => {
  let t = now();
  if (running && t >= duration) { pause(); offset = t = duration; }
  const f = Math.min(T - 1, Math.max(0, Math.floor(t * fps + 1e-6)));
  const w = fillWeight();
  if (f !== shown || Math.abs(w - shownW) > 0.005) {
    const t0 = performance.now();
    write(f, w);
    writeMs = performance.now() - t0;
    frameChanges++;
    shown = f; shownW = w;
    drawn = 0;
    if (usePlate) plateEl.style.opacity = String(1 - w);
  }
  renderer.render(scene, camera);
  drawn++;
  draws++;
  playBtn.textContent = playing() ? "Pause" : "Play";
  if (document.activeElement !== slider) slider.value = t / duration;
  clockEl.textContent = `${t.toFixed(2)} / ${duration.toFixed(2)} s`;
  // a frame counts as shown once Spark has drawn it a few times (its sort runs in a worker)
  for (let i = waiters.length - 1; i >= 0; i--) if (waiters[i].f === shown && drawn >= 8) waiters.splice(i, 1)[0].done();
});

statusEl.textContent = "";
playBtn.disabled = slider.disabled = false;
// For scripts and tests: the player's state, and showing one time paused.
window.gstalk = {
  frames: T, fps, gaussians: N, duration, play, pause, seek, preset,
  get frame() { return shown; },
  get time() { return now(); },
  // how long rebuilding the last frame took (ms), frames rebuilt and pictures drawn so far
  get stats() { return { writeMs, frameChanges, draws }; },
  show(t) {
    pause();
    seek(t);
    const f = Math.min(T - 1, Math.max(0, Math.floor(Math.min(duration, Math.max(0, t)) * fps + 1e-6)));
    return new Promise((done) => waiters.push({ f, done }));
  },
};
