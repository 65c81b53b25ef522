// Catalog pages: the dataset upload's progress bar, fed by htmx's XHR progress events.
(function () {
  function bar(form) {
    var id = form && form.dataset ? form.dataset.uploadProgress : null;
    return id ? document.getElementById(id) : null;
  }

  document.addEventListener("htmx:xhr:progress", function (evt) {
    var progress = bar(evt.target);
    if (!progress || !evt.detail.lengthComputable) return;
    progress.hidden = false;
    progress.value = Math.round((evt.detail.loaded / evt.detail.total) * 100);
  });

  document.addEventListener("htmx:beforeRequest", function (evt) {
    var progress = bar(evt.target);
    if (progress) { progress.value = 0; progress.hidden = false; }
  });
})();
