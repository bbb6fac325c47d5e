// tessera GPU map. Polls /api/v1/cluster and /api/v1/pending; asks /api/v1/explain/{ns}/{pod}
// about the pending pod that is clicked. Plain DOM, no dependencies.
"use strict";

(() => {
  const POLL_MS = 3000;
  // Nodes drawn in full before the rest collapse into summary tiles.
  const FULL_NODES = 100;

  const $ = (id) => document.getElementById(id);
  const state = {
    cluster: null,
    pending: [],
    selected: null,
    opened: new Set(),
    drawnKey: "",
    explained: "",
  };

  // ---- small helpers ------------------------------------------------------------------------

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "style") Object.assign(el.style, v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : String(kid));
    }
    return el;
  }

  const pct = (x) => `${(x * 100).toFixed(4)}%`;
  const nsOf = (pod) => pod.split("/")[0];
  const nameOf = (pod) => pod.slice(pod.indexOf("/") + 1);
  // A pod's model: its name without replica suffixes (`minilm-embed-0` → `minilm-embed`).
  const modelOf = (pod) => nameOf(pod).replace(/(-[0-9]+|-[a-z0-9]{5})$/, "");
  const gib = (mib) => (mib / 1024).toFixed(mib >= 10240 ? 0 : 1);
  const plural = (n, one, many) => `${n.toLocaleString()} ${n === 1 ? one : many || one + "s"}`;

  function hue(text) {
    let x = 2166136261;
    for (let i = 0; i < text.length; i++) {
      x ^= text.charCodeAt(i);
      x = Math.imul(x, 16777619) >>> 0;
    }
    return Math.round((x % 1000) * 0.3606) % 360;
  }
  // Holders get well-spread hues by their rank among all holder keys; unknown keys hash.
  const palette = new Map();
  function setPalette(keys) {
    palette.clear();
    keys.forEach((k, i) => palette.set(k, [Math.round(i * 137.508) % 360, i % 2 ? 70 : 80]));
  }
  function colour(key) {
    const [hh, l] = palette.get(key) || [hue(key), 76];
    return `hsl(${hh} 60% ${l}%)`;
  }

  function describeGpu(g) {
    if (!g) return "no GPU";
    switch (g.kind) {
      case "none": return "no GPU";
      case "whole": return g.count === 1 ? "1 whole GPU" : `${g.count} whole GPUs (one node, non-MIG)`;
      case "mig": return `MIG ${g.profile}`;
      case "model": {
        const c = g.compute_slices ? ` and ${g.compute_slices}/7 compute` : "";
        return `${gib(g.memory_mib)} GiB GPU memory${c} (smallest fitting slice)`;
      }
      case "share": return `${g.milli} milli-GPU time-sliced share`;
      default: return JSON.stringify(g);
    }
  }

  async function getJSON(path) {
    const r = await fetch(path, { cache: "no-store" });
    const body = await r.json().catch(() => null);
    if (!r.ok) {
      const why = body && body.Error ? body.Error : `HTTP ${r.status}`;
      const e = new Error(why);
      e.status = r.status;
      throw e;
    }
    return body;
  }

  function showError(text) {
    const el = $("error");
    el.textContent = text;
    el.hidden = !text;
  }

  // ---- derived views ------------------------------------------------------------------------

  function index(c) {
    const alloc = new Map();
    const shares = new Map(); // "node/gpu" → [{pod, milli}]
    for (const a of c.allocations) {
      alloc.set(a.pod, a);
      for (const g of a.grants) {
        if (g.kind !== "share") continue;
        const k = `${a.node}/${g.gpu}`;
        if (!shares.has(k)) shares.set(k, []);
        shares.get(k).push({ pod: a.pod, milli: g.milli });
      }
    }
    return { alloc, shares };
  }

  function filters() {
    return {
      pool: $("f-pool").value,
      ns: $("f-ns").value,
      colourBy: $("f-colour").value,
      node: $("f-node").value.trim().toLowerCase(),
    };
  }

  function holderKey(pod, a, colourBy) {
    switch (colourBy) {
      case "namespace": return nsOf(pod);
      case "pod": return pod;
      case "gang": return a && a.gang ? `gang ${a.gang}` : "no gang";
      default: return `${nsOf(pod)}/${modelOf(pod)}`;
    }
  }

  function fillSelect(sel, values, allLabel) {
    const keep = sel.value;
    const want = ["", ...values];
    const have = Array.from(sel.options).map((o) => o.value);
    if (want.join("\n") !== have.join("\n")) {
      sel.replaceChildren(...want.map((v) => h("option", { value: v }, v === "" ? allLabel : v)));
    }
    sel.value = want.includes(keep) ? keep : "";
  }

  // ---- the map ------------------------------------------------------------------------------

  function holderBlock(cls, pod, ctx, style, label) {
    const a = ctx.ix.alloc.get(pod);
    const reserved = a && a.state === "reserved";
    const key = holderKey(pod, a, ctx.f.colourBy);
    ctx.keys.set(key, (ctx.keys.get(key) || 0) + 1);
    const classes = [cls, "slice", reserved ? "reserved" : "held"];
    if (ctx.f.ns && nsOf(pod) !== ctx.f.ns) classes.push("dim");
    if (state.selected === pod) classes.push("picked");
    const what = reserved ? `reserved for gang ${a.gang || "?"} until every member binds` : (a && a.state) || "held";
    return h(
      "div",
      {
        class: classes.join(" "),
        style: Object.assign(reserved ? {} : { background: colour(key) }, style.css),
        dataset: Object.assign({ holder: pod }, style.data),
        title: `${label} · ${pod} · ${what}${a && a.gang ? ` · gang ${a.gang}` : ""}`,
      },
      label,
      h("small", null, nameOf(pod)),
    );
  }

  // One-slice instances are too narrow for the whole profile name: `1g` (the title has it all).
  const short = (m) => (m.memorySlices > 1 ? m.profile : m.profile.split(".")[0]);

  function gpuView(node, g, ctx) {
    const classes = ["gpu", `mode-${g.mode}`];
    if (!g.healthy) classes.push("unhealthy");
    const track = h("div", { class: "track" });
    let sub;
    if (g.mode === "mig") {
      const slots = g.memorySlices || 8;
      const compute = g.computeSlices || 7;
      track.dataset.slots = String(slots);
      for (let i = 0; i < slots; i++) {
        track.append(h("div", { class: "cell", style: { left: pct(i / slots), width: pct(1 / slots) } }, String(i)));
      }
      let held = 0;
      for (const m of g.mig) {
        ctx.count.mig += 1;
        const place = {
          css: { left: pct(m.start / slots), width: pct(m.memorySlices / slots) },
          data: { start: String(m.start), size: String(m.memorySlices), profile: m.profile },
        };
        if (m.holder) {
          held += m.computeSlices;
          track.append(holderBlock("inst", m.holder, ctx, place, short(m)));
        } else {
          track.append(
            h(
              "div",
              {
                class: "inst slice free",
                style: place.css,
                dataset: Object.assign({ holder: "" }, place.data),
                title: `${m.profile} at memory slice ${m.start}: created, idle`,
              },
              short(m),
              h("small", null, "free"),
            ),
          );
        }
      }
      // The largest instance that could still be created on the free memory slices.
      const room = g.largestPlaceable ? g.largestPlaceable.split(".")[0] : "–";
      sub = `MIG ${held}/${compute} · room ${room}`;
    } else {
      const shares = ctx.ix.shares.get(`${node.name}/${g.index}`) || [];
      let used = 0;
      // Holders without a share hold the whole GPU (in full or shared mode).
      for (const pod of g.holders.filter((p) => !shares.some((s) => s.pod === p))) {
        track.append(holderBlock("block", pod, ctx, { css: { left: "0%", width: "100%" }, data: {} }, "whole GPU"));
        used = 1000;
      }
      for (const s of used ? [] : shares) {
        const place = { css: { left: pct(used / 1000), width: pct(s.milli / 1000) }, data: { milli: String(s.milli) } };
        track.append(holderBlock("block", s.pod, ctx, place, `${s.milli}m`));
        used += s.milli;
      }
      if (used < 1000) {
        const free = 1000 - used;
        track.append(
          h(
            "div",
            {
              class: "block slice whole-free",
              style: { left: pct(used / 1000), width: pct(free / 1000) },
              title: g.mode === "shared" ? `${free} milli-GPU free` : "free whole GPU",
            },
            g.mode === "shared" ? `${free}m free` : "free",
          ),
        );
      }
      sub = g.mode === "shared" ? `shared ${used}m` : "full GPU";
    }
    ctx.count.gpus += 1;
    return h(
      "div",
      {
        class: classes.join(" "),
        dataset: { gpu: `${node.name}/${g.index}`, mode: g.mode },
        title: `${g.uuid || ""} ${g.model} ${gib(g.memoryMib)} GiB${g.numa !== null ? ` NUMA ${g.numa}` : ""}`,
      },
      h("div", { class: "gpu-label" }, h("b", null, `GPU ${g.index}`), g.healthy ? "" : " unhealthy", h("small", null, sub)),
      track,
    );
  }

  function nodeView(n, ctx, closable) {
    const models = new Map();
    for (const g of n.gpus) models.set(g.model, (models.get(g.model) || 0) + 1);
    const head = h(
      "header",
      null,
      h("b", null, n.name),
      h("span", { class: "tag" }, n.pool || "no pool"),
      Array.from(models, ([m, k]) => h("span", { class: "tag" }, `${k}× ${m}`)),
      n.schedulable ? null : h("span", { class: "tag" }, "cordoned"),
      h(
        "span",
        { class: "res" },
        `cpu ${(n.usedCpuMilli / 1000).toFixed(0)}/${(n.cpuMilli / 1000).toFixed(0)} · ` +
          `mem ${gib(n.usedMemoryMib)}/${gib(n.memoryMib)} GiB · ${plural(n.pods.length, "pod")}`,
      ),
      closable
        ? h("button", { type: "button", onclick: () => { state.opened.delete(n.name); draw(true); } }, "close")
        : null,
    );
    return h(
      "article",
      { class: n.schedulable ? "node" : "node cordoned", dataset: { node: n.name } },
      head,
      n.gpus.map((g) => gpuView(n, g, ctx)),
    );
  }

  function nodeRatio(n) {
    if (!n.gpus.length) return 0;
    return n.gpus.reduce((s, g) => s + g.allocatedMilli, 0) / (n.gpus.length * 1000);
  }

  function legend(ctx) {
    const items = [
      h("span", null, h("i", { class: "swatch-free" }), "idle MIG instance"),
      h("span", null, h("i", { class: "swatch-empty" }), "unpartitioned memory slice"),
      h("span", null, h("i", { class: "swatch-reserved" }), "reserved for a gang"),
      h("span", null, h("i", { class: "swatch-whole" }), "free (full / shared GPU)"),
    ];
    const keys = Array.from(ctx.keys).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    for (const [k] of keys.slice(0, 40)) {
      const i = h("i");
      i.style.background = colour(k);
      items.push(h("span", null, i, k));
    }
    if (keys.length > 40) items.push(h("span", null, `+${keys.length - 40} more`));
    $("legend").replaceChildren(...items);
  }

  // ---- packing ------------------------------------------------------------------------------

  function poolCard(name, p, total) {
    const ratio = p.allocation_ratio || 0;
    const largest = Object.entries(p.largest_placeable || {})
      .sort((a, b) => (parseInt(b[0], 10) || 0) - (parseInt(a[0], 10) || 0))
      .map(([k, v]) => `${k}×${v}`)
      .join(" ");
    const bar = h("div", { class: "bar" }, h("span"));
    bar.firstChild.style.width = pct(Math.min(1, ratio));
    return h(
      "div",
      { class: total ? "pool total" : "pool", dataset: { pool: name } },
      h("h3", null, name, h("small", null, `${plural(p.nodes, "node")} · ${plural(p.gpus, "GPU")}`)),
      bar,
      h(
        "dl",
        null,
        h("dt", null, "allocation"),
        h("dd", null, `${(ratio * 100).toFixed(1)}% (${(p.allocated_milli / 1000).toFixed(1)} of ${p.total_milli / 1000} GPUs)`),
        h("dt", null, "stranded"),
        h("dd", null, `${plural(p.stranded_slices, "MIG slice")} no pending shape can use`),
        h("dt", null, "largest placeable"),
        h("dd", { title: "GPUs whose free space still holds each profile size" }, largest || "–"),
        h("dt", null, "fragmentation"),
        h("dd", null, `${(p.fragmentation_milli / 1000).toFixed(2)} GPUs`),
        h("dt", null, "reconfigurations"),
        h("dd", null, String(p.reconfigs)),
      ),
    );
  }

  // ---- pending pods and explain -------------------------------------------------------------

  function pendingView(f) {
    const list = state.pending.filter((p) => !f.ns || nsOf(p.pod) === f.ns);
    $("pending-count").textContent = `(${list.length})`;
    if (!list.length) {
      $("pending").replaceChildren(h("li", { class: "empty-list" }, "No pod is waiting."));
      return;
    }
    $("pending").replaceChildren(
      ...list.map((p) =>
        h(
          "li",
          {
            class: state.selected === p.pod ? "pending-pod selected" : "pending-pod",
            dataset: { pod: p.pod },
            tabindex: "0",
            role: "button",
            onclick: () => select(p.pod),
            onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); select(p.pod); } },
          },
          h(
            "div",
            { class: "name" },
            nameOf(p.pod),
            p.state === "reserved" ? h("span", { class: "badge reserved" }, "reserved") : null,
            p.demand.startsWith("invalid") ? h("span", { class: "badge invalid" }, "invalid") : null,
            p.gang ? h("span", { class: "badge" }, `gang ${nameOf(p.gang)}`) : null,
          ),
          h("div", { class: "line" }, `${nsOf(p.pod)} · ${p.demand.startsWith("invalid") ? "demand unreadable" : p.demand} · ${p.fits}/${p.nodes} nodes fit`),
          p.reason ? h("div", { class: "why" }, p.reason) : null,
        ),
      ),
    );
  }

  function select(pod) {
    state.selected = pod;
    for (const li of document.querySelectorAll(".pending-pod")) li.classList.toggle("selected", li.dataset.pod === pod);
    draw(true);
    explain(pod);
  }

  function grantText(g, node) {
    const n = state.cluster && state.cluster.nodes.find((x) => x.name === node);
    const gpu = n && n.gpus.find((x) => x.index === g.gpu);
    switch (g.kind) {
      case "mig": {
        const m = gpu && gpu.mig.find((x) => x.start === g.start);
        return `${node} GPU ${g.gpu}: MIG ${m ? m.profile : "instance"} at memory slice ${g.start}`;
      }
      case "share": return `${node} GPU ${g.gpu}: ${g.milli} milli-GPU share`;
      default: return `${node} GPU ${g.gpu}: whole`;
    }
  }

  async function explain(pod) {
    const box = $("explain");
    box.dataset.pod = pod;
    box.dataset.ready = "";
    let e;
    try {
      e = await getJSON(`/api/v1/explain/${encodeURIComponent(nsOf(pod))}/${encodeURIComponent(nameOf(pod))}`);
    } catch (err) {
      if (state.selected !== pod) return;
      box.replaceChildren(h("h3", null, pod), h("p", { class: "err" }, err.message));
      box.dataset.ready = "1";
      return;
    }
    if (state.selected !== pod) return;
    const kids = [h("h3", null, e.pod)];
    if (e.error) kids.push(h("p", { class: "err" }, `Its demand cannot be read: ${e.error}`));
    const d = e.demand;
    if (d) {
      const rows = [
        ["asks for", describeGpu(d.gpu)],
        ["cpu / memory", `${(d.cpu_milli / 1000).toFixed(1)} cores · ${gib(d.memory_mib)} GiB`],
        ["GPU models", d.gpu_models && d.gpu_models.length ? d.gpu_models.join(", ") : "any"],
      ];
      if (d.node_selector && d.node_selector.length) rows.push(["node selector", d.node_selector.map((kv) => kv.join("=")).join(", ")]);
      if (d.gang) rows.push(["gang", `${d.gang.name}: ${d.gang.min_member} members together, reservation ${Math.round(d.gang.timeout_ms / 1000)} s`]);
      if (d.priority) rows.push(["priority", String(d.priority)]);
      kids.push(h("dl", null, rows.map(([k, v]) => [h("dt", null, k), h("dd", null, v)])));
    }
    const fits = e.nodes.filter((n) => n.result === "fits");
    if (e.nodes.length) {
      kids.push(
        h(
          "p",
          { class: "verdict" },
          `${fits.length} of ${plural(e.nodes.length, "offered node")} fit${e.stale ? " (the cluster changed since this filter; kube-scheduler will retry)" : ""}.`,
        ),
      );
    }
    // The same reason from many nodes is one cause: say it once, biggest first.
    const groups = new Map();
    for (const n of e.nodes) {
      if (n.result === "fits" || !n.reason) continue;
      const prefix = `node ${n.node}: `;
      const why = n.reason.startsWith(prefix) ? n.reason.slice(prefix.length) : n.reason;
      if (!groups.has(why)) groups.set(why, []);
      groups.get(why).push(n.node);
    }
    const sorted = Array.from(groups).sort((a, b) => b[1].length - a[1].length);
    const gangCause = sorted.find(([r]) => /^gang .*(does not fit|waiting|pending)/.test(r));
    if (gangCause) kids.push(h("p", { class: "bottleneck" }, h("b", null, "Gang bottleneck: "), gangCause[0]));
    const others = sorted.filter((g) => g !== gangCause);
    if (e.allocation) {
      const a = e.allocation;
      kids.push(
        h(
          "p",
          { class: "bottleneck" },
          h("b", null, a.reserved_until_ms !== null ? "Holds a gang reservation: " : "Holds: "),
          a.grants.map((g) => grantText(g, a.node)).join("; "),
          a.reserved_until_ms !== null ? ". It binds when every member of its gang reaches bind." : "",
        ),
      );
    }
    if (others.length) {
      kids.push(h("h4", null, gangCause ? "Other reasons" : "Why nodes refused it"));
      kids.push(
        h(
          "ul",
          { class: "reasons" },
          others.map(([r, nodes]) =>
            h("li", { title: nodes.join(", ") }, h("b", null, nodes.length === 1 ? `${nodes[0]}: ` : `${nodes.length} nodes: `), r),
          ),
        ),
      );
    }
    const reasonCell = (n, gang) => {
      if (!n.reason) return n.score !== null && n.score !== undefined ? `score ${n.score.toFixed(2)}` : "";
      const prefix = `node ${n.node}: `;
      const why = n.reason.startsWith(prefix) ? n.reason.slice(prefix.length) : n.reason;
      return gang && why === gang[0] ? "the gang bottleneck above" : why;
    };
    if (e.nodes.length) {
      kids.push(
        h(
          "table",
          null,
          h("thead", null, h("tr", null, h("th", null, "node"), h("th", null, "result"), h("th", null, "reason / score"))),
          h(
            "tbody",
            null,
            e.nodes.map((n) =>
              h(
                "tr",
                null,
                h("td", { class: "node-name" }, n.node),
                h("td", { class: n.result }, n.result),
                h("td", null, reasonCell(n, gangCause)),
              ),
            ),
          ),
        ),
      );
    } else if (!e.error) {
      kids.push(h("p", null, "Not filtered by this replica yet."));
    }
    box.replaceChildren(...kids);
    box.dataset.ready = "1";
    state.explained = JSON.stringify(e);
  }

  // ---- drawing ------------------------------------------------------------------------------

  function draw(force) {
    const c = state.cluster;
    if (!c) return;
    const f = filters();
    const key = JSON.stringify([c.generation, state.pending, f, Array.from(state.opened), state.selected]);
    if (!force && key === state.drawnKey) return;
    state.drawnKey = key;

    const pools = Array.from(new Set(c.nodes.map((n) => n.pool))).sort();
    fillSelect($("f-pool"), pools, "all pools");
    const namespaces = new Set([...c.allocations.map((a) => nsOf(a.pod)), ...state.pending.map((p) => nsOf(p.pod))]);
    fillSelect($("f-ns"), Array.from(namespaces).sort(), "all namespaces");
    const fv = filters();

    // Packing: the pools in view, and the whole cluster when no pool is picked.
    const cards = [];
    if (!fv.pool) cards.push(poolCard("all pools", c.packing.cluster, true));
    for (const [name, p] of Object.entries(c.packing.pools)) {
      if (!fv.pool || fv.pool === name) cards.push(poolCard(name, p, false));
    }
    $("pools").replaceChildren(...cards);

    const ix = index(c);
    setPalette(Array.from(new Set(c.allocations.map((a) => holderKey(a.pod, a, fv.colourBy)))).sort());
    const podsIn = (n) => n.pods.some((p) => nsOf(p) === fv.ns);
    const nodes = c.nodes.filter(
      (n) => (!fv.pool || n.pool === fv.pool) && (!fv.ns || podsIn(n)) && (!fv.node || n.name.toLowerCase().includes(fv.node)),
    );
    const ctx = { ix, f: fv, keys: new Map(), count: { gpus: 0, mig: 0 } };
    // Small clusters: every node in full. Large ones: summary first, a tile per node
    // (shade = GPU allocation), the first FULL_NODES and the opened ones in full.
    const collapse = nodes.length > FULL_NODES;
    const drawn = collapse ? nodes.filter((n, i) => i < FULL_NODES || state.opened.has(n.name)) : nodes;
    const opened = drawn.filter((n) => state.opened.has(n.name));
    const rest = drawn.filter((n) => !state.opened.has(n.name));
    $("map").replaceChildren(...opened.map((n) => nodeView(n, ctx, collapse)), ...rest.map((n) => nodeView(n, ctx, false)));
    const note = $("collapsed-note");
    note.hidden = !collapse;
    if (collapse) {
      const shown = new Set(drawn.map((n) => n.name));
      note.textContent =
        `${plural(nodes.length, "node")} match; ${drawn.length} are drawn in full below. Each tile is a node, ` +
        "darker = more of its GPUs allocated; outlined tiles are drawn below. Click a tile to open its node, " +
        "or narrow the view by pool, namespace or name.";
      const tile = (n) => {
        const r = nodeRatio(n);
        const isShown = shown.has(n.name);
        const t = h("button", {
          type: "button",
          class: isShown ? "tile drawn" : "tile collapsed",
          dataset: { node: n.name },
          title: `${n.name} (${n.pool}): ${(r * 100).toFixed(0)}% of ${n.gpus.length} GPUs allocated`,
          onclick: () => {
            if (!isShown) state.opened.add(n.name);
            draw(true);
            const card = document.querySelector(`.node[data-node="${CSS.escape(n.name)}"]`);
            if (card) card.scrollIntoView({ block: "start" });
          },
        });
        t.style.background = `hsl(222 65% ${Math.round(96 - r * 52)}%)`;
        return t;
      };
      const byPool = new Map();
      for (const n of nodes) {
        if (!byPool.has(n.pool)) byPool.set(n.pool, []);
        byPool.get(n.pool).push(n);
      }
      $("tiles").classList.toggle("small", nodes.length > 1000);
      $("tiles").replaceChildren(
        ...Array.from(byPool).sort((a, b) => a[0].localeCompare(b[0])).map(([pool, list]) => {
          const gpus = list.reduce((s, n) => s + n.gpus.length, 0);
          const milli = list.reduce((s, n) => s + n.gpus.reduce((t, g) => t + g.allocatedMilli, 0), 0);
          const ratio = gpus ? milli / (gpus * 1000) : 0;
          return h(
            "div",
            { class: "tile-group", dataset: { pool } },
            h("h3", null, pool || "no pool", h("small", null, ` ${plural(list.length, "node")} · ${(ratio * 100).toFixed(1)}% of ${plural(gpus, "GPU")} allocated`)),
            h("div", { class: "tile-row" }, list.map(tile)),
          );
        }),
      );
    } else {
      $("tiles").replaceChildren();
    }
    $("map-count").textContent =
      `(${plural(nodes.length, "node")} · ${plural(ctx.count.gpus, "GPU")} and ${plural(ctx.count.mig, "MIG instance")} drawn)`;
    legend(ctx);
    pendingView(fv);
    document.body.dataset.generation = String(c.generation);
  }

  function meta(c) {
    const gpus = c.nodes.reduce((s, n) => s + n.gpus.length, 0);
    $("meta").textContent =
      `${c.mode} · policy ${c.policy} · ${c.leader ? "leader" : "follower"} · generation ${c.generation} · ` +
      `${plural(c.nodes.length, "node")} · ${plural(gpus, "GPU")} · updated ${new Date().toLocaleTimeString()}`;
  }

  async function poll() {
    const started = performance.now();
    let next = POLL_MS;
    try {
      const [c, p] = await Promise.all([getJSON("/api/v1/cluster"), getJSON("/api/v1/pending")]);
      const changed = !state.cluster || c.generation !== state.cluster.generation || JSON.stringify(p) !== JSON.stringify(state.pending);
      state.cluster = c;
      state.pending = p;
      showError("");
      meta(c);
      draw(false);
      if (changed && state.selected) explain(state.selected);
      // Large clusters answer in megabytes: poll less often when a round trip is slow.
      next = Math.min(30000, Math.max(POLL_MS, 10 * (performance.now() - started)));
    } catch (err) {
      showError(`Cannot read the scheduler's state (${err.message}); showing the last answer.`);
    } finally {
      setTimeout(poll, next);
    }
  }

  $("filters").addEventListener("submit", (e) => e.preventDefault());
  for (const id of ["f-pool", "f-ns", "f-colour"]) $(id).addEventListener("change", () => draw(true));
  $("f-node").addEventListener("input", () => draw(true));
  poll();
})();
