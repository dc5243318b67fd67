"""The HTTP routes over a SearchEngine: `POST /search`, `GET /images/{key}`, `GET /healthz`, `GET /stats`, `GET /`.

Every error is a 4xx (a 503 when the embedding process died mid-batch) with one line of JSON ({"error": "..."}); the
server keeps answering. Request bodies over the upload limit are refused from their Content-Length header, or,
without one, as soon as the bytes received pass the limit: never read in full.
"""
import contextlib
import time

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ssl_vit.errors import SslVitError
from ssl_vit.serve.embedder import EmbedderStopped
from ssl_vit.serve.engine import BadImage, ImageTooLarge, SearchEngine, UnknownKey
from ssl_vit.serve.page import PAGE

MAX_K = 1000
STATUS = {BadImage: 400, ImageTooLarge: 413, UnknownKey: 404, EmbedderStopped: 503}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


class UploadLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, decided before the body is read in full."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send, f"{int(length)} bytes")
        received, refused = 0, False

        async def limited_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # answer now; the app sees a client that went away
                    refused = True
                    await self._refuse(scope, receive, send, f"more than {self.max_bytes} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:  # after the refusal, the app's own answer (to a disconnect) goes nowhere
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise

    async def _refuse(self, scope, receive, send, size: str):
        response = error(413, f"request body of {size} is over this server's upload limit of {self.max_bytes} "
                              "bytes")
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def create_app(engine: SearchEngine, max_upload_bytes: int) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="ssl_vit image search", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(SslVitError)
    async def ssl_vit_error(request, exc):
        return error(next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 400), str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("query", "path", "body"))
        return error(422, f"{where}: {first.get('msg', 'invalid')}")

    async def http_error(request, exc):  # unknown routes and methods: the framework's own 404 / 405
        return error(exc.status_code, exc.detail)

    for status in (404, 405):
        app.add_exception_handler(status, http_error)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "index_size": len(engine.index)}

    @app.get("/stats")
    async def stats():
        return engine.stats()

    @app.post("/search")
    async def search(request: Request, k: int = Query(10, ge=1, le=MAX_K),
                     key: str | None = Query(None, min_length=1, max_length=1024),
                     nprobe: int | None = Query(None, ge=1, le=65536),
                     ef_search: int | None = Query(None, ge=1, le=4096, alias="efSearch")):
        """Nearest images of an uploaded image (multipart field `image`, or the raw body) or of an indexed key."""
        started = time.perf_counter()
        if key is not None:
            query, results = {"key": key}, await engine.search_key(key, k, nprobe, ef_search)
        else:
            data = await upload_bytes(request)
            query, results = {"upload_bytes": len(data)}, await engine.search_upload(data, k, nprobe, ef_search)
        engine.record(time.perf_counter() - started)
        return JSONResponse({"query": query, "k": k, "results": results})  # plain JSON types: no encoder pass

    @app.get("/images/{key:path}")
    async def image(key: str):
        """A JPEG thumbnail re-encoded from the key's image in the index's shards."""
        return Response(await engine.thumbnail(key), media_type="image/jpeg",
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"})

    return UploadLimit(app, max_upload_bytes)


async def upload_bytes(request: Request) -> bytes:
    """The image bytes of a multipart form's `image` field, or the raw body of any other content type."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        field = form.get("image")
        if field is None or isinstance(field, str):
            raise BadImage("the multipart form has no file field 'image'")
        return await field.read()
    return await request.body()
