"""`ssl-vit serve --index DIR`: the index as an HTTP service (ssl_vit/serve/)."""
import ipaddress
import socket
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve an index over HTTP: search by image or key, thumbnails, a page",
                              description="Loads an index folder (and the backbone recorded with it) once and serves "
                                          "POST /search, GET /images/{key}, GET /healthz, GET /stats and a web page "
                                          "at /. Binds to loopback unless --host says otherwise.")
    p.add_argument("--index", required=True, help="index folder (from `index build`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed at start)")
    p.add_argument("--backbone", help="backbone for image queries (default: the one the index records)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger request bodies are refused (413)")
    p.add_argument("--max-megapixels", type=float, default=40.0, help="larger images are refused (413)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="an upload that finds the embedder idle waits up to this long for uploads still being "
                        "decoded, to share one forward pass (under load, batches form while the previous one runs)")
    p.add_argument("--max-batch", type=int, default=32, help="largest embedding batch")
    p.add_argument("--threads", type=int, default=4, help="threads for FAISS searches and image reads")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch's intra-op threads of the embedding process (default 0: every core; 1 can serve better "
                        "when other jobs share the cores; OMP_NUM_THREADS wins)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ssl_vit.errors import SslVitError

    try:
        # uvicorn's C HTTP parser and libuv event loop: 3-4x the key queries/s and 1.5x the uploads/s of its
        # pure-Python h11 + asyncio stack over keep-alive connections (measured as tools/bench_serve.py sends them)
        import httptools  # noqa: F401
        import uvicorn
        import uvloop  # noqa: F401

        from ssl_vit.serve.app import create_app
    except ModuleNotFoundError as e:
        raise SslVitError(f"ssl-vit serve needs {e.name}, a dependency of ssl_vit: pip install -e . (or make "
                          "install)") from None
    from ssl_vit.serve.engine import SearchEngine
    from ssl_vit.threads import choose_threads

    if not 0 <= args.port <= 65535 or args.max_upload_mb <= 0 or args.max_megapixels <= 0 or args.max_batch < 1:
        raise SslVitError("--port must be 0..65535 and --max-upload-mb, --max-megapixels, --max-batch positive")
    if args.torch_threads < 0:
        raise SslVitError(f"--torch-threads must be >= 0 (0: every core), got {args.torch_threads}")
    # Every core by default: on 2 idle cores 224-px uploads ran at 1.03x the in-process rate with 2 threads, 0.58x
    # with 1; 32-px ones the same with either. With other jobs on the cores one thread did better (32 px 0.70x vs
    # 0.49x): the flag (tools/bench_serve.py)
    torch_threads = choose_threads(0, args.torch_threads, requested_as="--torch-threads")
    engine = SearchEngine(args.index, torch_threads, args.backbone, window_ms=args.batch_window_ms,
                          max_batch=args.max_batch, threads=args.threads, max_pixels=int(args.max_megapixels * 1e6))
    app = create_app(engine, int(args.max_upload_mb * 2 ** 20))
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if not is_loopback(args.host):
        print(f"warning: serving on {host}, reachable from other machines", file=sys.stderr)
    print(f"serving index {args.index} ({len(engine.index)} images, {engine.index.kind}) at http://{host}:{port}/",
          flush=True)
    config = uvicorn.Config(app, loop="uvloop", http="httptools", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def bind(host: str, port: int) -> socket.socket:
    from ssl_vit.errors import SslVitError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections queue from now on: the printed address answers as soon as it is printed
    except OSError as e:
        sock.close()
        raise SslVitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
