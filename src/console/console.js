// Reloads pages marked data-refresh every few seconds, unless the operator is
// typing in a form or has scrolled down to read. Everything works without it.
(function () {
  var seconds = Number(document.body.dataset.refresh || 0);
  if (!seconds) return;
  setInterval(function () {
    var busy = document.activeElement && /INPUT|SELECT|TEXTAREA/.test(document.activeElement.tagName);
    if (!busy && window.scrollY < 40 && document.visibilityState === "visible") location.reload();
  }, seconds * 1000);
})();
