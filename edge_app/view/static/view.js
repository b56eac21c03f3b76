// musc-edge operator view: polls /api/live and redraws the dashboard. Plain DOM, no library, no build.
// Every value from the line is set as text (textContent / SVG text), never parsed as HTML.
"use strict";
(() => {
  const refreshMs = Number(document.body.dataset.refreshMs) || 1000;
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const num = (x, digits = 3) => (x === null || x === undefined ? "–" : x.toFixed(digits));
  const ms = (x) => (x === null || x === undefined ? "–" : x.toFixed(1));
  const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);
  const time = (epoch, parts) => new Date(epoch * 1000).toLocaleTimeString([], { ...parts, hourCycle: "h23" });
  const clock = (epoch) => time(epoch, { hour: "2-digit", minute: "2-digit" });
  const age = (s) => (s === null || s === undefined ? "–" : s < 90 ? `${s.toFixed(0)} s` : `${(s / 60).toFixed(0)} min`);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    for (const child of children) node.append(child);
    return node;
  }
  function svgEl(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  const setText = (id, text) => { $(id).textContent = text; };
  // A section is redrawn only when its data changed: on a device that also runs the line, every redraw (and
  // the raster that follows it) is CPU taken from the parts.
  const drawn = {};
  const changed = (section, data) => {
    const key = JSON.stringify(data);
    if (drawn[section] === key) return false;
    drawn[section] = key;
    return true;
  };

  function thumb(part) {
    const rejected = part.verdict === "REJECT";
    const src = part.images.thumb;   // a small JPEG made once by the view: no full-size decode per refresh
    const picture = src ? el("img", { src, alt: `heat map of part ${part.part_id}` })
                        : el("span", { class: "noimg" }, "no image");
    return el("a", { class: `thumb ${rejected ? "ng" : "nv"}`, href: `/part/${part.seq}` }, picture,
      el("span", { class: "cap" }, el("b", {}, part.part_id),
        el("span", {}, `${rejected ? "NG" : "NV"} · ${part.reason}`
                       + (part.score === null ? "" : ` · ${num(part.score, 2)}`))));
  }

  function drawFlagged(flagged) {
    // Rebuilt only when a part or an archived image changed: no flicker, images stay cached.
    if (!changed("flagged", flagged.map((p) => [p.seq, p.images]))) return;
    const box = $("flagged");
    box.replaceChildren(...(flagged.length ? flagged.map(thumb) : [el("p", { class: "empty" }, "No rejects this shift.")]));
  }

  function histogram(recipe, h) {
    const W = 600, H = 150, left = 30, bottom = 20, top = 16;
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `score histogram ${recipe}` });
    const bins = h.accepted.length;
    const peak = Math.max(1, ...h.accepted.map((a, i) => a + h.rejected[i]));
    const x = (score) => left + ((score - h.lo) / (h.hi - h.lo)) * (W - left - 4);
    const y = (count) => H - bottom - (count / peak) * (H - bottom - top);
    const width = (W - left - 4) / bins;
    svg.append(svgEl("line", { class: "axis", x1: left, x2: W, y1: H - bottom, y2: H - bottom }));
    for (let i = 0; i < bins; i++) {
      const x0 = left + i * width + 1, ok = h.accepted[i], ng = h.rejected[i];
      if (ok) svg.append(svgEl("rect", { class: "bar-ok", x: x0, width: width - 2, y: y(ok), height: y(0) - y(ok) }));
      if (ng) svg.append(svgEl("rect", { class: "bar-ng", x: x0, width: width - 2, y: y(ok + ng), height: y(ok) - y(ok + ng) }));
    }
    svg.append(svgEl("text", { x: 2, y: top + 4 }, String(peak)), svgEl("text", { x: 2, y: H - bottom }, "0"),
      svgEl("text", { x: left, y: H - 4 }, num(h.lo, 2)),
      svgEl("text", { x: W - 4, y: H - 4, "text-anchor": "end" }, num(h.hi, 2)));
    if (h.threshold !== null) {
      const tx = x(h.threshold);
      svg.append(svgEl("line", { class: "threshold", x1: tx, x2: tx, y1: top - 4, y2: H - bottom }),
        svgEl("text", { class: "threshold-label", x: tx + 4, y: top + 4 }, `threshold ${num(h.threshold)}`));
    }
    return svg;
  }

  function drawHistograms(histograms) {
    const recipes = Object.keys(histograms);
    const box = $("histograms");
    if (!recipes.length) { box.replaceChildren(el("p", { class: "empty" }, "No scored parts yet.")); return; }
    const n = recipes.reduce((sum, r) => sum + histograms[r].n, 0);
    setText("hist-note", `last ${n} scored parts · green OK, red NG · threshold marked`);
    box.replaceChildren(...recipes.flatMap((r) => [
      ...(recipes.length > 1 ? [el("div", { class: "recipe" }, r)] : []), histogram(r, histograms[r])]));
  }

  function drawRate(rate) {
    const W = 600, H = 80, bottom = 14, buckets = rate.buckets;
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "reject rate over the shift" });
    const slots = Math.max(buckets.length, 32), width = W / slots;
    const peak = Math.max(0.05, ...buckets.map((b) => (b.parts ? (b.ng + b.no_verdict) / b.parts : 0)));
    const h = (share) => (share / peak) * (H - bottom - 12);
    buckets.forEach((b, i) => {
      const x = i * width + 1, base = H - bottom;
      svg.append(svgEl("rect", { class: "bar-parts", x, width: width - 2, y: base - 2, height: 2 }));
      if (!b.parts) return;
      const ng = h(b.ng / b.parts), nv = h(b.no_verdict / b.parts);
      svg.append(svgEl("rect", { class: "bar-ng", x, width: width - 2, y: base - ng, height: ng }),
        svgEl("rect", { class: "bar-nv", x, width: width - 2, y: base - ng - nv, height: nv }));
      const title = svgEl("title", {}, `${clock(b.start)}: ${b.parts} parts, ${b.ng} NG, ${b.no_verdict} NO VERDICT`);
      svg.lastChild.append(title);
    });
    svg.append(svgEl("text", { x: 0, y: H - 2 }, buckets.length ? clock(buckets[0].start) : ""),
      svgEl("text", { x: W, y: 10, "text-anchor": "end" }, `peak ${pct(peak)}`));
    $("rate-chart").replaceChildren(svg);
  }

  function drawLatency(latency) {
    $("latency").replaceChildren(...Object.entries(latency).map(([stage, s]) =>
      el("tr", {}, el("td", {}, stage), el("td", {}, ms(s.median)), el("td", {}, ms(s.p99)), el("td", {}, ms(s.max)))));
  }

  function drawHealth(live) {
    const rows = [];
    const add = (label, value, good) => rows.push(el("dt", {}, label),
      el("dd", good === undefined ? {} : { class: good ? "good" : "bad" }, value));
    if (!live.running) {
      add("runtime", "not answering", false);
      $("health").replaceChildren(...rows);
      $("alarms").replaceChildren(el("li", {}, live.error || "the line is not running"));
      return;
    }
    const link = live.link;
    if (link) {
      add("PLC link", link.connected ? "connected" : "DOWN", link.connected);
      add("last ack", age(link.last_ack_age_s));
      add("outbox", String(link.outbox_depth), link.outbox_depth < 3);
    } else {
      add("PLC link", "none");
    }
    add("engine queue", String(live.queue_depth));
    for (const [name, p] of Object.entries(live.pools)) {
      add(`pool ${name}`, `${p.size} / ${p.capacity}${p.golden ? ` (${p.golden} golden)` : ""}`, p.size >= p.min_size);
      add("oldest member", age(p.oldest_age_s));
    }
    if (live.dry_run) add("mode", "DRY RUN: not signalling", false);
    $("health").replaceChildren(...rows);
    const alarms = [...(link ? link.alarms : []), ...live.alarms.slice(-4).reverse()];
    $("alarms").replaceChildren(...(alarms.length ? alarms.map((a) => el("li", { title: a }, a))
                                                  : [el("li", { class: "none" }, "no alarms")]));
  }

  function draw(page) {
    const live = page.live;
    $("run-dot").className = `dot ${live.running ? "up" : "down"}`;
    setText("run-state", live.running ? (live.dry_run ? "RUNNING · DRY RUN" : "RUNNING") : "NOT RUNNING");
    setText("shift", clock(page.shift_start));
    setText("calibration", live.calibration_version ?? "–");
    setText("updated", `updated ${time(page.now, { hour: "2-digit", minute: "2-digit", second: "2-digit" })}`);
    if (changed("health", live)) drawHealth(live);
    if (!page.ledger) {
      delete drawn.flagged;   // redrawn when the ledger is back
      $("flagged").replaceChildren(el("p", { class: "empty" }, page.ledger_error || "Waiting for the line's ledger."));
      return;
    }
    const c = page.counters;
    setText("parts", c.parts);
    setText("unacked", `${c.unacked} awaiting PLC ack`);
    setText("ok", c.ok);
    setText("ng", c.ng);
    setText("no-verdict", c.no_verdict);
    const reasons = Object.entries(c.no_verdict_by_reason).sort();
    setText("reasons", reasons.length ? reasons.map(([r, n]) => `${r} ${n}`).join(" · ") : "none");
    setText("reject-rate", pct(c.reject_rate));
    setText("nv-rate", c.no_verdict_rate === null ? "no parts yet" : `${pct(c.no_verdict_rate)} no verdict`);
    drawFlagged(page.flagged);
    if (changed("histograms", page.histograms)) drawHistograms(page.histograms);
    if (changed("rate", page.rate)) drawRate(page.rate);
    if (changed("latency", page.latency_ms)) drawLatency(page.latency_ms);
  }

  async function poll() {
    try {
      const reply = await fetch("/api/live", { cache: "no-store" });
      if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
      draw(await reply.json());
      $("stale").hidden = true;
    } catch (err) {
      $("stale").hidden = false;
    } finally {
      setTimeout(poll, refreshMs);
    }
  }
  poll();
})();
