// sp2ot pages: upload, live progress, curation, size chart, curves and the 2-D map.
// Plain JavaScript, no library; every request that changes something carries the page's CSRF token.
"use strict";

(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));
  const SVG = "http://www.w3.org/2000/svg";

  function flash(message, kind) {
    const box = $("#flash");
    if (!box) return;
    box.textContent = message;
    box.className = "flash " + (kind || "error");
    box.hidden = false;
    window.scrollTo({ top: 0, behavior: "smooth" });
  }

  async function api(method, url, body) {
    const init = { method: method, headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(url, init);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) throw new Error((data && data.detail) || ("The server answered " + r.status + "."));
    return data;
  }

  function duration(seconds) {
    if (seconds == null || !isFinite(seconds)) return "–";
    seconds = Math.max(0, Math.round(seconds));
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    if (h) return h + " h " + m + " min";
    if (m) return m + " min " + s + " s";
    return s + " s";
  }

  // ---------------------------------------------------------------------------- upload form
  const upload = $("form[data-upload]");
  if (upload) {
    upload.addEventListener("submit", function (ev) {
      ev.preventDefault();
      const data = new FormData(upload);
      for (const [k, v] of Array.from(data.entries())) {
        if (v === "" || (v instanceof File && !v.name)) data.delete(k);  // unset options: server defaults
      }
      const bar = $("#upload-progress"), status = $("#upload-status");
      const button = $("button[type=submit]", upload);
      button.disabled = true;
      bar.hidden = false;
      status.textContent = "Uploading…";
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/jobs");
      xhr.setRequestHeader("X-CSRF-Token", csrf);
      xhr.upload.onprogress = function (e) {
        if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total;
        if (e.loaded === e.total) status.textContent = "Checking the archive…";
      };
      xhr.onload = function () {
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
        if ((xhr.status === 202 || xhr.status === 200) && body && body.id) {
          window.location.href = "/ui/jobs/" + body.id;
          return;
        }
        button.disabled = false;
        bar.hidden = true;
        status.textContent = "";
        flash((body && body.detail) || ("Upload failed (" + xhr.status + ")."));
      };
      xhr.onerror = function () {
        button.disabled = false;
        bar.hidden = true;
        status.textContent = "";
        flash("The upload did not reach the server.");
      };
      xhr.send(data);
    });
  }

  $$("form[data-recluster]").forEach(function (form) {
    form.addEventListener("submit", async function (ev) {
      ev.preventDefault();
      const k = parseInt(new FormData(form).get("n_clusters"), 10);
      try {
        const job = await api("POST", "/jobs", { dataset_id: form.dataset.recluster, n_clusters: k });
        window.location.href = "/ui/jobs/" + job.id;
      } catch (e) { flash(e.message); }
    });
  });

  // ------------------------------------------------------------- home: live job progress bars
  const liveJobs = $("table[data-live-jobs]");
  if (liveJobs && $$('tr[data-status="queued"], tr[data-status="running"]', liveJobs).length) {
    const timer = setInterval(async function () {
      const rows = $$('tr[data-status="queued"], tr[data-status="running"]', liveJobs);
      if (!rows.length) { clearInterval(timer); return; }
      for (const row of rows) {
        try {
          const r = await fetch("/ui/jobs/" + row.dataset.job + "/live.json", { credentials: "same-origin" });
          if (!r.ok) continue;
          const j = await r.json();
          row.dataset.status = j.status;
          const badge = $('[data-field="status"]', row);
          badge.textContent = j.status;
          badge.className = "badge " + j.status;
          const pct = j.status === "succeeded" ? 100 : (j.progress.percent || 0);
          const fill = $('[data-field="bar"]', row);
          fill.style.width = pct + "%";
          fill.className = "fill " + j.status;
          $('[data-field="stage"]', row).textContent = j.progress.stage || "";
        } catch (e) { /* next tick */ }
      }
    }, 2000);
  }

  // ------------------------------------------------------------------------------ curves
  function drawCurve(svg, points) {
    // points: [[x, loss, rho], ...]; loss scaled to its own range, rho to [0, 1].
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const W = 600, H = 180, pad = 6;
    const pts = points.filter(function (p) { return p[1] != null; });
    if (pts.length < 2) {
      const t = document.createElementNS(SVG, "text");
      t.setAttribute("x", "10"); t.setAttribute("y", "95"); t.setAttribute("class", "curve-empty");
      t.textContent = "the curve appears when training starts";
      svg.appendChild(t);
      return;
    }
    const xs = pts.map(function (p) { return p[0]; });
    const x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs) || 1;
    const losses = pts.map(function (p) { return p[1]; });
    const l0 = Math.min.apply(null, losses), l1 = Math.max.apply(null, losses);
    const sx = function (x) { return pad + ((x - x0) / ((x1 - x0) || 1)) * (W - 2 * pad); };
    const sl = function (v) { return H - pad - ((v - l0) / ((l1 - l0) || 1)) * (H - 2 * pad); };
    const sr = function (v) { return H - pad - v * (H - 2 * pad); };
    function line(cls, f, idx) {
      const d = pts.filter(function (p) { return p[idx] != null; })
        .map(function (p) { return sx(p[0]).toFixed(1) + "," + f(p[idx]).toFixed(1); }).join(" ");
      const pl = document.createElementNS(SVG, "polyline");
      pl.setAttribute("points", d);
      pl.setAttribute("class", cls);
      svg.appendChild(pl);
    }
    line("loss", sl, 1);
    line("rho", sr, 2);
  }

  const historyData = $("#history"), historySvg = $("#history-curve");
  if (historyData && historySvg) {
    const h = JSON.parse(historyData.textContent);
    drawCurve(historySvg, h.map(function (e) { return [e.epoch, e.loss, e.rho]; }));
  }

  // --------------------------------------------------------------------- job page: live view
  // Share of the whole run each stage takes (rough, for the estimate of the time left). Loading
  // decodes every image once (and makes the thumbnails from it); "thumbnails" only writes them.
  const STAGES = [["loading", 0.12], ["features", 0.30], ["graph", 0.03], ["starts", 0.04], ["training", 0.42],
                  ["predicting", 0.03], ["done", 0.0], ["thumbnails", 0.01], ["map", 0.05]];

  function overall(stage, percent) {
    let before = 0;
    for (const [name, share] of STAGES) {
      if (name === stage) return before + share * (percent || 0) / 100;
      before += share;
    }
    return null;
  }

  const live = $("#live");
  if (live) {
    const jobId = live.dataset.job;
    let state = JSON.parse($("#live-initial").textContent);
    let fetchedAt = Date.now();
    let stageSeen = null;
    function show() {
      const p = state.progress || {};
      $("#live-status").textContent = state.status;
      $("#live-status").className = "badge " + state.status;
      $("#live-stage").textContent = p.stage ? "stage: " + p.stage : "";
      $("#live-bar").style.width = (state.status === "succeeded" ? 100 : (p.percent || 0)) + "%";
      $("#live-percent").textContent = p.percent != null ? p.percent.toFixed(1) + " %" : "–";
      $("#live-epoch").textContent = p.epoch != null ? String(p.epoch) : "–";
      $("#live-rho").textContent = p.rho != null ? p.rho.toFixed(3) : "–";
      $("#live-loss").textContent = p.loss != null ? p.loss.toFixed(4) : "–";
      const elapsed = state.elapsed + (state.status === "running" ? (Date.now() - fetchedAt) / 1000 : 0);
      $("#live-elapsed").textContent = state.status === "queued" ? "waiting for a worker" : duration(elapsed);
      // The time left: from the whole run's share done, or from this stage's own pace since the
      // page saw it start, whichever is longer (stages take different shares on different data).
      const f = overall(p.stage, p.percent);
      if (!stageSeen || stageSeen.stage !== p.stage) stageSeen = { stage: p.stage, t: Date.now(), pct: p.percent || 0 };
      let eta = f && f > 0.03 ? elapsed * (1 - f) / f : null;
      const gained = (p.percent || 0) - stageSeen.pct, spent = (Date.now() - stageSeen.t) / 1000;
      if (gained > 1 && spent > 2) eta = Math.max(eta || 0, spent * (100 - p.percent) / gained);
      $("#live-eta").textContent = state.status === "running" && eta != null ? "about " + duration(eta) : "–";
      drawCurve($("#live-curve"), p.curve || []);
      if (state.error) { $("#live-error").textContent = state.error; $("#live-error").hidden = false; }
      $("#live-cancelled").hidden = state.status !== "cancelled";
      $("#cancel-job").hidden = !(state.status === "queued" || state.status === "running");
    }
    show();
    async function poll() {
      try {
        const r = await fetch("/ui/jobs/" + jobId + "/live.json", { credentials: "same-origin" });
        if (r.ok) { state = await r.json(); fetchedAt = Date.now(); }
      } catch (e) { /* the server may be restarting: try again */ }
      show();
      if (state.status === "succeeded") { window.location.reload(); return; }
      if (state.status === "queued" || state.status === "running") setTimeout(poll, 1000);
    }
    if (state.status === "queued" || state.status === "running") setTimeout(poll, 1000);
    setInterval(function () { if (state.status === "running") show(); }, 1000);
    $("#cancel-job").addEventListener("click", async function () {
      try { await api("POST", "/jobs/" + jobId + "/cancel"); } catch (e) { flash(e.message); }
    });
  }

  // ------------------------------------------------------------------------ size bar chart
  const sizeData = $("#sizes"), chart = $("#size-chart");
  if (sizeData && chart) {
    const sizes = JSON.parse(sizeData.textContent);
    const n = sizes.length, W = 900, H = 160, gap = n > 200 ? 0 : 1;
    chart.setAttribute("viewBox", "0 0 " + W + " " + (H + 4));
    chart.setAttribute("preserveAspectRatio", "none");
    const max = Math.max(1, Math.max.apply(null, sizes.map(function (c) { return c.size; })));
    const bw = W / Math.max(n, 1);
    sizes.forEach(function (c, i) {
      const h = c.size ? Math.max(2, (c.size / max) * H) : 0;  // a 1-image cluster stays visible
      const a = document.createElementNS(SVG, "a");
      a.setAttribute("href", "/ui/jobs/" + chart.closest("[data-result]").dataset.result + "/clusters/" + c.id);
      const r = document.createElementNS(SVG, "rect");
      r.setAttribute("x", (i * bw).toFixed(2));
      r.setAttribute("y", (H - h).toFixed(2));
      r.setAttribute("width", Math.max(0.5, bw - gap).toFixed(2));
      r.setAttribute("height", h.toFixed(2));
      r.setAttribute("fill", colour(c.id));
      const t = document.createElementNS(SVG, "title");
      t.textContent = c.name + ": " + c.size + " images";
      r.appendChild(t);
      a.appendChild(r);
      chart.appendChild(a);
    });
  }

  function colour(i) {
    // Distinct hues by the golden angle; same colour for a cluster on every page.
    return "hsl(" + ((i * 137.508) % 360).toFixed(1) + ", 62%, " + (i % 2 ? 48 : 40) + "%)";
  }

  // ------------------------------------------------------------------------------ curation
  const resultRoot = $("[data-result]");
  const jobOfPage = resultRoot ? resultRoot.dataset.result : null;

  async function curate(action, body) {
    try {
      await api("POST", "/jobs/" + jobOfPage + "/curation/" + action, body);
      window.location.reload();
    } catch (e) { flash(e.message); }
  }

  $$('[data-action="rename"]').forEach(function (b) {
    b.addEventListener("click", function () {
      const name = window.prompt("New name of this cluster:", b.dataset.name);
      if (name !== null && name.trim()) curate("rename", { cluster: parseInt(b.dataset.cluster, 10), name: name });
    });
  });
  const undo = $('[data-action="undo"]');
  if (undo) undo.addEventListener("click", function () { curate("undo"); });
  const reset = $('[data-action="reset"]');
  if (reset) reset.addEventListener("click", function () {
    if (window.confirm("Forget every change (names, merges, moves) and go back to the computed clusters?")) curate("reset");
  });
  const merge = $('[data-action="merge"]');
  if (merge) merge.addEventListener("click", function () {
    const picked = $$(".merge-pick:checked").map(function (c) { return parseInt(c.value, 10); });
    let into = $("#merge-into").value;
    if (into === "" && picked.length) into = String(picked[0]);
    if (!picked.length || into === "") { flash("Tick the clusters to merge, and choose the one they go into."); return; }
    curate("merge", { clusters: picked, into: parseInt(into, 10) });
  });
  const pickAll = $("#pick-all");
  if (pickAll) pickAll.addEventListener("change", function () {
    $$(".image-pick").forEach(function (c) { c.checked = pickAll.checked; });
  });
  const move = $('[data-action="move"]');
  if (move) move.addEventListener("click", function () {
    const names = $$(".image-pick:checked").map(function (c) { return c.value; });
    const to = $("#move-to").value;
    if (!names.length || to === "") { flash("Select images and the cluster to move them to."); return; }
    curate("move", { images: names, to: to === "new" ? "new" : parseInt(to, 10) });
  });

  // ----------------------------------------------------------------------------- the 2-D map
  const canvas = $("#map");
  if (canvas) {
    const jobId = canvas.dataset.job;
    const legend = JSON.parse($("#legend").textContent);
    const tip = $("#map-tip");
    let xs = null, ys = null, cl = null, n = 0, grid = null;
    const G = 64;  // hover lookup: points bucketed in a G x G grid
    const ratio = window.devicePixelRatio || 1;
    const cssW = canvas.clientWidth || 900, cssH = Math.round(cssW * 0.7);
    canvas.width = cssW * ratio; canvas.height = cssH * ratio;
    canvas.style.height = cssH + "px";
    const ctx = canvas.getContext("2d");
    const pad = 12;
    const px = function (x) { return pad + x * (cssW - 2 * pad); };
    const py = function (y) { return pad + (1 - y) * (cssH - 2 * pad); };

    fetch("/ui/jobs/" + jobId + "/map.bin", { credentials: "same-origin" }).then(function (r) {
      if (!r.ok) throw new Error("The map could not be loaded (" + r.status + ").");
      return r.arrayBuffer();
    }).then(function (buf) {
      n = buf.byteLength / 12;
      const pos = new Float32Array(buf, 0, 2 * n);
      cl = new Int32Array(buf, 8 * n, n);
      xs = new Float32Array(n); ys = new Float32Array(n);
      grid = new Map();
      for (let i = 0; i < n; i++) {
        xs[i] = pos[2 * i]; ys[i] = pos[2 * i + 1];
        const key = Math.min(G - 1, Math.floor(xs[i] * G)) * G + Math.min(G - 1, Math.floor(ys[i] * G));
        if (!grid.has(key)) grid.set(key, []);
        grid.get(key).push(i);
      }
      draw();
    }).catch(function (e) { flash(e.message); });

    function draw() {
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, cssW, cssH);
      const r = n > 20000 ? 1.2 : n > 2000 ? 2 : 3.5;
      for (let i = 0; i < n; i++) {
        ctx.fillStyle = colour(cl[i]);
        ctx.fillRect(px(xs[i]) - r, py(ys[i]) - r, 2 * r, 2 * r);
      }
    }

    function nearest(ev) {
      if (!grid) return -1;
      const rect = canvas.getBoundingClientRect();
      const mx = ev.clientX - rect.left, my = ev.clientY - rect.top;
      const x = (mx - pad) / (cssW - 2 * pad), y = 1 - (my - pad) / (cssH - 2 * pad);
      const gx = Math.floor(x * G), gy = Math.floor(y * G);
      let best = -1, bestD = 100;  // within 10 px
      for (let a = gx - 1; a <= gx + 1; a++) for (let b = gy - 1; b <= gy + 1; b++) {
        const cell = grid.get(a * G + b);
        if (!cell) continue;
        for (const i of cell) {
          const dx = px(xs[i]) - mx, dy = py(ys[i]) - my, d = dx * dx + dy * dy;
          if (d < bestD) { bestD = d; best = i; }
        }
      }
      return best;
    }

    const names = {};
    legend.forEach(function (c) { names[c.id] = c.name; });
    canvas.addEventListener("mousemove", function (ev) {
      const i = nearest(ev);
      if (i < 0) { tip.hidden = true; canvas.style.cursor = "default"; return; }
      canvas.style.cursor = "pointer";
      const img = $("img", tip);
      const src = "/ui/jobs/" + jobId + "/thumbs/" + i + ".jpg";
      if (img.getAttribute("src") !== src) img.setAttribute("src", src);
      $("span", tip).textContent = names[cl[i]] || ("cluster " + cl[i]);
      const rect = canvas.getBoundingClientRect();
      tip.style.left = (ev.clientX - rect.left + 14) + "px";
      tip.style.top = (ev.clientY - rect.top + 14) + "px";
      tip.hidden = false;
    });
    canvas.addEventListener("mouseleave", function () { tip.hidden = true; });
    canvas.addEventListener("click", function (ev) {
      const i = nearest(ev);
      if (i >= 0) window.location.href = "/ui/jobs/" + jobId + "/images/" + i;
    });
    const ul = $("#map-legend");
    legend.filter(function (c) { return c.size > 0; }).forEach(function (c) {
      const li = document.createElement("li");
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = colour(c.id);
      li.appendChild(sw);
      li.appendChild(document.createTextNode(c.name + " (" + c.size + ")"));
      ul.appendChild(li);
    });
  }
})();
