"""The comparison report's figures: scores and loss curves, nearest-neighbour retrieval, attention and MAE
reconstructions. matplotlib's object API (`Figure`, Agg canvas): no pyplot state, no display needed."""
import math
import textwrap
from functools import partial
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ssl_vit.errors import SslVitError
from ssl_vit.figure_io import save_png

DPI = 120
METRICS = [("knn_top1", "k-NN top-1 (k=20)"), ("knn_top5", "k-NN top-5 (k=20)"), ("linear_top1", "linear-probe top-1")]
MATCH, MISMATCH, QUERY = "#1a9641", "#d7191c", "#2b83ba"
CELL_GAP, THUMBNAIL_PX = 0.12, 150  # retrieval.png: the gap between cells (a cell is 1), thumbnails' longest side


def _note(ax, text: str) -> None:
    ax.set_axis_off()
    lines = [textwrap.fill(line, 30) for line in text[:240].splitlines()]
    ax.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", fontsize=8, color="0.35", transform=ax.transAxes)


_save = partial(save_png, dpi=DPI, bbox_inches="tight")


# ---------------------------------------------------------------- label_efficiency.png
FLOORS = ("random_init", "raw_pixels")  # drawn dashed: what any pretrained backbone should beat


def label_efficiency_png(rows: list[dict], path: Path) -> None:
    """Test top-1 against the fraction of training labels (log x), one line per model, one panel per metric that
    has values (k-NN, linear probe, fine-tuning); the floors (random init, raw pixels) dashed. A row's
    `<metric>_band` [low, high] (mean ± std over runs, or one run's 95 % interval) is drawn as error bars and a band."""
    present = [(key, title) for key, title in (("knn_top1", "k-NN top-1"), ("linear_top1", "linear-probe top-1"),
                                               ("finetune_top1", "fine-tune top-1"))
               if any(row.get(key) is not None for row in rows)]
    fig = Figure(figsize=(5.2 * max(1, len(present)), 4.6))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(present)), squeeze=False)[0])
    if not present:
        _note(axes[0], "no evaluation scores")
    names = list(dict.fromkeys(row["model"] for row in rows))
    fractions = sorted({row["fraction"] for row in rows})
    labels = {row["fraction"]: row.get("num_labels") for row in rows if row.get("num_labels")}
    for ax, (key, title) in zip(axes, present):
        for i, name in enumerate(names):
            points = sorted((row["fraction"], row[key], *(row.get(f"{key}_band") or (row[key], row[key])))
                            for row in rows if row["model"] == name and row.get(key) is not None)
            if points:
                floor = name in FLOORS
                xs, ys, lows, highs = (np.asarray(v, dtype=float) for v in zip(*points))
                # the band: mean ± std over draws × seeds, or one run's 95 % interval over test images
                ax.errorbar(xs, ys, yerr=[ys - lows, highs - ys], marker="o", ms=4, lw=1.2 if floor else 2.0,
                            ls="--" if floor else "-", color=f"C{i}", capsize=3, label=name.replace("_", " "))
                ax.fill_between(xs, lows, highs, color=f"C{i}", alpha=0.12, lw=0)
        ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{f:.0%}" + (f"\n{labels[f]:,} labels" if f in labels else "") for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("fraction of training labels (log scale)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("How many labels does pretraining save? Test accuracy against the labels used", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, path)


# ---------------------------------------------------------------- comparison.png
def comparison_png(rows: list[dict], models: dict, path: Path) -> None:
    """Left: grouped bars of each row's k-NN top-1/top-5 and linear-probe top-1 (None skipped); middle: training-loss
    curves of the models in `models` that have a `log.jsonl`, each divided by its first logged loss; right (when a
    run monitored k-NN, train.monitor_every): k-NN top-1 against images seen."""
    monitored = {name: c for name, d in models.items() if d is not None and (c := monitor_curve(d)) is not None}
    fig = Figure(figsize=(19 if monitored else 13, 4.8))
    axes = fig.subplots(1, 3 if monitored else 2, gridspec_kw={"width_ratios": [1.25, 1, 1][:3 if monitored else 2]})
    _score_bars(axes[0], rows)
    _loss_curves(axes[1], models)
    if monitored:
        _monitor_curves(axes[2], monitored)
    fig.suptitle("SSL vs supervised: evaluation scores and training curves", fontsize=13)
    _save(fig, path)


