// Run page log tools: a search box that filters the shown lines (new lines included) and a
// follow toggle (live.js reads #follow; unchecking it pauses the auto-scroll). No inline script:
// the Content-Security-Policy forbids it, so this file is loaded by the run page's template.
(function () {
  function applyFilter() {
    var log = document.getElementById("log");
    var box = document.getElementById("log-search");
    var out = document.getElementById("log-matches");
    if (!log || !box) return;
    var needle = box.value.trim().toLowerCase();
    var lines = log.querySelectorAll(".line");
    var shown = 0;
    for (var i = 0; i < lines.length; i++) {
      var match = !needle || lines[i].textContent.toLowerCase().indexOf(needle) !== -1;
      lines[i].hidden = !match;
      if (match) shown++;
    }
    if (out) out.textContent = needle ? shown + " of " + lines.length + " lines" : "";
  }

  function follow() {
    var log = document.getElementById("log");
    var box = document.getElementById("follow");
    if (log && box && box.checked) log.scrollTop = log.scrollHeight;
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("log-search");
    var followBox = document.getElementById("follow");
    var log = document.getElementById("log");
    if (box) {
      box.addEventListener("input", applyFilter);
      box.addEventListener("keydown", function (evt) {
        if (evt.key === "Escape") { box.value = ""; applyFilter(); }
      });
    }
    if (followBox) followBox.addEventListener("change", follow);
    if (log && followBox) {
      // Scrolling up to read pauses following; scrolling back to the end resumes it.
      log.addEventListener("scroll", function () {
        var atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 8;
        if (followBox.checked !== atEnd && document.activeElement !== followBox) followBox.checked = atEnd;
      });
    }
  });

  // A new line arrived over SSE: hide it if it does not match the current search.
  document.addEventListener("htmx:sseMessage", function (evt) {
    if (evt.detail && evt.detail.type === "log") { applyFilter(); follow(); }
  });
})();
