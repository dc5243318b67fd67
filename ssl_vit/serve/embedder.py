"""The backbone of a served index in a process of its own, fed batches of decoded images over a pipe.

Why a process: in the server's process every op of the forward pass gives up and re-takes the GIL, which the event
loop holds while it parses requests, and torch's intra-op threads wait at each barrier for the core the loop
occupies. In its own process the forward shares neither: on 2 idle cores a lone client's uploads/s rose 1.8x at 32 px
and 1.2x at 224 px (tools/bench_serve.py, concurrency 1); at concurrency 16 the cores are the limit and it is the
same. A crash of the backbone (killed, out of memory) costs one batch, not the server.
"""
import multiprocessing

from ssl_vit.errors import SslVitError


def embed_loop(conn, source: dict, dim: int, where: str, backbone, torch_threads: int) -> None:
    """The child: load the backbone, answer ("ready", None) or ("error", message), then for every list of PIL images
    received answer ("ok", [N, D] features) or ("error", message), until None or the parent's end closes."""
    try:
        import torch
        from PIL import Image

        from ssl_vit.eval.index_queries import query_embedder

        torch.set_num_threads(torch_threads)
        embed = query_embedder(source, dim, where, backbone)
        embed([Image.new("RGB", (source["image_size"],) * 2)])  # the first forward's set-up, not the first user's
        conn.send(("ready", None))
        while (images := conn.recv()) is not None:
            try:
                conn.send(("ok", embed(images)))
            except Exception as e:  # the batch fails, the process serves on
                conn.send(("error", str(e) if isinstance(e, SslVitError) else f"{type(e).__name__}: {e}"))
    except SslVitError as e:
        conn.send(("error", str(e)))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):  # the server stopped
        pass


class EmbedderStopped(SslVitError):
    """The embedding process exited during a batch (killed, out of memory); the next batch starts a new one."""


class EmbedProcess:
    """`embed(images) -> [N, D]` computed in a child process (see `embed_loop`); one call at a time. A child that
    died is started again by the next call; `restarts` counts them."""

    def __init__(self, source: dict, dim: int, where, backbone=None, torch_threads: int = 1):
        self.args, self.restarts = (source, dim, str(where), backbone, torch_threads), 0
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # no copy of the parent's threads, loop or FAISS index
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=embed_loop, name="ssl-vit-embed", daemon=True,
                                       args=(child_end, *self.args))
        self.process.start()
        child_end.close()
        status, message = self._receive("while loading the backbone")
        if status != "ready":
            self.close()
            raise SslVitError(message)

    @property
    def pid(self) -> int:
        return self.process.pid

    def __call__(self, images: list):
        self.send(images)
        return self.result()

    def send(self, images: list) -> None:
        """Hand a batch to the child (a new child if the last one died); `result` waits for its features."""
        if not self.process.is_alive():
            self.conn.close()
            self.restarts += 1
            self._start()
        try:
            self.conn.send(images)
        except OSError:  # it died after the check: this batch fails, the next one starts a new child
            raise self._stopped("before this batch; the next upload starts a new one") from None

    def result(self):
        status, payload = self._receive("during this batch; the next upload starts a new one")
        if status != "ok":
            raise SslVitError(payload)
        return payload

    def _receive(self, when: str):
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise self._stopped(when) from None

    def _stopped(self, when: str) -> EmbedderStopped:
        self.process.join(timeout=5)
        return EmbedderStopped(f"the embedding process stopped (exit code {self.process.exitcode}) {when}")

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.terminate()
        self.conn.close()
