// Admin page: upload a .json list or a .jsonl file of records to the admin API (with the CSRF token).
document.addEventListener("DOMContentLoaded", function () {
  var input = document.getElementById("upload");
  var result = document.getElementById("upload-result");
  if (!input) return;
  input.addEventListener("change", function () {
    var file = input.files[0];
    if (!file) return;
    file.text().then(function (text) {
      var records;
      try {
        records = /\.jsonl$/i.test(file.name)
          ? text.split("\n").filter(function (l) { return l.trim(); }).map(function (l) { return JSON.parse(l); })
          : JSON.parse(text);
      } catch (e) { result.textContent = "not valid JSON: " + e.message; return; }
      var csrf = document.querySelector("meta[name=csrf-token]").content;
      return fetch(input.dataset.url, {method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf}, body: JSON.stringify(records)})
        .then(function (r) { return r.json().then(function (j) { result.textContent = r.ok ? JSON.stringify(j) : j.detail; }); });
    });
  });
});
