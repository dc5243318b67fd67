"""The one web page `GET /` serves: drop or pick an image, see it with its neighbours as a grid (thumbnail, score,
class); click a result to search with it. Plain HTML and script, no external resources."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ssl_vit image search</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 16px; background: #fafafa; color: #222; }
 #drop { border: 2px dashed #888; border-radius: 8px; padding: 18px; text-align: center; background: #fff; }
 #drop.over { border-color: #1f77b4; background: #eef5fb; }
 #bar { margin: 10px 0; font-size: 14px; }
 #status { color: #555; margin-left: 8px; }
 #status.error { color: #b00; }
 #query { display: flex; align-items: center; gap: 12px; margin: 10px 0; }
 #query img { width: 128px; height: 128px; object-fit: contain; background: #ddd; border: 2px solid #1f77b4; }
 #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 10px; }
 .result { background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: 6px; cursor: pointer;
           text-align: center; font-size: 12px; }
 .result:hover { border-color: #1f77b4; }
 .result img { width: 128px; height: 128px; object-fit: contain; background: #eee; image-rendering: pixelated; }
 .score { font-weight: bold; }
 .key { color: #666; overflow-wrap: anywhere; }
</style>
</head>
<body>
<h2>Image search</h2>
<div id="drop">Drop an image here, or <input id="file" type="file" accept="image/*"></div>
<div id="bar">results <input id="k" type="number" min="1" max="1000" value="12" style="width:5em">
 <span id="status"></span></div>
<div id="query"></div>
<div id="results"></div>
<script>
const status = document.getElementById("status");
const results = document.getElementById("results");
const query = document.getElementById("query");
function say(text, isError) { status.textContent = text; status.className = isError ? "error" : ""; }
function k() { return Math.max(1, Math.min(1000, parseInt(document.getElementById("k").value) || 12)); }
async function search(url, options, queryImage, title) {
  say("searching...");
  results.innerHTML = "";
  let response, body;
  try { response = await fetch(url, options); body = await response.json(); }
  catch (e) { say("the server did not answer: " + e, true); return; }
  if (!response.ok) { say(body.error || ("error " + response.status), true); return; }
  query.innerHTML = "";
  const img = document.createElement("img"); img.src = queryImage; img.alt = "query";
  const label = document.createElement("span"); label.textContent = "query: " + title;
  query.append(img, label);
  for (const r of body.results) {
    const cell = document.createElement("div"); cell.className = "result"; cell.title = r.key;
    cell.dataset.key = r.key;
    const thumb = document.createElement("img"); thumb.alt = r.key; if (r.image) thumb.src = r.image;
    const score = document.createElement("div"); score.className = "score"; score.textContent = r.score.toFixed(3);
    const name = document.createElement("div"); name.className = "label";
    name.textContent = r["class"] !== null ? r["class"] : (r.label !== null ? String(r.label) : "-");
    const key = document.createElement("div"); key.className = "key"; key.textContent = r.key;
    cell.append(thumb, score, name, key);
    cell.addEventListener("click", () => byKey(r.key, r.image));
    results.append(cell);
  }
  say(body.results.length + " results");
}
function byFile(file) {
  const form = new FormData(); form.append("image", file);
  search("/search?k=" + k(), {method: "POST", body: form}, URL.createObjectURL(file), file.name);
}
function byKey(key, image) {
  search("/search?k=" + k() + "&key=" + encodeURIComponent(key), {method: "POST"}, image || "", key);
}
document.getElementById("file").addEventListener("change", e => { if (e.target.files[0]) byFile(e.target.files[0]); });
const drop = document.getElementById("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) byFile(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""
