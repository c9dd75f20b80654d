// The recording page's player: speed, solo a channel (customer left, employee right),
// skip silence, and the waveform of both channels. Web Audio over the <audio>
// element, which streams the recording through HTTP Range requests. No inline script
// (the Content-Security-Policy forbids it).
"use strict";

(function () {
  const audio = document.getElementById("audio");
  if (!audio) return;
  const speed = document.getElementById("speed");
  const skip = document.getElementById("skip-silence");
  const canvas = document.getElementById("wave");
  let graph = null;

  function build() {
    const ctx = new AudioContext();
    const source = ctx.createMediaElementSource(audio);
    const split = ctx.createChannelSplitter(2);
    const merge = ctx.createChannelMerger(2);
    const left = ctx.createGain(), right = ctx.createGain();
    const leftToRight = ctx.createGain(), rightToLeft = ctx.createGain();
    const meters = [ctx.createAnalyser(), ctx.createAnalyser()];
    source.connect(split);
    split.connect(left, 0); split.connect(right, 1);
    split.connect(leftToRight, 0); split.connect(rightToLeft, 1);
    split.connect(meters[0], 0); split.connect(meters[1], 1);
    left.connect(merge, 0, 0); right.connect(merge, 0, 1);
    leftToRight.connect(merge, 0, 1); rightToLeft.connect(merge, 0, 0);
    merge.connect(ctx.destination);
    // What the listener hears, per ear (document.body.dataset.heard: "left,right").
    const heard = ctx.createChannelSplitter(2);
    const ears = [ctx.createAnalyser(), ctx.createAnalyser()];
    merge.connect(heard);
    heard.connect(ears[0], 0); heard.connect(ears[1], 1);
    meters.concat(ears).forEach((m) => { m.fftSize = 1024; });
    return { ctx, left, right, leftToRight, rightToLeft, meters, ears };
  }

  function solo(which) {
    if (!graph) graph = build();
    const g = graph;
    // both: stereo as recorded; customer/employee: that channel to both ears.
    g.left.gain.value = which === "employee" ? 0 : 1;
    g.right.gain.value = which === "customer" ? 0 : 1;
    g.leftToRight.gain.value = which === "customer" ? 1 : 0;
    g.rightToLeft.gain.value = which === "employee" ? 1 : 0;
    document.body.dataset.solo = which;
  }

  function level(meter) {
    const data = new Float32Array(meter.fftSize);
    meter.getFloatTimeDomainData(data);
    let sum = 0;
    for (const v of data) sum += v * v;
    return Math.sqrt(sum / data.length);
  }

  // The waveform: the whole recording's peaks from the store (/waveform, a few kB)
  // drawn as soon as they arrive, customer above, employee below; until then (or if
  // the store gives none) the levels heard so far. Marked intervals (data-marks: a
  // JSON list of {start_s, end_s, label}, e.g. pauses) are shaded bands. A click on the
  // waveform seeks there.
  const peaks = [[], []];
  const names = canvas ? [canvas.dataset.customer || "", canvas.dataset.employee || ""] : [];
  const marks = canvas ? JSON.parse(canvas.dataset.marks || "[]") : [];
  let wave = null;
  if (canvas && canvas.dataset.waveform) {
    fetch(canvas.dataset.waveform, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : null))
      .then((w) => { wave = w; document.body.dataset.waveform = w ? "loaded" : "none"; })
      .catch(() => { document.body.dataset.waveform = "none"; });
  }
  function length() {
    if (Number.isFinite(audio.duration) && audio.duration > 0) return audio.duration;
    return wave ? wave.duration_ms / 1000 : 0;
  }
  function column(levels, x, w) {
    const n = levels.length, from = Math.floor((x * n) / w);
    const to = Math.max(from + 1, Math.floor(((x + 1) * n) / w));
    let top = 0;
    for (let i = from; i < to; i++) top = Math.max(top, levels[i] || 0);
    return Math.sqrt(top / 255);  // square root: quiet speech stays visible
  }
  function draw() {
    if (canvas) {
      const c = canvas.getContext("2d");
      const w = canvas.width, h = canvas.height, lane = h / 2;
      const d = length();
      if (graph && !audio.paused && d > 0) {
        const x = Math.min(w - 1, Math.floor((audio.currentTime / d) * w));
        graph.meters.forEach((m, i) => { peaks[i][x] = Math.max(peaks[i][x] || 0, Math.min(1, level(m) * 3)); });
        document.body.dataset.heard = graph.ears.map((m) => level(m).toFixed(3)).join(",");
        if (skip && skip.checked) {
          const quiet = graph.meters.every((m) => level(m) < 0.01);
          audio.playbackRate = quiet ? 3 : Number(speed.value);
        }
      }
      c.clearRect(0, 0, w, h);
      if (d > 0) {
        c.fillStyle = "#fbe7c6";
        marks.forEach((m) => {
          const x0 = Math.floor((m.start_s / d) * w), x1 = Math.ceil((m.end_s / d) * w);
          c.fillRect(x0, 0, Math.max(1, x1 - x0), h);
        });
      }
      ["#1d4f91", "#2f855a"].forEach((colour, i) => {
        const mid = lane * i + lane / 2;
        c.fillStyle = "#d9e2ec";
        c.fillRect(0, mid, w, 1);
        c.fillStyle = colour;
        for (let x = 0; x < w; x++) {
          const v = wave ? column(i ? wave.right : wave.left, x, w) : peaks[i][x];
          if (v === undefined) continue;
          const a = Math.max(1, Math.min(lane / 2 - 2, v * (lane / 2 - 2)));
          c.fillRect(x, mid - a, 1, 2 * a);
        }
      });
      // The lane names last, on a light box, so a loud lane does not hide them.
      const px = window.devicePixelRatio || 1;
      c.font = `${11 * px}px sans-serif`;
      names.forEach((name, i) => {
        c.fillStyle = "rgba(250, 251, 252, 0.85)";
        c.fillRect(2 * px, lane * i + 2 * px, c.measureText(name).width + 6 * px, 14 * px);
        c.fillStyle = i ? "#22543d" : "#1a365d";
        c.fillText(name, 5 * px, lane * i + 13 * px);
      });
      if (d > 0) {
        c.fillStyle = "#9b2c2c";
        c.fillRect(Math.floor((audio.currentTime / d) * w), 0, 1, h);
      }
    }
    requestAnimationFrame(draw);
  }
  // Draw at the canvas's real size in device pixels (crisp at any width).
  function fit() {
    const px = window.devicePixelRatio || 1;
    const w = Math.round(canvas.clientWidth * px), h = Math.round(canvas.clientHeight * px);
    if (w > 0 && (canvas.width !== w || canvas.height !== h)) {
      canvas.width = w; canvas.height = h;
      peaks[0] = []; peaks[1] = [];
    }
  }
  if (canvas) {
    fit();
    window.addEventListener("resize", fit);
    canvas.addEventListener("click", (e) => {
      const d = length(), box = canvas.getBoundingClientRect();
      if (d > 0) audio.currentTime = ((e.clientX - box.left) / box.width) * d;
    });
  }

  audio.addEventListener("play", () => {
    if (!graph) solo("both");
    if (graph.ctx.state === "suspended") graph.ctx.resume();
  });
  speed.addEventListener("change", () => { audio.playbackRate = Number(speed.value); });
  document.querySelectorAll("input[name=solo]").forEach((r) =>
    r.addEventListener("change", () => solo(r.value)));
  audio.addEventListener("contextmenu", (e) => e.preventDefault());
  // The store refused the audio (a restricted recording, a purpose the role may not
  // use) or the session ended: say so instead of a silent, broken player.
  audio.addEventListener("error", () => {
    document.getElementById("audio-error").hidden = false;
    [audio, canvas, document.querySelector(".controls")].forEach((e) => { if (e) e.hidden = true; });
  });
  requestAnimationFrame(draw);
})();
