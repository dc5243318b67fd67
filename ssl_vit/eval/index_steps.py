"""One index from parts on several machines, in FAISS's three steps: train once (`index build --train-only`, reading
only the training sample of the caches), add each part to a copy of the trained index where that part lives
(`index build --trained T`), merge the filled parts (`index merge`). Each machine holds one part's index, never the
vectors of another part; the merged ids are the parts' rows in the order given, as `index build` over the parts in
one process numbers them."""
import numpy as np

from ssl_vit.errors import SslVitError
from ssl_vit.eval.faiss_utils import faiss
from ssl_vit.eval.index_build import ConcatRows, Part, add_rows, merge, resolve_params, train
from ssl_vit.eval.retrieval import RetrievalIndex

SPLIT_KINDS = ("flat", "ivf", "ivfpq")  # HNSW graphs and refine layers cannot be merged


def trained_only(parts: list, kind: str, **params) -> RetrievalIndex:
    """An empty index trained on the parts' sample (defaults from their total N), to be copied and filled."""
    if kind not in SPLIT_KINDS or params.get("refine"):
        raise SslVitError(f"--train-only: {kind}{' with refine' if params.get('refine') else ''} cannot be merged "
                          "from parts; build it from all parts in one process")
    n = sum(len(p) for p in parts)
    resolved = resolve_params(kind, n, int(parts[0].features.shape[1]),
                              **{k: v for k, v in params.items() if v is not None})
    index, _ = train(parts, kind, resolved)
    metric = resolved.pop("metric")
    return RetrievalIndex(index, np.zeros(0, "S1"), np.zeros(0, np.int64), kind, metric, resolved, key_runs=[0])


def add_part(trained: RetrievalIndex, part: Part) -> RetrievalIndex:
    """A copy of the trained (empty) index holding the part's rows."""
    if len(trained):
        raise SslVitError(f"--trained must name an index from --train-only (it holds {len(trained)} vectors)")
    if part.features.shape[1] != trained.dim:
        raise SslVitError(f"the part has {part.features.shape[1]}-d features, the trained index {trained.dim}-d")
    params = {**trained.params, "metric": trained.metric}
    index = add_rows(faiss.clone_index(trained.index), part, params)
    return RetrievalIndex(index, part.keys, part.labels, trained.kind, trained.metric, trained.params,
                          key_runs=[0, len(part)])


def merge_indexes(pieces: list, folders: list) -> RetrievalIndex:
    """The filled parts as one index (ids: piece 0's, then piece 1's, ...); they must come from one trained index."""
    first = pieces[0]
    for piece, folder in zip(pieces[1:], folders[1:]):
        if (piece.kind, piece.metric, piece.dim, piece.params) != (first.kind, first.metric, first.dim, first.params):
            raise SslVitError(f"index {folder} was not filled from the same trained index as {folders[0]} "
                              "(kind, metric, dim or parameters differ)")
    if any(p.key_order is not None for p in pieces):
        raise SslVitError("index merge takes parts built from feature caches (keys sorted within each)")
    runs, offset = [0], 0
    for piece in pieces:
        runs += [offset + b for b in piece.key_runs[1:]]
        offset += len(piece)
    index = merge([p.index for p in pieces], first.kind, {**first.params})
    source = {**first.source, "features": [f for p in pieces for f in p.source.get("features") or []],
              "shards": list(dict.fromkeys(url for p in pieces for url in p.source.get("shards") or []))}
    return RetrievalIndex(index, ConcatRows([p.keys for p in pieces]), ConcatRows([p.labels for p in pieces]),
                          first.kind, first.metric, first.params, source=source, key_runs=runs)
