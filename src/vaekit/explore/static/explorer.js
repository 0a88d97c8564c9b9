// The explorer page: sliders, sampling, encoding and interpolation over the JSON API (/api/*).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  z: [],            // the current code: the source of truth, sliders only show it
  busy: false,      // a decode request is in flight
  again: false,     // the code changed while it was
  ends: {a: null, b: null},
  detailSeed: null, // a hierarchy's lower groups: null at their prior means, else their seed
  detail: null,     // ... or their coordinates set on their own sliders (priors' units)
  shownDetail: [],  // the lower groups' coordinates of the picture on show
};

async function api(path, body) {
  const options = body === undefined ? {} :
    body instanceof FormData ? {method: "POST", body} :
    {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
  return data;
}

function say(text, error = false) {
  const line = $("status");
  line.textContent = text;
  line.classList.toggle("error", error);
}

const fail = (error) => say(error.message, true);
const fmt = (value, digits = 2) => Number(value).toFixed(digits);

function clampToApi(z) {
  const [low, high] = state.info.code_range;
  return z.map((value) => Math.min(high, Math.max(low, value)));
}

// --- the code and the decoded image --------------------------------------------------------

function showCode() {
  for (const input of document.querySelectorAll("#sliders input")) {
    const d = Number(input.dataset.dim);
    input.value = state.z[d];
    input.parentElement.querySelector("output").textContent = fmt(state.z[d]);
  }
}

function setCode(z, image) {
  state.z = clampToApi(z);
  showCode();
  if (image && state.detailSeed === null && state.detail === null) {  // detail at its mean
    $("decoded").src = image;
  } else {
    redraw();
  }
}

function redraw() {
  // One request at a time, always for the latest code: dragging never queues stale frames.
  if (state.busy) {
    state.again = true;
    return;
  }
  state.busy = true;
  const body = {z: state.z};
  if (state.detail !== null) {
    body.detail = clampToApi(state.detail);
  } else if (state.detailSeed !== null) {
    body.detail_seed = state.detailSeed;
    body.detail_temperature = Number($("detail-temperature").value);
  }
  api("/api/decode", body)
    .then((result) => {
      $("decoded").src = result.image;
      if (state.info.detail_dim) showDetail(result.detail);
    })
    .catch(fail)
    .finally(() => {
      state.busy = false;
      if (state.again) {
        state.again = false;
        redraw();
      }
    });
}

function centre() {
  const [low, high] = state.info.slider_range;
  return new Array(state.info.latent_dim).fill((low + high) / 2);
}

// --- page parts ------------------------------------------------------------------------------


// ", n = 200 of 10000 (random subset)": every figure says how many examples it averages
function evaluatedOn(evaluation) {
  if (evaluation.n === null || evaluation.n === undefined) return "";
  const of = evaluation.subset_of ? ` of ${evaluation.subset_of} (random subset)` : "";
  return `, n = ${evaluation.n}${of}`;
}

function showFacts(info) {
  const facts = [
    ["run", info.run],
    ["data", `${info.dataset} (${info.data_shape.join("×")})`],
    ["latent dim", String(info.latent_dim)],
    ["prior", info.prior_description],
    ["likelihood", info.likelihood],
  ];
  if (info.test_elbo !== null) {
    facts.push([`test ELBO${info.epochs ? ` (epoch ${info.epochs})` : ""}, n = ${info.n_test}`,
                `${fmt(info.test_elbo)} nats`]);
  }
  const evaluation = info.evaluation;
  if (evaluation && evaluation.log_px !== null && evaluation.log_px !== undefined) {
    const se = evaluation.log_px_se !== null && evaluation.log_px_se !== undefined
      ? ` ± ${fmt(evaluation.log_px_se)}` : "";
    const k = evaluation.k ? ` (IS, k = ${evaluation.k})` : "";
    facts.push([`test log p(x)${k}${evaluatedOn(evaluation)}`,
                `${fmt(evaluation.log_px)}${se} nats`]);
  }
  if (evaluation && evaluation.elbo !== null && evaluation.elbo !== undefined) {
    facts.push([`evaluated ELBO${evaluatedOn(evaluation)}`, `${fmt(evaluation.elbo)} nats`]);
  }
  const list = $("facts");
  list.replaceChildren();
  for (const [name, value] of facts) {
    const item = document.createElement("div");
    const term = document.createElement("dt");
    const detail = document.createElement("dd");
    term.textContent = name;
    detail.textContent = value;
    item.append(term, detail);
    list.append(item);
  }
  document.title = `vaekit explorer: ${info.run}`;
}

// One slider row: a label with the dimension's mean KL (or "unused"), the range input over the
// prior's range, and its value; onInput(value) gets each move.
function sliderRow(id, name, kl, unused, aria, onInput) {
  const [low, high] = state.info.slider_range;
  const row = document.createElement("div");
  row.className = "slider" + (unused ? " unused" : "");
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = name;
  const klText = document.createElement("span");
  klText.className = "kl";
  klText.textContent = unused ? "unused" : `KL ${fmt(kl)}`;
  label.append(klText);
  const input = document.createElement("input");
  Object.assign(input, {type: "range", id, min: low, max: high, step: (high - low) / 200});
  input.setAttribute("aria-label", aria);
  const output = document.createElement("output");
  output.htmlFor = id;
  input.addEventListener("input", () => {
    const value = Number(input.value);
    output.textContent = fmt(value);
    onInput(value);
  });
  row.append(label, input, output);
  return [row, input];
}

function buildSliders(info) {
  const box = $("sliders");
  box.replaceChildren();
  for (const d of info.dims_by_use) {
    const [row, input] = sliderRow(`z${d}`, `z${d}`, info.kl_per_dimension[d], info.unused[d],
                                   `latent dimension ${d}`, (value) => {
                                     state.z[d] = value;
                                     redraw();
                                   });
    input.dataset.dim = d;
    box.append(row);
  }
}

async function buildGallery(info) {
  const gallery = await api(`/api/gallery?limit=${Math.min(48, info.gallery_limit)}`);
  const box = $("gallery");
  box.replaceChildren();
  for (const item of gallery.items) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "gallery-item";
    button.dataset.index = item.index;
    button.title = `test example ${item.index}` + (item.label ? ` (${item.label})` : "");
    const image = document.createElement("img");
    image.src = item.image;
    image.alt = button.title;
    button.append(image);
    button.addEventListener("click", () => {
      api("/api/encode", {index: item.index})
        .then((result) => {
          setCode(result.z, result.image);
          say(`encoded ${button.title}`);
        })
        .catch(fail);
    });
    box.append(button);
  }
}

