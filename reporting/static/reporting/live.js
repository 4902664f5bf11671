/* tokenmgr's live admin pages (issue 10): the dashboard and the conversation feeds.
 *
 * The first figures are in the page (json_script, from the selectors the API uses); after that
 * only what the server pushes over the websocket changes them: no polling, no reload. A socket
 * that closes reconnects by itself with backoff (0.5 s doubling to 10 s) and says so; after a
 * reconnect the dashboard refetches its figures once. Everything shown is set as text, never as
 * HTML, so a "<script>" in a message or an id is shown as it is.
 */
(function () {
  "use strict";

  function json(id) {
    var node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : null;
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function link(href, text, className) {
    var a = el("a", className, text);
    a.href = href;
    return a;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function time(iso) {
    var d = iso ? new Date(iso) : new Date();
    return isNaN(d) ? String(iso) : d.toLocaleTimeString();
  }

  // --- exact money: costs travel as decimal strings; add them as scaled integers -------------
  var SCALE = 10;
  function units(text) {
    var s = String(text === null || text === undefined ? "0" : text).trim();
    var negative = s.charAt(0) === "-";
    if (negative) s = s.slice(1);
    var parts = s.split(".");
    var frac = (parts[1] || "").slice(0, SCALE);
    while (frac.length < SCALE) frac += "0";
    var value = BigInt(parts[0] || "0") * BigInt(10) ** BigInt(SCALE) + BigInt(frac || "0");
    return negative ? -value : value;
  }
  function money(value, decimals) {
    decimals = decimals === undefined ? 4 : decimals;
    var negative = value < 0n;
    if (negative) value = -value;
    var step = BigInt(10) ** BigInt(SCALE - decimals);
    var rounded = (value + step / 2n) / step;
    var whole = (rounded / BigInt(10) ** BigInt(decimals)).toString();
    var frac = (rounded % BigInt(10) ** BigInt(decimals)).toString().padStart(decimals, "0");
    whole = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    return (negative ? "-$" : "$") + whole + (decimals ? "." + frac : "");
  }
  function count(n) {
    return Number(n || 0).toLocaleString("en-US");
  }

  // --- a websocket that comes back by itself ---------------------------------------------------
  function LiveSocket(path, handlers) {
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
    var badge = document.getElementById("tm-connection");
    var socket = null;
    var attempt = 0;
    var everOpen = false;
    var lostAt = null;

    function show(state, text) {
      document.body.setAttribute("data-live-state", state);
      if (!badge) return;
      badge.className = "tm-connection tm-" + state;
      badge.textContent = text;
    }

    function connect() {
      show(everOpen ? "reconnecting" : "connecting", everOpen ? "reconnecting…" : "connecting…");
      socket = new WebSocket(url);
      socket.onopen = function () {
        var again = everOpen;
        everOpen = true;
        attempt = 0;
        show("live", "live");
        if (handlers.open) handlers.open(again, lostAt);
        lostAt = null;
      };
      socket.onmessage = function (event) {
        var data;
        try {
          data = JSON.parse(event.data);
        } catch (err) {
          return;
        }
        handlers.message(data);
      };
      socket.onclose = function () {
        if (lostAt === null) lostAt = new Date();
        attempt += 1;
        var delay = Math.min(10000, 500 * Math.pow(2, attempt - 1)) * (0.8 + Math.random() * 0.4);
        show("reconnecting", "reconnecting in " + Math.max(1, Math.round(delay / 1000)) + " s…");
        window.setTimeout(connect, delay);
      };
    }

    connect();
    return {
      send: function (message) {
        if (socket && socket.readyState === WebSocket.OPEN) {
          socket.send(JSON.stringify(message));
          return true;
        }
        return false;
      },
    };
  }

  // --- the dashboard ---------------------------------------------------------------------------
  function dashboard() {
    var links = json("tm-links");
    var snapshot = json("tm-snapshot");
    var figures = null;
    var chart = null;
    var updates = 0;

    function minuteKey(d) {
      function pad(n) {
        return String(n).padStart(2, "0");
      }
      return (
        d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) +
        "T" + pad(d.getHours()) + ":" + pad(d.getMinutes())
      );
    }

    function load(snap) {
      figures = {
        day: snap.day,
        requests: snap.today.requests,
        inputTokens: snap.today.input_tokens,
        outputTokens: snap.today.output_tokens,
        errors: snap.today.errors,
        cost: units(snap.today.cost),
        minutes: Object.assign({}, snap.minutes),
        chartMinutes: snap.chart_minutes || 60,
      };
      renderTotals();
      renderChart();
      renderState(snap);
      var alerts = document.getElementById("tm-alerts");
      clear(alerts);
      snap.alerts.slice().reverse().forEach(addAlert);
      document.getElementById("tm-alerts-empty").hidden = snap.alerts.length > 0;
      clear(document.getElementById("tm-anomalies"));
      (snap.anomalies || []).slice().reverse().forEach(showAnomaly);
      document.getElementById("tm-anomalies-empty").hidden = (snap.anomalies || []).length > 0;
    }

    function renderTotals() {
      document.getElementById("tm-cost").textContent = money(figures.cost);
      document.getElementById("tm-tokens").textContent = count(
        figures.inputTokens + figures.outputTokens
      );
      document.getElementById("tm-tokens-split").textContent =
        count(figures.inputTokens) + " in · " + count(figures.outputTokens) + " out";
      document.getElementById("tm-requests").textContent = count(figures.requests);
      document.getElementById("tm-errors").textContent = count(figures.errors) + " errors";
    }

    function series() {
      var now = new Date();
      now.setSeconds(0, 0);
      var xs = [];
      var ys = [];
      for (var i = figures.chartMinutes - 1; i >= 0; i--) {
        var d = new Date(now.getTime() - i * 60000);
        xs.push(d.getTime() / 1000);
        ys.push(figures.minutes[minuteKey(d)] || 0);
      }
      return [xs, ys];
    }

    function renderChart() {
      var box = document.getElementById("tm-chart");
      var data = series();
      if (chart) {
        chart.setData(data);
        return;
      }
      if (typeof uPlot === "undefined") {
        box.textContent = "(chart library missing)";
        return;
      }
      chart = new uPlot(
        {
          width: Math.max(300, box.clientWidth - 8),
          height: 180,
          legend: { show: false },
          scales: { y: { range: function (u, min, max) { return [0, Math.max(5, max * 1.15)]; } } },
          series: [{}, { label: "requests/min", stroke: "#417690", fill: "rgba(65,118,144,0.15)", width: 2 }],
          axes: [{}, { size: 50 }],
        },
        data,
        box
      );
      // Follow the panel's width (the admin's sidebar opens and closes, the window resizes).
      var lastWidth = 0;
      var fit = function () {
        var width = Math.max(300, box.clientWidth - 8);
        if (width !== lastWidth) {
          lastWidth = width;
          chart.setSize({ width: width, height: 180 });
        }
      };
      if (typeof ResizeObserver !== "undefined") new ResizeObserver(fit).observe(box);
      window.addEventListener("resize", fit);
    }

    function budgetBar(b) {
      var item = el("li", "tm-bar-item");
      item.setAttribute("data-budget-id", b.id);
      var head = el("div", "tm-bar-head");
      head.appendChild(link(b.url, b.name, "tm-clip"));
      head.appendChild(el("span", "tm-badge tm-" + b.enforcement, b.enforcement));
      item.appendChild(head);
      var pct = b.percent === null ? null : Number(b.percent);
      var track = el("div", "tm-bar-track");
      var fill = el("div", "tm-bar-fill");
      fill.style.width = Math.min(100, pct || 0) + "%";
      fill.className += pct === null ? "" : pct >= 100 ? " tm-over" : pct >= 80 ? " tm-near" : "";
      track.appendChild(fill);
      item.appendChild(track);
      var parts = [pct === null ? "no limit" : pct.toFixed(1) + " %"];
      if (b.cost_limit !== null) parts.push(money(units(b.cost_spent), 2) + " of " + money(units(b.cost_limit), 2));
      if (b.token_limit !== null) parts.push(count(b.tokens_spent) + " of " + count(b.token_limit) + " tokens");
      var label = el("div", "tm-bar-label", parts.join(" · "));
      label.setAttribute("data-percent", pct === null ? "" : pct.toFixed(2));
      item.appendChild(label);
      var runs = runsOut(b);
      if (runs !== null) {
        var note = el("div", "tm-bar-runout", runs);
        note.setAttribute("data-exhausts-at", b.exhausts_at || "");
        item.appendChild(note);
      }
      return item;
    }

    // When the budget runs out at its burn rate (budgets.selectors.budget_burn), in the
    // viewer's time zone: "runs out ~Dec 14, at the last 7 days' rate".
    function runsOut(b) {
      if (b.exhausts_at === undefined) return null; // a state from before the server had it
      if (b.unlimited) return "unlimited by an override";
      if (b.exhausts_at) {
        var at = new Date(b.exhausts_at);
        if (at.getTime() <= Date.now()) return "at its " + b.exhausts_by + " limit";
        var day = at.toLocaleDateString("en-US", { month: "short", day: "numeric" });
        if (at.getTime() - Date.now() < 2 * 86400000) {
          day += " " + at.toLocaleTimeString("en-US", { hour: "2-digit", minute: "2-digit" });
        }
        var what = b.exhausts_by === "tokens" ? " (tokens)" : "";
        return "runs out ~" + day + what + ", at " + b.burn_label;
      }
      if (b.burn_spends) return "won't run out this period at " + b.burn_label;
      return "no spend in " + b.burn_window;
    }

    function renderState(state) {
      var list = document.getElementById("tm-budgets");
      clear(list);
      state.budgets.forEach(function (b) {
        list.appendChild(budgetBar(b));
      });
      document.getElementById("tm-budgets-empty").hidden = state.budgets.length > 0;
      document.getElementById("tm-overrides").textContent = count(state.overrides_pending);
      var buffer = state.buffer || {};
      document.getElementById("tm-buffer").textContent =
        buffer.mode === "buffered" ? count(buffer.depth) + " waiting" : buffer.mode || "–";
      document.getElementById("tm-flush").textContent = buffer.last_flush_at
        ? "last flush " + time(buffer.last_flush_at) + " (" + count(buffer.last_flush_count) + " rows)"
        : buffer.mode === "direct"
          ? "written straight to the database"
          : "no flush yet";
    }

    function addAlert(alert) {
      var list = document.getElementById("tm-alerts");
      var item = el("li", "tm-alert tm-alert-" + alert.kind);
      item.appendChild(el("span", "tm-when", time(alert.created_at)));
      item.appendChild(el("span", "tm-badge", alert.kind));
      item.appendChild(link(links.budget.replace("{id}", alert.budget.id), alert.budget.name, "tm-clip"));
      item.appendChild(el("div", "tm-alert-text", alert.message));
      list.insertBefore(item, list.firstChild);
      while (list.children.length > 10) list.removeChild(list.lastChild);
      document.getElementById("tm-alerts-empty").hidden = true;
    }

    // An open anomaly is listed (newest first); a resolved one leaves the list and the
    // activity log says so.
    function showAnomaly(anomaly) {
      var list = document.getElementById("tm-anomalies");
      var old = list.querySelector('[data-anomaly-id="' + anomaly.id + '"]');
      if (old) list.removeChild(old);
      if (anomaly.status === "resolved") {
        addActivity("anomaly back in range: " + anomaly.dimension + " " + anomaly.series);
      } else {
        var item = el("li", "tm-alert tm-alert-anomaly tm-anomaly-" + anomaly.direction);
        item.setAttribute("data-anomaly-id", String(anomaly.id));
        item.appendChild(el("span", "tm-when", anomaly.bucket.slice(0, anomaly.granularity === "day" ? 10 : 16).replace("T", " ")));
        item.appendChild(el("span", "tm-badge", anomaly.direction === "up" ? "spike" : "drop"));
        item.appendChild(el("span", "tm-clip", anomaly.dimension + " " + anomaly.series));
        item.appendChild(el("div", "tm-alert-text", anomaly.message));
        list.insertBefore(item, list.firstChild);
        while (list.children.length > 10) list.removeChild(list.lastChild);
      }
      document.getElementById("tm-anomalies-empty").hidden = list.children.length > 0;
    }

    function addActivity(text) {
      var list = document.getElementById("tm-activity");
      var item = el("li", "tm-activity");
      item.appendChild(el("span", "tm-when", time()));
      item.appendChild(el("span", "", text));
      list.insertBefore(item, list.firstChild);
      while (list.children.length > 10) list.removeChild(list.lastChild);
      document.getElementById("tm-activity-empty").hidden = true;
    }

    function refetch() {
      fetch(links.snapshot, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) {
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.json();
        })
        .then(load)
        .catch(function () {
          addActivity("could not refetch the figures; they update from pushed changes only");
        });
    }

    function apply(update) {
      updates += 1;
      document.body.setAttribute("data-live-updates", String(updates));
      var usage = update.usage || { days: {}, minutes: {} };
      Object.keys(usage.days).forEach(function (day) {
        if (day !== figures.day) {
          if (day > figures.day) refetch(); // a new day began: start from its figures
          return;
        }
        var d = usage.days[day];
        figures.requests += d.requests;
        figures.inputTokens += d.input_tokens;
        figures.outputTokens += d.output_tokens;
        figures.errors += d.errors;
        figures.cost += units(d.cost);
      });
      Object.keys(usage.minutes).forEach(function (minute) {
        figures.minutes[minute] = (figures.minutes[minute] || 0) + usage.minutes[minute];
      });
      renderTotals();
      renderChart();
      (update.events || []).forEach(function (event) {
        if (event.kind === "alert") addAlert(event.alert);
        else if (event.kind === "anomaly") showAnomaly(event.anomaly);
        else if (event.kind === "override")
          addActivity("override #" + event.override.id + " " + event.change + " (budget #" + event.override.budget_id + ")");
        else if (event.kind === "flush")
          addActivity("buffer flushed: " + count(event.inserted) + " rows" + (event.dead ? ", " + event.dead + " parked" : ""));
      });
      if (update.state) renderState(update.state);
    }

    load(snapshot);
    window.setInterval(renderChart, 30000); // the last hour moves on: shift the x axis
    LiveSocket("/ws/dashboard/", {
      open: function (again) {
        if (again) refetch(); // what happened while the socket was down
      },
      message: function (data) {
        if (data.type === "dashboard.update") apply(data);
      },
    });
  }

  // --- a conversation's feed -------------------------------------------------------------------
  function feed() {
    var links = json("tm-links");
    var conversation = json("tm-conversation");
    var baseline = json("tm-dropped-at-open");
    var list = document.getElementById("tm-feed");
    var boxes = Array.prototype.slice.call(document.querySelectorAll("#tm-categories input"));
    var pauseButton = document.getElementById("tm-pause");
    var pausedNote = document.getElementById("tm-paused");
    var paused = false;
    var held = [];
    var received = 0;
    var MAX_SHOWN = 500;

    function wanted() {
      return boxes.filter(function (b) { return b.checked; }).map(function (b) { return b.value; });
    }
    function unwanted() {
      return boxes.filter(function (b) { return !b.checked; }).map(function (b) { return b.value; });
    }

    function usageLink(id) {
      return link(links.usage + "?q=" + encodeURIComponent(id), id, "tm-clip");
    }

    function render(message, category) {
      var item = el("li", "tm-message tm-cat-" + category);
      item.setAttribute("data-category", category);
      var head = el("div", "tm-message-head");
      head.appendChild(el("span", "tm-when", time(message.timestamp)));
      head.appendChild(el("span", "tm-badge tm-cat", category));
      if (message.agent_id) head.appendChild(el("span", "tm-agent tm-clip", message.agent_id));
      item.appendChild(head);
      item.appendChild(el("div", "tm-message-text", message.message));
      var meta = message.metadata || {};
      var refs = el("div", "tm-refs");
      var ids = meta.request_id ? [meta.request_id] : (meta.request_ids || []).slice(0, 5);
      ids.forEach(function (id) {
        refs.appendChild(el("span", "", "usage "));
        refs.appendChild(usageLink(id));
      });
      var budgetId = meta.budget && meta.budget.id !== undefined ? meta.budget.id : meta.budget_id;
      if (budgetId !== undefined && budgetId !== null && /^\d+$/.test(String(budgetId))) {
        refs.appendChild(el("span", "", "budget "));
        refs.appendChild(link(links.budget.replace("{id}", budgetId), "#" + budgetId));
      }
      if (refs.childNodes.length) item.appendChild(refs);
      if (Object.keys(meta).length) {
        var details = el("details", "tm-meta");
        details.appendChild(el("summary", "", "metadata"));
        details.appendChild(el("pre", "", JSON.stringify(meta, null, 2)));
        item.appendChild(details);
      }
      list.insertBefore(item, list.firstChild);
      while (list.children.length > MAX_SHOWN) list.removeChild(list.lastChild);
      document.getElementById("tm-feed-empty").hidden = true;
    }

    function note(text) {
      var item = el("li", "tm-message tm-note-line", text);
      list.insertBefore(item, list.firstChild);
    }

    function showHeld() {
      pausedNote.hidden = !paused;
      pausedNote.textContent = held.length + " new while paused";
    }

    function take(batch) {
      if (baseline === null && typeof batch.dropped === "number") baseline = batch.dropped;
      if (typeof batch.dropped === "number") {
        document.getElementById("tm-dropped").textContent = count(Math.max(0, batch.dropped - baseline));
      }
      if (wanted().indexOf(batch.category) < 0) return; // sent before an unsubscribe arrived
      batch.messages.forEach(function (message) {
        received += 1;
        if (paused) held.push([message, batch.category]);
        else render(message, batch.category);
      });
      document.getElementById("tm-received").textContent = count(received);
      if (paused) showHeld();
    }

    var socket = LiveSocket("/ws/status/" + encodeURIComponent(conversation) + "/", {
      open: function (again, lostAt) {
        var off = unwanted();
        if (off.length) socket.send({ action: "unsubscribe", categories: off });
        if (again) {
          var seconds = lostAt ? Math.round((Date.now() - lostAt.getTime()) / 1000) : 0;
          note("reconnected at " + time() + " after " + seconds + " s: messages published while disconnected are not replayed");
        }
      },
      message: function (data) {
        if (data.type === "status.batch") take(data);
        else if (data.type === "subscriptions")
          document.getElementById("tm-categories").setAttribute("data-subscribed", data.categories.join(" "));
      },
    });

    boxes.forEach(function (box) {
      box.addEventListener("change", function () {
        socket.send({ action: box.checked ? "subscribe" : "unsubscribe", categories: [box.value] });
      });
    });
    pauseButton.addEventListener("click", function () {
      paused = !paused;
      pauseButton.textContent = paused ? "Resume" : "Pause";
      if (!paused) {
        held.forEach(function (pair) { render(pair[0], pair[1]); });
        held = [];
      }
      showHeld();
    });
  }

  function conversations() {
    var links = json("tm-links");
    var form = document.getElementById("tm-open");
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var id = form.elements.id.value.trim();
      if (id) location.href = links.feed.replace("__id__", encodeURIComponent(id));
    });
  }

  window.TokenmgrLive = { dashboard: dashboard, feed: feed, conversations: conversations };
})();
