// soaf dashboard: keeps server-rendered pages current from server-sent events.
// Values are written with textContent only: nothing a program or a user chose can
// become markup. No build step, no framework.
"use strict";

(function () {
  const FINAL = ["succeeded", "failed", "cancelled", "timed_out", "rejected"];
  const status = document.getElementById("live-status");

  function setStatus(text, live) {
    if (!status) return;
    status.textContent = text;
    status.className = "badge " + (live ? "live" : "muted");
  }

  function duration(s) {
    s = Math.max(0, s);
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function eta(state, progress, runningAt) {
    if (state !== "running" || !(progress > 0 && progress < 1) || !runningAt) return "";
    const elapsed = Date.now() / 1000 - runningAt;
    return "~" + duration(elapsed * (1 - progress) / progress) + " left";
  }

  // What an event changed, in one line (as soaf/dashboard/views.py event_text).
  const HIDDEN = ["seq", "ts", "attempt", "state", "event_id", "journal"];
  function eventText(e) {
    return Object.keys(e).sort().filter(function (k) {
      return HIDDEN.indexOf(k) < 0 && !k.endsWith("_at");
    }).map(function (k) {
      const v = e[k];
      let text = typeof v === "string" ? v : JSON.stringify(v);
      if (k === "progress" && typeof v === "number") {
        text = Math.floor(Math.max(0, Math.min(1, v)) * 100) + "%";
      }
      return k.replace(/^f:/, "") + "=" + text;
    }).join(" ");
  }

  function field(root, name) {
    return root.querySelector('[data-field="' + name + '"]');
  }

  // Apply record values (a row of /api/live, or the fields of an event) to an element.
  function apply(root, values) {
    if (values.running_at) root.dataset.runningAt = values.running_at;
    const stateEl = field(root, "state");
    let state = stateEl ? stateEl.textContent : "";
    if (typeof values.state === "string" && stateEl) {
      state = values.state;
      stateEl.textContent = state;
      stateEl.className = "state s-" + state;
    }
    if (typeof values.progress === "number") {
      const pct = Math.floor(Math.max(0, Math.min(1, values.progress)) * 100);
      const bar = field(root, "progress");
      if (bar) bar.value = pct;
      const text = field(root, "pct");
      if (text) text.textContent = pct + "%";
      root.dataset.progress = values.progress;
    }
    const etaEl = field(root, "eta");
    if (etaEl) {
      etaEl.textContent = eta(state, parseFloat(root.dataset.progress || "NaN"),
                              parseFloat(root.dataset.runningAt || "0"));
    }
    const message = values.message || values.error || values.waiting_for;
    const msgEl = field(root, "message");
    if (typeof message === "string" && msgEl) msgEl.textContent = message;
  }

  function listen(url, handlers, onEnd) {
    const source = new EventSource(url);
    source.onopen = function () { setStatus("live", true); };
    source.onerror = function () { setStatus("reconnecting", false); };
    Object.keys(handlers).forEach(function (name) {
      source.addEventListener(name, function (e) { handlers[name](JSON.parse(e.data)); });
    });
    source.addEventListener("end", function () {
      source.close();
      setStatus("finished", false);
      if (onEnd) onEnd();
    });
    return source;
  }

  function servicesPage() {
    const rows = {};
    document.querySelectorAll("tr[data-id]").forEach(function (tr) { rows[tr.dataset.id] = tr; });
    const fresh = new Set();
    const banner = document.getElementById("fresh");
    listen("/api/live", {
      services: function (updates) {
        updates.forEach(function (u) {
          if (rows[u.service_id]) apply(rows[u.service_id], u);
          else if (banner && u.submitted_at > parseFloat(banner.dataset.readAt)) {
            fresh.add(u.service_id);
          }
        });
        if (banner && fresh.size) {
          banner.hidden = false;
          banner.querySelector("a").textContent = fresh.size + " new service" +
            (fresh.size === 1 ? "" : "s") + " since this page was read: show them";
        }
      },
      nodes: function () {},
    });
  }

  function fleetPage() {
    listen("/api/live", {
      services: function () {},
      nodes: function (nodes) {
        nodes.forEach(function (n) {
          document.querySelectorAll(".node[data-node]").forEach(function (card) {
            if (card.dataset.node !== n.node) return;
            const running = field(card, "running");
            if (running) running.textContent = n.running;
            const bar = card.querySelector("progress.load");
            if (bar) bar.value = Math.round(100 * (n.running || 0) / (n.max_services || 1));
          });
        });
      },
    });
  }

  function servicePage(root) {
    const id = encodeURIComponent(root.dataset.id);
    const timeline = document.getElementById("events");
    let lastSeq = 0;
    timeline.querySelectorAll("li[data-seq]").forEach(function (li) {
      lastSeq = Math.max(lastSeq, parseInt(li.dataset.seq, 10) || 0);
    });
    if (root.dataset.final === "yes") { setStatus("final", false); return; }
    listen("/api/services/" + id + "/events", {
      event: function (e) {
        apply(root, e);  // every event, in order: the page may have been read mid-change
        if (!(e.seq > lastSeq)) return;  // already in the timeline
        lastSeq = e.seq;
        const li = document.createElement("li");
        const time = document.createElement("time");
        time.textContent = new Date(e.ts * 1000).toISOString().replace("T", " ").replace("Z", " UTC");
        li.appendChild(time);
        li.appendChild(document.createTextNode(" "));
        if (e.state) {
          const badge = document.createElement("span");
          badge.className = "state s-" + e.state;
          badge.textContent = e.state;
          li.appendChild(badge);
          li.appendChild(document.createTextNode(" "));
        }
        const rest = document.createElement("span");
        rest.className = "ev";
        rest.textContent = eventText(e);
        li.appendChild(rest);
        timeline.appendChild(li);
        timeline.scrollTop = timeline.scrollHeight;
        if (FINAL.indexOf(e.state) >= 0) {
          document.querySelectorAll("#cancel").forEach(function (b) { b.disabled = true; });
        }
      },
    });
    const log = document.getElementById("log");
    const seen = new Set();
    log.querySelectorAll("[data-entry]").forEach(function (s) { seen.add(s.dataset.entry); });
    listen("/api/services/" + id + "/logs/stream?tail=100", {
      line: function (l) {
        if (seen.has(l.entry_id)) return;
        seen.add(l.entry_id);
        const span = document.createElement("span");
        span.className = "l-" + l.stream;
        span.dataset.entry = l.entry_id;
        span.textContent = l.text + "\n";
        const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        log.appendChild(span);
        if (atEnd) log.scrollTop = log.scrollHeight;
      },
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const page = document.body.dataset.page;
    if (page === "services") servicesPage();
    else if (page === "fleet") fleetPage();
    else if (page === "service") servicePage(document.getElementById("service"));
    else setStatus("not needed here", false);
  });
})();
