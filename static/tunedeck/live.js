// Live run pages: keep the SSE cursor current so a reconnect resumes with nothing lost or
// repeated, drop anything already shown, and keep the log scrolled to the end while following.
(function () {
  function liveRoot(elt) { return elt.closest ? elt.closest("[data-last-event-id]") : null; }

  document.addEventListener("htmx:sseBeforeMessage", function (evt) {
    var root = liveRoot(evt.target);
    var id = parseInt(evt.detail.lastEventId || "0", 10);
    if (!root || !id || evt.detail.type !== "log") return;
    if (id <= parseInt(root.dataset.lastEventId, 10)) evt.preventDefault(); // already on the page
  });

  document.addEventListener("htmx:sseMessage", function (evt) {
    var root = liveRoot(evt.target);
    var id = parseInt(evt.detail.lastEventId || "0", 10);
    if (!root || !id) return;
    if (id > parseInt(root.dataset.lastEventId, 10)) {
      root.dataset.lastEventId = String(id);
      var url = root.getAttribute("sse-connect");
      // A new EventSource (after the old one closed) reads this attribute: resume after id.
      if (url) root.setAttribute("sse-connect", url.replace(/([?&]after=)\d+/, "$1" + id));
    }
    var log = document.getElementById("log");
    var follow = document.getElementById("follow");
    if (log && (!follow || follow.checked)) log.scrollTop = log.scrollHeight;
  });

  // When the run's state changes (status partial swapped in), parts outside the status panel that
  // depend on it (the action buttons) refresh themselves on "run-state-changed".
  var shownState = null;
  document.addEventListener("htmx:afterSwap", function () {
    var badge = document.getElementById("run-state");
    if (!badge) return;
    var state = badge.textContent.trim();
    if (shownState !== null && state !== shownState) document.body.dispatchEvent(new Event("run-state-changed"));
    shownState = state;
  });

  document.addEventListener("DOMContentLoaded", function () {
    var badge = document.getElementById("run-state");
    if (badge) shownState = badge.textContent.trim();
    var log = document.getElementById("log");
    if (log) log.scrollTop = log.scrollHeight;
  });
})();
