// The recording page's player: speed, solo a channel (customer left, employee right),
// skip silence, and a live waveform of both channels. Web Audio over the <audio>
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

  // A waveform drawn as the recording plays: one column per slice of the recording's
  // length, the loudest level heard there, customer above, employee below.
  const peaks = [[], []];
  const names = canvas ? [canvas.dataset.customer || "", canvas.dataset.employee || ""] : [];
  function draw() {
    if (canvas) {
      const c = canvas.getContext("2d");
      const w = canvas.width, h = canvas.height, lane = h / 2;
      const d = audio.duration;
      if (graph && !audio.paused && d > 0) {
        const x = Math.min(w - 1, Math.floor((audio.currentTime / d) * w));
        graph.meters.forEach((m, i) => { peaks[i][x] = Math.max(peaks[i][x] || 0, level(m)); });
        document.body.dataset.heard = graph.ears.map((m) => level(m).toFixed(3)).join(",");
        if (skip && skip.checked) {
          const quiet = graph.meters.every((m) => level(m) < 0.01);
          audio.playbackRate = quiet ? 3 : Number(speed.value);
        }
      }
      c.clearRect(0, 0, w, h);
      ["#1d4f91", "#2f855a"].forEach((colour, i) => {
        const mid = lane * i + lane / 2;
        c.fillStyle = "#d9e2ec";
        c.fillRect(0, mid, w, 1);
        c.fillStyle = colour;
        peaks[i].forEach((v, x) => {
          if (v === undefined) return;
          const a = Math.max(1, Math.min(lane / 2 - 2, v * lane * 1.5));
          c.fillRect(x, mid - a, 1, 2 * a);
        });
        c.font = "11px sans-serif";
        c.fillText(names[i], 4, lane * i + 12);
      });
      if (d > 0) {
        c.fillStyle = "#9b2c2c";
        c.fillRect(Math.floor((audio.currentTime / d) * w), 0, 1, h);
      }
    }
    requestAnimationFrame(draw);
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
