// Keyboard shortcuts: an element with data-key="1 ArrowLeft" is clicked when one of those keys is pressed.
document.addEventListener("keydown", function (event) {
  if (event.altKey || event.ctrlKey || event.metaKey) return;
  var tag = (event.target && event.target.tagName) || "";
  if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
  var targets = document.querySelectorAll("[data-key]");
  for (var i = 0; i < targets.length; i++) {
    if (targets[i].getAttribute("data-key").split(" ").indexOf(event.key) >= 0) {
      event.preventDefault();
      targets[i].click();
      return;
    }
  }
});
