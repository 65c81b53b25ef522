// New run page: the objective comes first. Choosing one hides the settings of other objectives (each setting's
// wrapper names its objectives in data-objectives) and disables the datasets whose row format it does not train
// on (the objective's option lists them in data-formats, each dataset option has its data-format). Without this
// script every setting shows; the server ignores the settings of other objectives either way.
// The folded groups of settings open by themselves on a field the browser finds invalid, and stay as they were
// when another base model swaps the settings in; the estimate panel is asked again once they are in.
(function () {
  function words(text) {
    return (text || "").split(" ").filter(Boolean);
  }

  // A chosen dataset that no longer fits gives way to the first that does (the training rows) or to none (the
  // optional eval rows).
  function fitDatasets(select, formats, pickAnother) {
    if (!select) return;
    var fallback = 0;
    for (var i = select.options.length - 1; i >= 0; i--) {
      var option = select.options[i];
      if (!option.dataset.format) continue;
      option.disabled = formats.indexOf(option.dataset.format) === -1;
      if (pickAnother && !option.disabled) fallback = i;
    }
    var chosen = select.options[select.selectedIndex];
    if (chosen && chosen.disabled) select.selectedIndex = fallback;
  }

  function apply() {
    var select = document.getElementById("id_objective");
    if (!select) return;
    var objective = select.value;
    var option = select.options[select.selectedIndex];
    var formats = words(option && option.dataset.formats);
    var settings = document.querySelectorAll("[data-objectives]");
    for (var i = 0; i < settings.length; i++) {
      settings[i].hidden = words(settings[i].dataset.objectives).indexOf(objective) === -1;
    }
    var shown = document.getElementById("objective-formats");
    if (shown) shown.textContent = formats.join(", ");
    fitDatasets(document.getElementById("id_dataset"), formats, true);
    fitDatasets(document.getElementById("id_eval_dataset"), formats, false);
  }

  var openGroups = null;

  function rememberOpenGroups(event) {
    if (!event.detail.target || event.detail.target.id !== "train-fields") return;
    openGroups = [];
    var groups = event.detail.target.querySelectorAll("details[open]");
    for (var i = 0; i < groups.length; i++) openGroups.push(groups[i].id);
  }

  function settled() {
    apply();
    if (openGroups === null) return;  // not the settings that were swapped (the estimate panel, say)
    openGroups.forEach(function (id) {
      var group = document.getElementById(id);
      if (group) group.open = true;
    });
    openGroups = null;
    estimateAgain();
  }

  // The estimate asked by the change itself may have read a dataset that `apply` then replaced: ask again.
  function estimateAgain() {
    var panel = document.getElementById("run-estimate");
    if (panel && window.htmx) window.htmx.trigger(panel, "estimate");
  }

  document.addEventListener("DOMContentLoaded", function () {
    var select = document.getElementById("id_objective");
    if (select) select.addEventListener("change", function () { apply(); estimateAgain(); });
    var form = document.getElementById("run-form");
    if (form) {
      // A field the browser refuses to submit is shown, even inside a folded group.
      form.addEventListener("invalid", function (event) {
        var group = event.target.closest && event.target.closest("details");
        if (group) group.open = true;
      }, true);
    }
    apply();
  });
  document.addEventListener("htmx:beforeSwap", rememberOpenGroups);
  // Choosing another base model swaps the settings in (with its suggested values): hide again.
  document.addEventListener("htmx:afterSettle", settled);
})();
