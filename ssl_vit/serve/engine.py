"""What the server does per request, independent of HTTP: embed uploaded images (batched across concurrent
requests), look up cached vectors by key, search the index, read and re-encode thumbnails, keep statistics."""
import asyncio
import collections
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_vit.data.image_table import ImageTable
from ssl_vit.errors import SslVitError
from ssl_vit.eval.feature_cache import lookup_vectors, open_rows
from ssl_vit.eval.index_queries import index_caches
from ssl_vit.eval.retrieval import RetrievalIndex
from ssl_vit.serve.embedder import EmbedProcess

THUMB_PX = 256
LATENCY_WINDOW = 10_000  # the latencies the percentiles are taken over


class BadImage(SslVitError):
    """An upload that is not an image PIL can decode (or is cut short)."""


class ImageTooLarge(SslVitError):
    """An upload with more pixels than the server decodes."""


class UnknownKey(SslVitError):
    """A key the index (or its image table) does not hold."""


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """RGB image of uploaded bytes; the pixel count is checked from the header before any decoding."""
    if not data:
        raise BadImage("empty upload: send an image file in the 'image' field, or a key")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except Exception:  # PIL raises many types for data that is not an image
        raise BadImage("the upload is not an image (PIL cannot read its header)") from None
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image has {width}x{height} = {width * height / 1e6:.1f} megapixels; this server "
                            f"decodes at most {max_pixels / 1e6:.1f}")
    try:
        image.load()
        return image.convert("RGB")
    except Exception as e:
        raise BadImage(f"the image cannot be decoded ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def thumbnail_jpeg(data: bytes, key: str, size: int = THUMB_PX) -> bytes:
    """A JPEG re-encoded from the member's image (never the member's own bytes), at most `size` px per side."""
    try:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced DCT scale
        image = image.convert("RGB")
    except Exception:
        raise BadImage(f"the image of key {key!r} in the shards is unreadable") from None
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


class MicroBatcher:
    """Calls `fn(items) -> results` in `executor`, one batch at a time. An item that finds the batcher idle starts a
    batch at once unless other items are on their way (`expect`: being read or decoded); then it waits for them up
    to `window_s` (or until `max_batch` are waiting). Items that arrive while a batch runs go into the next one,
    which starts as soon as that batch ends: under load, batches grow to what arrived during one forward pass (up to
    `max_batch`), not to what arrived within the window; a lone request never waits for company that is not
    coming."""

    def __init__(self, fn, window_s: float, max_batch: int, executor):
        self.fn, self.window_s, self.max_batch, self.executor = fn, window_s, max_batch, executor
        self.pending, self.timer, self.running, self.coming, self.batches, self.items = [], None, False, 0, 0, 0

    def expect(self) -> None:
        """One more item is on its way: an idle batcher holds its pending items for it, up to the window."""
        self.coming += 1

    def withdraw(self) -> None:
        """An expected item will not come (its preparation failed)."""
        self.coming -= 1
        self._consider()

    async def submit(self, item, expected: bool = False):
        """The result of `item`; `expected`: it was announced with `expect`."""
        self.coming -= expected
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        self._consider()
        return await future

    def _consider(self) -> None:
        if self.running or not self.pending:
            return
        if len(self.pending) >= self.max_batch or self.coming <= 0:
            self._start()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.window_s, self._start)

    def _start(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.running or not self.pending:
            return
        batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
        self.running, self.batches, self.items = True, self.batches + 1, self.items + len(batch)
        asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch) -> None:
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.fn,
                                                                       [item for item, _ in batch])
        except Exception as e:  # every request of the batch gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        finally:
            self.running = False
            self._start()  # what queued meanwhile has waited one forward pass already: no window for it
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)


