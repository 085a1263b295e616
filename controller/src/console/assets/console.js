// Gantry console: small progressive enhancements over server-rendered
// pages (dialogs, copy, password reveal, live tables, snapshot name check).
// Errors are kept in window.__gantryErrors for the browser test.
"use strict";
window.__gantryErrors = [];
window.addEventListener("error", function (e) { window.__gantryErrors.push(String(e.message)); });
window.addEventListener("unhandledrejection", function (e) { window.__gantryErrors.push("rejection: " + String(e.reason)); });

function $$(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

function signedOut(resp) { return resp.redirected && resp.url.indexOf("/console/sign-in") >= 0; }

function copyText(text, button) {
  var done = function () { button.textContent = "Copied"; setTimeout(function () { button.textContent = "Copy"; }, 1500); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, function () { button.textContent = "Copy failed"; });
  } else {
    var t = document.createElement("textarea");
    t.value = text; document.body.appendChild(t); t.select();
    try { document.execCommand("copy"); done(); } catch (e) { button.textContent = "Copy failed"; }
    document.body.removeChild(t);
  }
}

// The server's snapshot name rule (proto validate::snapshot_name).
function snapshotNameProblem(s) {
  var n = Array.from(s).length;
  if (n < 1 || n > 50) return "must be 1 to 50 characters long (now " + n + ")";
  if (s.trim() === "") return "must not be blank";
  if (s.trim() !== s) return "must not begin or end with a space";
  if (!/^[A-Za-z0-9 ._-]+$/.test(s)) return "may contain only letters, digits, space, '-', '_' and '.'";
  return "";
}

function refreshTable(tbody) {
  var url = tbody.getAttribute("data-refresh");
  var timer = setInterval(function () {
    fetch(url, { credentials: "same-origin" }).then(function (r) {
      if (signedOut(r) || !r.ok) { if (signedOut(r)) clearInterval(timer); return null; }
      return r.text();
    }).then(function (html) {
      if (html === null) return;
      var checked = $$("input[type=checkbox]:checked", tbody).map(function (c) { return c.value; });
      if (tbody.contains(document.activeElement)) return; // keep keyboard focus stable
      tbody.innerHTML = html;
      $$("input[type=checkbox]", tbody).forEach(function (c) { c.checked = checked.indexOf(c.value) >= 0; });
    }).catch(function () { /* the next poll tries again */ });
  }, 2000);
}

function pollStatus(badge) {
  var url = badge.getAttribute("data-poll");
  var first = badge.textContent;
  setInterval(function () {
    fetch(url, { credentials: "same-origin" }).then(function (r) { return r.ok && !signedOut(r) ? r.json() : null; })
      .then(function (v) {
        if (!v) return;
        badge.textContent = v.status;
        badge.className = "badge " + v.status;
        var cost = document.getElementById("instance-cost");
        if (cost) cost.textContent = v.cost;
        var busy = document.querySelector("dialog[open]") || (document.activeElement && document.activeElement.form);
        if (v.status !== first && !busy) { location.reload(); }
      }).catch(function () { /* next poll */ });
  }, 2000);
}

document.addEventListener("DOMContentLoaded", function () {
  $$("[data-open]").forEach(function (b) {
    b.addEventListener("click", function () { document.getElementById(b.getAttribute("data-open")).showModal(); });
  });
  $$("[data-close]").forEach(function (b) {
    b.addEventListener("click", function () { b.closest("dialog").close(); });
  });
  $$("dialog[data-autoopen]").forEach(function (d) { d.showModal(); });
  document.addEventListener("click", function (e) {
    var b = e.target.closest && e.target.closest("[data-copy]");
    if (b) copyText(b.getAttribute("data-copy"), b);
  });
  $$("[data-reveal]").forEach(function (b) {
    b.addEventListener("click", function () {
      var out = document.getElementById("password");
      if (!out.hasAttribute("data-masked")) {
        out.textContent = "••••••••"; out.setAttribute("data-masked", ""); b.textContent = "Reveal"; return;
      }
      fetch(b.getAttribute("data-reveal"), { credentials: "same-origin" }).then(function (r) { return r.ok ? r.json() : null; })
        .then(function (v) {
          if (!v) { b.textContent = "Reveal failed"; return; }
          out.textContent = v.password; out.removeAttribute("data-masked"); b.textContent = "Hide";
        }).catch(function () { b.textContent = "Reveal failed"; });
    });
  });
  $$("[data-snapshot-name]").forEach(function (input) {
    var hint = document.getElementById(input.getAttribute("aria-describedby"));
    var submit = input.form.querySelector("button[type=submit]");
    var check = function () {
      var p = snapshotNameProblem(input.value);
      input.setCustomValidity(p);
      hint.textContent = p ? "Name " + p : "Name OK (" + Array.from(input.value).length + "/50)";
      hint.className = p ? "hint error" : "hint ok";
      submit.disabled = p !== "";
    };
    input.addEventListener("input", check);
    check();
  });
  $$("form[data-confirm]").forEach(function (f) {
    f.addEventListener("submit", function (e) { if (!window.confirm(f.getAttribute("data-confirm"))) e.preventDefault(); });
  });
  $$("tbody[data-refresh]").forEach(refreshTable);
  $$("[data-poll]").forEach(pollStatus);
});