def _score_bars(ax, rows: list[dict]) -> None:
    names = [str(row.get("model", "?")) for row in rows]
    present = [(key, label) for key, label in METRICS if any(row.get(key) is not None for row in rows)]
    if not rows or not present:
        _note(ax, "no evaluation scores")
        return
    width = 0.8 / len(present)
    for j, (key, label) in enumerate(present):
        xs = [i + (j - (len(present) - 1) / 2) * width for i, row in enumerate(rows) if row.get(key) is not None]
        values = [float(row[key]) for row in rows if row.get(key) is not None]
        drawn = ax.bar(xs, values, width, label=label, color=f"C{j}")
        ax.bar_label(drawn, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(rows)), names, rotation=15)
    ax.set_ylabel("test accuracy (%)")
    top = max(float(row[key]) for row in rows for key, _ in present if row.get(key) is not None)
    ax.set_ylim(0, min(100.0, top * 1.18 + 2))
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("test accuracy by model")
    ax.grid(axis="y", alpha=0.3)


def _log_series(run_dir: Path, key: str) -> dict | None:
    """{"step", "images" (None when unknown), key} of the finite `key` entries of a run's log.jsonl; None without
    any. Images seen = step × images per step from the run's summary.json (images_seen / steps)."""
    import json

    from ssl_vit.train.run_log import read_log

    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        return None
    try:
        entries = [e for e in read_log(log) if isinstance(e.get(key), (int, float)) and math.isfinite(e[key])]
        summary = Path(run_dir) / "summary.json"
        info = json.loads(summary.read_text()) if summary.is_file() else {}
    except ValueError as e:
        raise SslVitError(f"{run_dir}: log.jsonl or summary.json is not valid JSON ({e})") from None
    if not entries:
        return None
    steps = np.array([e["step"] for e in entries], dtype=np.float64)
    per_step = info["images_seen"] / info["steps"] if info.get("steps") and info.get("images_seen") else None
    return {"step": steps, "images": None if per_step is None else steps * per_step,
            key: np.array([e[key] for e in entries], dtype=np.float64)}


def loss_curve(run_dir: Path) -> dict | None:
    """{"step", "images" (None when unknown), "loss" (divided by the first logged loss)} from a run's log.jsonl;
    None without a usable log."""
    curve = _log_series(run_dir, "loss")
    if curve is None or curve["loss"][0] == 0:
        return None
    return {**curve, "loss": curve["loss"] / abs(curve["loss"][0])}


def monitor_curve(run_dir: Path) -> dict | None:
    """{"step", "images", "top1"}: the k-NN top-1 logged every train.monitor_every steps; None without one."""
    curve = _log_series(run_dir, "monitor_knn_top1")
    return None if curve is None else {"step": curve["step"], "images": curve["images"],
                                       "top1": curve["monitor_knn_top1"]}


def _monitor_curves(ax, curves: dict) -> None:
    _curves(ax, curves, "top1", "k-NN top-1 on the monitor set (%)", "k-NN during pretraining")


def _loss_curves(ax, models: dict) -> None:
    curves = {name: c for name, d in models.items() if d is not None and (c := loss_curve(d)) is not None}
    if not curves:
        _note(ax, "no training logs (log.jsonl) to plot")
        return
    _curves(ax, curves, "loss", "loss / first logged loss\n(MAE: MSE; DINO, supervised: cross-entropy)",
            "training loss, normalised per run")
    ax.axhline(1.0, color="0.6", lw=0.8, ls=":")