class SearchEngine:
    """An index folder loaded once: its FAISS index, the backbone recorded with it (for image queries, in its own
    process with `torch_threads`, the choice of ssl_vit/threads.py), its feature caches (for key queries) and its
    image table (for thumbnails)."""

    def __init__(self, index_dir, torch_threads: dict, backbone=None, *, window_ms: float = 5.0, max_batch: int = 32,
                 threads: int = 4, max_pixels: int = 40_000_000):
        self.index_dir = Path(index_dir)
        self.index = RetrievalIndex.load(self.index_dir)
        self.caches = index_caches(self.index)
        self.opened = [open_rows(folder) for folder in self.caches]  # memory-mapped once, read by row per query
        self.embed = EmbedProcess(self.index.source, self.index.dim, self.index_dir, backbone,
                                  torch_threads["threads"]) if backbone or self.index.source.get("backbone") else None
        try:
            self.table = ImageTable.load(self.index_dir, self.index.source.get("shards") or [])
        except SslVitError:
            self.table = None
        self.max_pixels, self.classes = max_pixels, self.index.source.get("classes")
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="search")
        self.embed_pool = ThreadPoolExecutor(1, thread_name_prefix="embed")  # waits on the embedding process
        self.batcher = MicroBatcher(self._embed_and_search, window_ms / 1000, max_batch, self.embed_pool)
        self.latencies = collections.deque(maxlen=LATENCY_WINDOW)
        self.served, self.started = 0, time.time()
        self.torch_threads = torch_threads

    def _embed_and_search(self, queries: list) -> list:
        """[(scores [k], ids [k])] of [(image, k, nprobe, ef_search)]: one forward pass for the batch, then one FAISS
        search per group of equal search arguments (the in-process batched loop's work; a group's answers equal
        each query's own search: k and the parameters are never widened to another query's)."""
        vectors = self.embed([image for image, *_ in queries])  # [B, D]
        groups = collections.defaultdict(list)
        for row, (_, *arguments) in enumerate(queries):
            groups[tuple(arguments)].append(row)
        answers = [None] * len(queries)
        for (k, nprobe, ef_search), rows in groups.items():
            scores, ids = self.index.search(vectors[rows], k, nprobe=nprobe, ef_search=ef_search)
            for position, row in enumerate(rows):
                answers[row] = scores[position], ids[position]
        return answers

    def _check_k(self, k: int) -> None:
        if k > len(self.index):
            raise SslVitError(f"k={k} is more than the {len(self.index)} indexed images")

    async def search_upload(self, data: bytes, k: int, nprobe=None, ef_search=None) -> list:
        """The results (see `results`) of an uploaded image: decoded in the pool, embedded and searched in a batch
        with the uploads that arrive at the same time."""
        if self.embed is None:
            raise SslVitError(f"index {self.index_dir} records no backbone: only key queries are possible")
        self._check_k(k)
        self.batcher.expect()
        try:
            image = await asyncio.get_running_loop().run_in_executor(self.pool, decode_upload, data, self.max_pixels)
        except BaseException:  # a bad image, or the client went away
            self.batcher.withdraw()
            raise
        return self.results(*await self.batcher.submit((image, k, nprobe, ef_search), expected=True))

    async def search_key(self, key: str, k: int, nprobe=None, ef_search=None) -> list:
        """The results of an indexed key: its cached vector read and searched in the pool."""
        if not self.caches:
            raise SslVitError(f"index {self.index_dir} does not record its feature caches: no key queries")
        self._check_k(k)
        if self.index.find([key])[0] < 0:
            raise UnknownKey(f"no image with key {key!r} in this index")

        def lookup_and_search():
            vectors = lookup_vectors(self.opened, [key], self.caches)
            scores, ids = self.index.search(vectors, k, nprobe=nprobe, ef_search=ef_search)
            return scores[0], ids[0]

        return self.results(*await asyncio.get_running_loop().run_in_executor(self.pool, lookup_and_search))

    def results(self, scores: np.ndarray, ids: np.ndarray) -> list:
        """[{"key", "score", "label", "class", "image"}] best first."""
        results = []
        for score, (key, label) in zip(scores.tolist(), self.index.lookup(ids)):
            if key is not None:
                name = self.classes[label] if self.classes and label is not None and label < len(self.classes) \
                    else None
                results.append({"key": key, "score": score, "label": label, "class": name,
                                "image": f"/images/{key}" if self.table is not None else None})
        return results

    async def thumbnail(self, key: str) -> bytes:
        if self.table is None:
            raise UnknownKey(f"index {self.index_dir} has no image table: "
                             f"{self.index.source.get('image_table', 'built before tables existed')}")
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self.pool, self.table.read, key)
        if data is None:
            raise UnknownKey(f"no image with key {key!r} in this index's shards")
        return await loop.run_in_executor(self.pool, thumbnail_jpeg, data, key)

    def record(self, seconds: float) -> None:
        self.served += 1
        self.latencies.append(seconds)

    def stats(self) -> dict:
        ms = np.asarray(self.latencies) * 1000
        pct = {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)} if len(ms) else {}
        return {"index": {"kind": self.index.kind, "size": len(self.index), "dim": self.index.dim,
                          "metric": self.index.metric, "params": self.index.params},
                "queries_served": self.served, "latency_ms": pct, "uptime_s": time.time() - self.started,
                "embed_batches": self.batcher.batches,
                "mean_embed_batch": self.batcher.items / max(self.batcher.batches, 1),
                "torch_threads": self.torch_threads,
                "embedder": None if self.embed is None else {"pid": self.embed.pid, "restarts": self.embed.restarts}}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.embed_pool.shutdown(wait=False, cancel_futures=True)
        if self.embed is not None:
            self.embed.close()
