// The page of `ccfllm serve`: a user's history, top-k recommendations, one explanation.
// Plain DOM calls; every state change is written to body[data-state] so a headless test can wait on it.

const $ = (id) => document.getElementById(id);

async function call(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}

function setState(state, message) {
  document.body.dataset.state = state;
  $("status").textContent = message || "";
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

async function start() {
  try {
    const info = await call("/info");
    $("run-info").textContent =
      `${info.method_title} on ${info.dataset} (${info.users} users, ${info.items} items); ` +
      `backbone ${info.backbone || "none"}; LLM ${info.llm}`;
    const { users } = await call("/users?limit=500");
    for (const uid of users) $("user").add(new Option(`user ${uid}`, uid));
    const wanted = new URLSearchParams(location.search).get("uid");
    if (wanted && users.includes(Number(wanted))) $("user").value = wanted;
    $("go").onclick = recommend;
    $("user").onchange = recommend;
    await recommend();
  } catch (error) {
    setState("error", `error: ${error.message}`);
  }
}

async function recommend() {
  const uid = Number($("user").value);
  setState("recommending", `scoring user ${uid}...`);
  try {
    const answer = await call("/recommend", {
      uid, k: Number($("k").value), shortlist: Number($("shortlist").value),
    });
    const history = $("history");
    history.replaceChildren();
    for (const item of answer.history) {
      const li = document.createElement("li");
      li.textContent = item.title || `item ${item.iid}`;
      history.append(li);
    }
    const body = $("recommendations").tBodies[0];
    body.replaceChildren();
    for (const item of answer.items) {
      const row = body.insertRow();
      row.dataset.iid = item.iid;
      cell(row, item.rank);
      cell(row, item.title);
      cell(row, item.score.toFixed(4));
      cell(row, item.cf, item.cf === "none" ? "cf-none" : "");
      row.onclick = () => explain(uid, item, row);
    }
    setState("recommended", `${answer.items.length} of ${answer.candidates} candidates`);
    if (answer.items.length) await explain(uid, answer.items[0], body.rows[0]);
  } catch (error) {
    setState("error", `error: ${error.message}`);
  }
}

async function explain(uid, item, row) {
  for (const other of row.parentNode.rows) other.classList.toggle("chosen", other === row);
  setState("explaining", `explaining item ${item.iid}...`);
  try {
    const answer = await call("/explain", { uid, iid: item.iid });
    $("explained-title").textContent = `of "${answer.title}"`;
    drawHeatmap(answer);
    drawSplit(answer);
    setState("explained", "");
  } catch (error) {
    setState("error", `error: ${error.message}`);
  }
}

function drawHeatmap(answer) {
  // one line per item of the prompt (its history items, then the target), one box per title token,
  // shaded by alpha relative to the largest alpha of the prompt
  const heatmap = $("heatmap");
  heatmap.replaceChildren();
  const alphas = answer.tokens.map((t) => t.alpha).filter((a) => a !== null);
  const largest = Math.max(...alphas, 1e-12);
  for (const item of answer.items) {
    const line = document.createElement("div");
    line.className = "item-row";
    const label = document.createElement("div");
    label.className = "label";
    const mean = item.alpha === null ? "n/a" : item.alpha.toExponential(2);
    label.textContent = `${item.role}: ${item.title} (mean alpha ${mean})`;
    line.append(label);
    for (const token of answer.tokens.filter((t) => t.item === item.item)) {
      const box = document.createElement("span");
      box.className = "token";
      const share = token.alpha === null ? 0 : token.alpha / largest;
      box.style.background = `rgba(220, 80, 30, ${(0.08 + 0.92 * share).toFixed(3)})`;
      box.title = `alpha ${token.alpha}`;
      box.textContent = token.token.replace(/^Ġ|^▁/, "");
      line.append(box);
    }
    heatmap.append(line);
  }
}

function drawSplit(answer) {
  // bars: the score, and the score with the CF embeddings and with the title text withheld;
  // the CF backbone's own score beside them
  const bars = [
    ["score", answer.score],
    ["CF withheld", answer.score_without_cf],
    ["text withheld", answer.score_without_text],
    ["CF backbone", answer.cf_backbone_score],
  ];
  const svg = $("split-chart");
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const width = 260;
  bars.forEach(([name, value], i) => {
    const y = 10 + i * 34;
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 0);
    label.setAttribute("y", y + 15);
    label.textContent = name;
    svg.append(label);
    if (value === null || value === undefined) return;
    const bar = document.createElementNS(ns, "rect");
    bar.setAttribute("x", 140);
    bar.setAttribute("y", y);
    bar.setAttribute("height", 20);
    bar.setAttribute("width", Math.max(1, value * width));
    bar.setAttribute("fill", ["#3366cc", "#dc501e", "#33a02c", "#888"][i]);
    bar.dataset.name = name;
    svg.append(bar);
    const number = document.createElementNS(ns, "text");
    number.setAttribute("x", 145 + value * width);
    number.setAttribute("y", y + 15);
    number.textContent = value.toFixed(4);
    svg.append(number);
  });
}

start();