def _curves(ax, curves: dict, y_key: str, ylabel: str, title: str) -> None:
    """One line per run against images seen (optimizer steps where a run does not say how many images a step is)."""
    x_key = "images" if all(c["images"] is not None for c in curves.values()) else "step"
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(c[x_key], c[y_key], marker="o" if len(c[y_key]) < 30 else None, ms=3, label=name, color=f"C{i}")
    ax.set_xlabel("images seen" if x_key == "images" else "optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------- test images
def pick_queries(keys: list, labels, n: int) -> list[int]:
    """Rows of the first key (in sorted key order) of each of the first `n` distinct classes; when fewer than `n`
    classes are labelled, the next keys in sorted order fill up. Deterministic for a given set of keys."""
    order = sorted(range(len(keys)), key=keys.__getitem__)
    rows, seen = [], set()
    for i in order:
        label = int(labels[i])
        if label >= 0 and label not in seen:
            seen.add(label)
            rows.append(i)
        if len(rows) == n:
            return rows
    chosen = set(rows)
    return rows + [i for i in order if i not in chosen][:n - len(rows)]


def _shards(test_index: str):
    from ssl_vit.data.sources import expand_source

    return expand_source(str(test_index))


def _labelled_keys(test_index: str, n: int) -> tuple[list[str], list[int]]:
    """Keys and labels of the test shards, read shard by shard until `n` distinct classes are seen (the writer's
    shards hold ascending keys, so the first shards already contain the keys `pick_queries` would pick overall)."""
    from ssl_vit.data.samples import read_shard

    keys, labels = [], []
    for url in _shards(test_index).urls:
        for sample in read_shard(url):
            keys.append(sample["__key__"])
            labels.append(_label(sample))
        if len({label for label in labels if label >= 0}) >= n:
            break
    if not keys:
        raise SslVitError(f"{test_index}: the test shards hold no samples")
    return keys, labels


def _label(sample: dict) -> int:
    from ssl_vit.data.samples import BadSample, decode_label

    try:
        return decode_label(sample)
    except BadSample:
        return -1


def load_images(test_index: str, keys) -> dict:
    """{key: PIL RGB image} for `keys`, read from the test shards (stops at the first shard that completes them)."""
    from ssl_vit.eval.retrieval import images_by_key

    return images_by_key(_shards(test_index).urls, keys)


def evaluation_images(test_index: str, n: int) -> tuple[list, list[int], list]:
    """`n` test images, one class each while classes last (`pick_queries` order) → (PIL images, labels, classes)."""
    if n < 1:
        raise SslVitError(f"figure: n_images must be >= 1, got {n}")
    keys, labels = _labelled_keys(test_index, n)
    rows = pick_queries(keys, labels, n)
    found = load_images(test_index, [keys[i] for i in rows])
    return [found[keys[i]] for i in rows], [labels[i] for i in rows], _shards(test_index).classes or []


def _class_name(classes: list, label) -> str:
    label = int(label)
    return str(classes[label]) if 0 <= label < len(classes) else ("?" if label < 0 else str(label))


def _frame(ax, color: str, width: float = 3.0) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


# ---------------------------------------------------------------- retrieval.png
def nearest_neighbours(features, query_rows: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [Q, k], cosine similarities [Q, k]) of each query row's `k` nearest other rows, best first.

    FAISS exact inner-product index on L2-normalised features (`RetrievalIndex`, the package's one retrieval path,
    so the figure shows what `ssl-vit` retrieval returns); k + 1 are searched and the query itself dropped."""
    from ssl_vit.eval.retrieval import RetrievalIndex

    features = np.asarray(features, dtype=np.float32)
    if not 1 <= k < len(features):
        raise SslVitError(f"retrieval figure: k={k} must be between 1 and {len(features) - 1} (test set size - 1)")
    index = RetrievalIndex.build(features, kind="flat", metric="cosine")
    scores, ids = index.search(features[query_rows], k + 1)  # [Q, k + 1]
    out_ids, out_scores = [], []
    for q, row_ids, row_scores in zip(query_rows, ids, scores):
        keep = [j for j, i in enumerate(row_ids) if i != q][:k]
        out_ids.append(row_ids[keep])
        out_scores.append(row_scores[keep])
    return np.stack(out_ids), np.stack(out_scores)


def retrieval_png(out: Path, names: list[str], test_index: str, path: Path, n_queries: int = 4, k: int = 5) -> None:
    """For each model in `names` with a test feature cache (`out/features/<name>/test`): `n_queries` fixed queries
    (`pick_queries`) and their `k` nearest test neighbours; green frame = same class as the query, red = not."""
    from ssl_vit.eval.feature_cache import load_features

    if n_queries < 1 or k < 1:
        raise SslVitError(f"retrieval figure: n_queries and k must be >= 1, got {n_queries} and {k}")
    blocks, missing = [], []
    for name in names:
        folder = Path(out) / "features" / name / "test"
        if not (folder / "meta.json").is_file():
            missing.append(name)
            continue
        fs = load_features(folder)
        rows = pick_queries(fs.keys, fs.labels, n_queries)
        ids, scores = nearest_neighbours(fs.features, rows, k)
        blocks.append((name, fs.keys, fs.labels, rows, ids, scores))
    title = f"Test-set retrieval: {k} nearest neighbours by cosine similarity (green: query's class, red: other)"
    if not blocks:
        fig = Figure(figsize=(8, 2))
        _note(fig.subplots(), "no test feature caches for: " + ", ".join(names or ["(no models)"]))
        fig.suptitle(title)
        _save(fig, path)
        return
    needed = {b[1][i] for b in blocks for i in [*b[3], *b[4].ravel().tolist()]}
    images, classes = load_images(test_index, needed), _shards(test_index).classes or []
    nrows = sum(len(b[3]) for b in blocks)
    fig = Figure(figsize=(1.3 * (k + 1) + 0.8, 1.45 * nrows + 0.6))
    axes = np.asarray(fig.subplots(nrows, 1, squeeze=False))[:, 0]
    r = 0
    for name, keys, labels, rows, ids, scores in blocks:
        for q, nbr_ids, nbr_scores in zip(rows, ids, scores):
            _retrieval_row(axes[r], name, q, nbr_ids, nbr_scores, keys, labels, images, classes)
            r += 1
    fig.suptitle(title + ("" if not missing else f"\n(no test features: {', '.join(missing)})"), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    _save(fig, path)


def _retrieval_row(ax, name, q, nbr_ids, nbr_scores, keys, labels, images, classes) -> None:
    """The query and its neighbours on one axes, each in a unit cell (its aspect kept), framed by whether its class is
    the query's and titled above: one axes per cell made the figure several times slower (28 rows x 6 cells)."""
    cells = [(q, f"query: {_class_name(classes, labels[q])}", QUERY, "bold")]
    for i, score in zip(nbr_ids, nbr_scores):
        same = int(labels[i]) == int(labels[q]) and int(labels[q]) >= 0
        cells.append((i, f"{_class_name(classes, labels[i])} {score:.2f}", MATCH if same else MISMATCH, "normal"))
    for c, (i, title, color, weight) in enumerate(cells):
        x0 = c * (1 + CELL_GAP)
        thumb = images[keys[i]].copy()
        thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))  # a 12-MP photo is drawn 150 px wide
        w, h = (side / max(thumb.size) for side in thumb.size)
        left, top = x0 + (1 - w) / 2, (1 - h) / 2
        ax.imshow(np.asarray(thumb), extent=(left, left + w, top + h, top), interpolation="nearest")
        ax.add_patch(Rectangle((x0, 0), 1, 1, fill=False, edgecolor=color, linewidth=3))
        ax.text(x0 + 0.5, -0.06, title, ha="center", va="bottom", fontsize=8, fontweight=weight)
    ax.set(xlim=(-0.03, len(cells) * (1 + CELL_GAP) - CELL_GAP + 0.03), ylim=(1.03, -0.03), xticks=[], yticks=[])
    ax.set_ylabel(name, fontsize=9, fontweight="bold")
    for spine in ax.spines.values():
        spine.set_visible(False)


