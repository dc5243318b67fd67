"""`ssl-vit serve`: an index folder as an HTTP service (search by uploaded image or by key, thumbnails, stats, one
web page).

Built on FastAPI over uvicorn: FastAPI validates query parameters against declared bounds and parses multipart
uploads (python-multipart, spooled to a temporary file, never into the index folder) with one line per route, and
both are maintained, widely deployed ASGI projects; uvicorn serves the asyncio event loop that the micro-batching
of embeddings needs, on its fast stack (uvloop's libuv loop, httptools' C parser). Flask (WSGI, a thread per
request) could not batch requests without its own event loop; aiohttp would mean writing validation and multipart
handling by hand.

engine.py: the index, the backbone and the image table, loaded once; uploads embedded and searched in batches
across concurrent requests (one batch at a time); key searches and image reads in a thread pool. embedder.py: the
backbone in a process of its own (no GIL shared with the event loop). app.py: routes, errors as one-line JSON, the
upload size limit. page.py: the web page.
"""