function setupUpload(info) {
  const file = $("file");
  if (!info.images) {
    $("upload").hidden = true;
    return;
  }
  file.addEventListener("change", () => {
    const chosen = file.files[0];
    if (!chosen) return;
    if (chosen.size > info.max_upload_bytes) {
      say(`${chosen.name} is over ${info.max_upload_bytes} bytes; choose a smaller image`, true);
      return;
    }
    const form = new FormData();
    form.append("file", chosen);
    form.append("invert", $("invert").checked ? "true" : "false");
    api("/api/encode/upload", form)
      .then((result) => {
        setCode(result.z, result.image);
        const preview = $("upload-input");
        preview.src = result.input;
        preview.hidden = false;
        const scored = result.log_px === null || result.log_px === undefined ? "" :
          `; log p(x) = ${result.log_px.toFixed(1)} ± ${result.log_px_se.toFixed(2)} nats ` +
          `(k = ${result.score_k}), percentile ${result.test_percentile.toFixed(1)} among ` +
          `${result.test_examples} test examples`;
        say(`encoded ${chosen.name} (shown beside the button as the model saw it)${scored}`);
      })
      .catch(fail);
  });
}

function setupInterpolation(info) {
  const mode = $("mode");
  for (const name of info.interpolation_modes) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    mode.append(option);
  }
  $("steps").max = info.max_steps;
  for (const end of ["a", "b"]) {
    $(`set-${end}`).addEventListener("click", () => {
      state.ends[end] = state.z.slice();
      const thumb = $(`thumb-${end}`);
      thumb.src = $("decoded").src;
      thumb.hidden = false;
      drawStrip();
    });
  }
  mode.addEventListener("change", drawStrip);
  $("steps").addEventListener("change", drawStrip);
}

