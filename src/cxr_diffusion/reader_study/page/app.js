/* The reader-study page: one image at a time, answers autosaved to localStorage, exported as JSON.
 *
 * Reads the manifest from window.READER_STUDY (study.js): {study_id, kit_id, display_size, findings: [name],
 * calibration: [{id, image, truth: {call, findings}}], items: [{id, image}]}. kit_id fingerprints this
 * build of the kit (its images): answers saved or exported for another build never mix with these.
 *
 * Saved per study, kit and reader under "cxr-reader-study/v1/<study_id>/<kit_id>/<reader_id>":
 *   {position: int, answers: {item_id: {call, confidence, realism, findings, note}}}
 * Exported file "<study_id>__<reader id, sanitized>.json":
 *   {study_id, kit_id, reader_id, exported_at (ISO 8601), answers: {item_id: {call: "real"|"synthetic",
 *    confidence: 1-5, realism: 1-5, findings: [finding, ...] or ["none"], note: string}}}
 * Only complete answers (call, confidence, realism and findings given) are exported.
 */
(function () {
  "use strict";

  var study = window.READER_STUDY;
  var PREFIX = "cxr-reader-study/v1/" + (study ? study.study_id + "/" + study.kit_id : "") + "/";
  var LAST_READER = PREFIX + "last-reader";
  var FINDING_KEYS = "ABCDEFGHIJKLMOPQTUVWXYZ"; // letters without N (none), R and S (the call)
  var NONE = "none";

  var calibration = (study && study.calibration) || [];
  var items = (study && study.items) || [];
  var sequence = calibration.map(function (entry) { return { entry: entry, calibration: true }; })
    .concat(items.map(function (entry) { return { entry: entry, calibration: false }; }));

  var readerId = null;
  var HIDDEN_CHARACTERS = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0]/gu;
  var state = { position: 0, answers: {} };
  var storageWorks = true;

  function $(id) { return document.getElementById(id); }

  // ---- storage -------------------------------------------------------------------------------
  function readStorage(key) {
    try { return window.localStorage.getItem(key); } catch (error) { storageWorks = false; return null; }
  }

  function writeStorage(key, value) {
    try { window.localStorage.setItem(key, value); } catch (error) {
      storageWorks = false;
      $("storage-warning").hidden = false;
    }
  }

  function save() {
    if (readerId !== null) writeStorage(PREFIX + readerId, JSON.stringify(state));
  }

  function load(reader) {
    var saved = null;
    try { saved = JSON.parse(readStorage(PREFIX + reader) || "null"); } catch (error) { saved = null; }
    var fresh = { position: 0, answers: {} };
    if (!saved || typeof saved !== "object" || typeof saved.answers !== "object" || saved.answers === null) return fresh;
    var position = Number.isInteger(saved.position) ? Math.min(Math.max(saved.position, 0), sequence.length) : 0;
    return { position: position, answers: saved.answers };
  }

  // ---- answers -------------------------------------------------------------------------------
  function answerOf(id) {
    if (!state.answers[id]) state.answers[id] = { call: null, confidence: null, realism: null, findings: [], note: "" };
    return state.answers[id];
  }

  function isComplete(answer) {
    return !!answer && (answer.call === "real" || answer.call === "synthetic") &&
      Number.isInteger(answer.confidence) && Number.isInteger(answer.realism) &&
      Array.isArray(answer.findings) && answer.findings.length > 0;
  }

  function completeCount() {
    return items.filter(function (entry) { return isComplete(state.answers[entry.id]); }).length;
  }

  function current() { return sequence[state.position] || null; }

  function change(mutate) {
    var step = current();
    if (!step || step.calibration) return;
    mutate(answerOf(step.entry.id));
    save();
    render();
  }

  function toggleFinding(name) {
    change(function (answer) {
      var chosen = answer.findings.filter(function (value) { return value !== NONE; });
      var at = chosen.indexOf(name);
      if (at >= 0) chosen.splice(at, 1); else chosen.push(name);
      answer.findings = study.findings.filter(function (value) { return chosen.indexOf(value) >= 0; });
    });
  }

  function toggleNone() {
    change(function (answer) {
      answer.findings = answer.findings.length === 1 && answer.findings[0] === NONE ? [] : [NONE];
    });
  }

  // ---- navigation ----------------------------------------------------------------------------
  function go(position) {
    state.position = Math.min(Math.max(position, 0), sequence.length);
    save();
    render();
    window.scrollTo(0, 0);
  }

  // ---- export --------------------------------------------------------------------------------
  function safeFileName(text) {
    var cleaned = text.replace(/[^A-Za-z0-9._-]+/g, "_").replace(/^[._]+/, "").slice(0, 64);
    return cleaned || "reader";
  }

  function exportName() { return study.study_id + "__" + safeFileName(readerId) + ".json"; }

  function exportAnswers() {
    var answers = {};
    items.forEach(function (entry) {
      var answer = state.answers[entry.id];
      if (!isComplete(answer)) return;
      answers[entry.id] = { call: answer.call, confidence: answer.confidence, realism: answer.realism,
        findings: answer.findings.slice(), note: String(answer.note || "") };
    });
    var payload = { study_id: study.study_id, kit_id: study.kit_id, reader_id: readerId,
      exported_at: new Date().toISOString(), answers: answers };
    var blob = new Blob([JSON.stringify(payload, null, 2) + "\n"], { type: "application/json" });
    var url = URL.createObjectURL(blob);
    var link = document.createElement("a");
    link.href = url;
    link.download = exportName();
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
  }

  // ---- building the form once ----------------------------------------------------------------
  function scaleButtons(container, kind, keyLabel) {
    for (var value = 1; value <= 5; value++) {
      var button = document.createElement("button");
      button.type = "button";
      button.className = "choice";
      button.setAttribute("data-" + kind, String(value));
      button.setAttribute("aria-pressed", "false");
      button.setAttribute("aria-label", kind + " " + value);
      button.appendChild(document.createTextNode(String(value)));
      var key = document.createElement("kbd");
      key.textContent = keyLabel(value);
      button.appendChild(key);
      container.appendChild(button);
    }
  }

  function findingBox(name, key, value) {
    var label = document.createElement("label");
    label.className = "finding";
    var box = document.createElement("input");
    box.type = "checkbox";
    box.value = value;
    box.setAttribute("data-finding", value);
    label.appendChild(box);
    var text = document.createElement("span");
    text.textContent = name;
    label.appendChild(text);
    if (key) {
      var badge = document.createElement("kbd");
      badge.textContent = key;
      label.appendChild(badge);
    }
    return label;
  }

  function buildForm() {
    scaleButtons($("confidence-choices"), "confidence", function (value) { return String(value); });
    scaleButtons($("realism-choices"), "realism", function (value) { return "\u21e7" + value; });
    var list = $("findings");
    study.findings.forEach(function (name, index) {
      list.appendChild(findingBox(name, FINDING_KEYS[index] || "", name));
    });
    var none = findingBox("None", "N", NONE);
    none.classList.add("none");
    list.appendChild(none);
    var keyed = Math.min(study.findings.length, FINDING_KEYS.length);
    $("finding-keys").innerHTML = keyed ? "<kbd>" + FINDING_KEYS[0] + "</kbd>&ndash;<kbd>" +
      FINDING_KEYS[keyed - 1] + "</kbd> findings" : "";

    $("call-choices").addEventListener("click", function (event) {
      var button = event.target.closest("[data-call]");
      if (button) change(function (answer) { answer.call = button.getAttribute("data-call"); });
    });
    $("confidence-choices").addEventListener("click", function (event) {
      var button = event.target.closest("[data-confidence]");
      if (button) change(function (answer) { answer.confidence = Number(button.getAttribute("data-confidence")); });
    });
    $("realism-choices").addEventListener("click", function (event) {
      var button = event.target.closest("[data-realism]");
      if (button) change(function (answer) { answer.realism = Number(button.getAttribute("data-realism")); });
    });
    list.addEventListener("change", function (event) {
      var value = event.target.getAttribute("data-finding");
      if (value === NONE) toggleNone(); else if (value) toggleFinding(value);
    });
    $("note").addEventListener("input", function () {
      var text = $("note").value;
      change(function (answer) { answer.note = text; });
    });
    $("answers").addEventListener("submit", function (event) { event.preventDefault(); });
  }

  // ---- rendering -----------------------------------------------------------------------------
  function press(container, attribute, value) {
    container.querySelectorAll("[" + attribute + "]").forEach(function (button) {
      button.setAttribute("aria-pressed", String(button.getAttribute(attribute) === String(value)));
    });
  }

  function renderProgress() {
    var done = completeCount();
    $("progress-fill").style.width = (items.length ? 100 * done / items.length : 0) + "%";
    $("progress-track").setAttribute("aria-valuemax", String(items.length));
    $("progress-track").setAttribute("aria-valuenow", String(done));
    $("progress-text").textContent = done + " / " + items.length + " answered";
  }

  function renderItem(step) {
    var image = $("image");
    if (image.getAttribute("src") !== step.entry.image) image.setAttribute("src", step.entry.image);
    var next = sequence[state.position + 1];
    if (next) new Image().src = next.entry.image; // preload: the next image shows at once
    $("calibration").hidden = !step.calibration;
    $("answers").hidden = step.calibration;
    if (step.calibration) {
      var index = state.position + 1;
      $("item-counter").textContent = "Calibration " + index + " of " + calibration.length;
      $("truth-call").textContent = step.entry.truth.call;
      $("truth-call").className = "call-" + step.entry.truth.call;
      $("truth-findings").textContent = step.entry.truth.findings.join(", ");
      $("item-state").textContent = "";
      return;
    }
    var number = state.position - calibration.length + 1;
    $("item-counter").textContent = "Item " + number + " of " + items.length;
    var answer = state.answers[step.entry.id] || { call: null, confidence: null, realism: null, findings: [], note: "" };
    press($("call-choices"), "data-call", answer.call);
    press($("confidence-choices"), "data-confidence", answer.confidence);
    press($("realism-choices"), "data-realism", answer.realism);
    $("findings").querySelectorAll("[data-finding]").forEach(function (box) {
      box.checked = answer.findings.indexOf(box.getAttribute("data-finding")) >= 0;
    });
    if (document.activeElement !== $("note")) $("note").value = answer.note || "";
    $("item-state").textContent = isComplete(answer) ? "\u2713 complete" : "incomplete";
    $("item-state").className = "item-state " + (isComplete(answer) ? "done" : "");
  }

  function renderFinish() {
    var done = completeCount();
    $("finish-text").textContent = "You answered " + done + " of " + items.length + " items." +
      (done < items.length ? " The items below are incomplete; click one to return to it, or export as it is." :
        " Thank you! Export your answers and send the file to the study team.");
    var list = $("unanswered");
    list.textContent = "";
    items.forEach(function (entry, index) {
      if (isComplete(state.answers[entry.id])) return;
      var button = document.createElement("button");
      button.type = "button";
      button.className = "secondary small";
      button.textContent = "Item " + (index + 1);
      button.addEventListener("click", function () { go(calibration.length + index); });
      list.appendChild(button);
    });
    $("export-name").textContent = "The file is saved as " + exportName() + " in your downloads folder.";
  }

  function render() {
    var started = readerId !== null;
    $("welcome").hidden = started;
    $("progress").hidden = !started;
    $("reader-box").hidden = !started;
    $("shortcuts").hidden = !started;
    if (!started) {
      $("viewer").hidden = true;
      $("finish").hidden = true;
      return;
    }
    $("reader-name").textContent = readerId;
    renderProgress();
    var step = current();
    $("viewer").hidden = !step;
    $("finish").hidden = !!step;
    if (step) renderItem(step); else renderFinish();
  }

  // ---- keyboard ------------------------------------------------------------------------------
  function digitOf(event) {
    var match = /^(?:Digit|Numpad)([1-5])$/.exec(event.code || "");
    if (match) return Number(match[1]);
    return /^[1-5]$/.test(event.key) ? Number(event.key) : null;
  }

  function onKey(event) {
    if (readerId === null || event.ctrlKey || event.metaKey || event.altKey) return;
    var target = event.target;
    var typing = target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type === "text"));
    if (typing) {
      if (event.key === "Escape") target.blur();
      return; // letters and digits typed in the note are text, not answers
    }
    var step = current();
    var handled = true;
    var digit = digitOf(event);
    var letter = event.key && event.key.length === 1 ? event.key.toUpperCase() : "";
    if (event.key === "ArrowRight" || event.key === "Enter") go(state.position + 1);
    else if (event.key === "ArrowLeft") go(state.position - 1);
    else if (!step || step.calibration) handled = false;
    else if (digit !== null && event.shiftKey) change(function (answer) { answer.realism = digit; });
    else if (digit !== null) change(function (answer) { answer.confidence = digit; });
    else if (letter === "R") change(function (answer) { answer.call = "real"; });
    else if (letter === "S") change(function (answer) { answer.call = "synthetic"; });
    else if (letter === "N") toggleNone();
    else if (event.key === "/") $("note").focus();
    else if (letter && FINDING_KEYS.indexOf(letter) >= 0 && FINDING_KEYS.indexOf(letter) < study.findings.length) {
      toggleFinding(study.findings[FINDING_KEYS.indexOf(letter)]);
    } else handled = false;
    if (handled) event.preventDefault(); // Enter must not also press the focused button
  }

  // ---- start ---------------------------------------------------------------------------------
  function begin(reader) {
    readerId = reader;
    state = load(reader);
    writeStorage(LAST_READER, reader);
    render();
  }

  function init() {
    if (!study || !Array.isArray(study.items)) {
      document.body.textContent = "study.js is missing or damaged: rebuild the kit.";
      return;
    }
    document.title = "Reader study " + study.study_id;
    $("study-name").textContent = study.study_id;
    $("welcome-text").textContent = "You will see " + items.length + " chest radiographs, one at a time. " +
      "Some are real, others were generated by a model." + (calibration.length ? " The first " +
      calibration.length + " are calibration examples shown with their answer; they are not scored." : "");
    $("image").width = study.display_size;
    $("image").height = study.display_size;
    document.documentElement.style.setProperty("--display-size", study.display_size + "px");
    buildForm();
    $("reader-form").addEventListener("submit", function (event) {
      event.preventDefault();
      // Invisible and control characters would make one reader two (scoring refuses them): typed ids lose them.
      var reader = $("reader-id").value.replace(HIDDEN_CHARACTERS, "").replace(/\s+/g, " ").trim();
      // As scoring requires: Latin letters (accents allowed), digits and a few signs, so no id imitates another.
      var plain = reader.normalize("NFKD").replace(/\p{M}/gu, "");
      if (reader && !/^[A-Za-z0-9 ._'@()\/,+-]+$/.test(plain)) {
        window.alert("Please use Latin letters, digits, spaces and . _ - ' @ ( ) / , + in your reader id.");
        return;
      }
      // Only Latin blocks (with their accents): a letter newer than the scoring side's Unicode tables would be
      // unknown there, and the reader's whole export refused after the study.
      if (reader && !/^[\u0020-\u007E\u00A0-\u024F\u0300-\u036F\u1E00-\u1EFF]+$/.test(reader)) {
        window.alert("Please use Latin letters, digits, spaces and . _ - ' @ ( ) / , + in your reader id.");
        return;
      }
      if (reader && !/[A-Za-z0-9]/.test(plain)) {  // scoring needs a letter or digit to tell readers apart
        window.alert("Please put at least one letter or digit in your reader id.");
        return;
      }
      if (reader) begin(reader);
    });
    $("switch-reader").addEventListener("click", function () {
      $("reader-id").value = readerId || "";
      readerId = null;
      render();
      $("reader-id").focus();
    });
    $("back").addEventListener("click", function () { go(state.position - 1); });
    $("next").addEventListener("click", function () { go(state.position + 1); });
    $("finish-back").addEventListener("click", function () { go(sequence.length - 1); });
    $("export").addEventListener("click", exportAnswers);
    $("finish-export").addEventListener("click", exportAnswers);
    document.addEventListener("keydown", onKey);
    var last = readStorage(LAST_READER);
    $("storage-warning").hidden = storageWorks;
    if (last) begin(last); else { render(); $("reader-id").focus(); }
  }

  init();
})();