# ---------------------------------------------------------------- attention.png
def find_run(models: dict, method: str) -> Path | None:
    """The run folder of `method`: the entry named so, else one whose exported backbone says it was `method`."""
    from ssl_vit.models.export import read_backbone_meta

    if models.get(method) is not None:
        return Path(models[method])
    for folder in models.values():
        if folder is None or not (Path(folder) / "backbone.safetensors").is_file():
            continue
        try:
            if read_backbone_meta(Path(folder) / "backbone.safetensors").get("method") == method:
                return Path(folder)
        except SslVitError:
            continue
    return None


def _panel(run_dir: Path | None, label: str, build):
    """The panel's data, or a note (str) saying why it is missing: an optional panel never stops the report."""
    if run_dir is None:
        return f"no {label} model\nin this run"
    try:
        return build(run_dir)
    except SslVitError as e:
        return f"{label} panel unavailable:\n{e}"


def attention_png(models: dict, test_index: str, path: Path, n_images: int = 4) -> None:
    """Per test image (`pick_queries` order): the image, the DINO teacher's last-block CLS→patch attention (mean
    over heads) overlaid, and the MAE input with its masked patches and the reconstruction."""
    from ssl_vit.pipelines.attention import dino_panels, mae_panels

    images, labels, classes = evaluation_images(test_index, n_images)
    dino = _panel(find_run(models, "dino"), "DINO", lambda d: dino_panels(d, images))
    mae = _panel(find_run(models, "mae"), "MAE", lambda d: mae_panels(d, images))
    mae_ratio = f" ({mae[2]:.0%} masked)" if not isinstance(mae, str) else ""
    titles = ["test image", "DINO teacher: CLS attention\n(last block, head mean)", f"MAE input{mae_ratio}",
              "MAE reconstruction\n(visible + predicted)"]
    fig = Figure(figsize=(2.1 * len(titles), 2.1 * len(images) + 0.5))
    axes = np.asarray(fig.subplots(len(images), len(titles), squeeze=False))
    for r, img in enumerate(images):
        axes[r, 0].imshow(np.asarray(img), interpolation="nearest")
        axes[r, 0].set_ylabel(_class_name(classes, labels[r]), fontsize=9)
        _frame(axes[r, 0], "0.5", 1.0)
        if isinstance(dino, str):
            _note(axes[r, 1], dino)
        else:
            axes[r, 1].imshow(dino[0][r].numpy(), interpolation="nearest")
            axes[r, 1].imshow(dino[1][r].numpy(), cmap="inferno", alpha=0.6, interpolation="nearest")
            _frame(axes[r, 1], "0.5", 1.0)
        for c in (2, 3):
            if isinstance(mae, str):
                _note(axes[r, c], mae)
            else:
                axes[r, c].imshow(mae[c - 2][r].numpy(), interpolation="nearest")
                _frame(axes[r, c], "0.5", 1.0)
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=9)
    fig.suptitle("What the self-supervised models look at and reconstruct (test images)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save(fig, path)