function drawStrip() {
  const {a, b} = state.ends;
  if (!a || !b) return;
  const steps = Math.round(Number($("steps").value));
  api("/api/interpolate", {start: a, end: b, steps, mode: $("mode").value})
    .then((path) => {
      const strip = $("strip");
      strip.replaceChildren();
      path.images.forEach((image, i) => {
        const frame = document.createElement("img");
        frame.src = image;
        frame.alt = `step ${i + 1} of ${path.images.length}`;
        frame.title = frame.alt;
        frame.addEventListener("click", () => setCode(path.codes[i], image));
        strip.append(frame);
      });
    })
    .catch(fail);
}

// A hierarchy: the first sliders steer its top group; the lower groups add the detail, at their
// prior means, redrawn from their priors, or set on their own panels (in their priors' units,
// z_l = mu_p + sigma_p u_l), so the page shows which group holds shape and which detail.
function showDetail(values) {
  state.shownDetail = values ? values.slice() : new Array(state.info.detail_dim).fill(0);
  for (const input of document.querySelectorAll("#lower-groups input")) {
    const i = Number(input.dataset.detail);
    input.value = state.shownDetail[i];
    input.parentElement.querySelector("output").textContent = fmt(state.shownDetail[i]);
  }
}

function buildLowerGroups(info) {
  const box = $("lower-groups");
  box.replaceChildren();
  for (const group of info.lower_groups) {
    const heading = document.createElement("h3");
    heading.textContent = `Group ${group.name}: ${group.dims} dimensions, in its prior's units`;
    box.append(heading);
    for (const d of group.dims_by_use) {
      const i = group.offset + d;
      const [row, input] = sliderRow(
        `${group.name}-${d}`, `${group.name}[${d}]`, group.kl_per_dimension[d], group.unused[d],
        `group ${group.name} dimension ${d}`, (value) => {
          if (state.detail === null) state.detail = state.shownDetail.slice();
          state.detailSeed = null;
          state.detail[i] = value;
          redraw();
        });
      input.dataset.detail = i;
      box.append(row);
    }
  }
  showDetail(null);
}

function setupDetail(info) {
  if (!info.detail_dim) return;
  const [top, ...lower] = info.groups;
  $("groups-hint").textContent = `The sliders above steer the top group ${top[0]} (${top[1]} ` +
    `dimensions); below it ${lower.map(([name, dims]) => `${name} (${dims})`).join(", ")} ` +
    "add the detail: at their prior means, redrawn with the buttons under the image, or set " +
    "on their own panels below (0 is the prior mean given the groups above).";
  $("groups-hint").hidden = false;
  $("detail").hidden = false;
  buildLowerGroups(info);
  $("redraw-detail").addEventListener("click", () => {
    state.detail = null;
    state.detailSeed = Math.floor(Math.random() * 2 ** 31);
    redraw();
    say(`lower groups redrawn from their priors (seed ${state.detailSeed}); the top group kept`);
  });
  $("mean-detail").addEventListener("click", () => {
    state.detail = null;
    state.detailSeed = null;
    redraw();
    say("lower groups at their prior means");
  });
  $("detail-temperature").addEventListener("change", () => {
    const value = Number($("detail-temperature").value);
    if (!(value >= 0 && value <= 2)) {
      $("detail-temperature").value = "1";
      say("the detail temperature is a number from 0 to 2; set back to 1", true);
    }
    if (state.detailSeed !== null) redraw();
  });
}

async function start() {
  try {
    const info = await api("/api/info");
    state.info = info;
    showFacts(info);
    buildSliders(info);
    setupUpload(info);
    setupInterpolation(info);
    setupDetail(info);
    $("sample").addEventListener("click", () => {
      api("/api/sample", {})
        .then((result) => {
          setCode(result.z, result.image);
          say(`z drawn from the prior (seed ${result.seed})`);
        })
        .catch(fail);
    });
    $("centre").addEventListener("click", () => setCode(centre()));
    setCode(centre());
    await buildGallery(info);
    document.body.dataset.ready = "true";
  } catch (error) {
    fail(error);
  }
}

start();
