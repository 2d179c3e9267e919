"""Pieces the test servers share (world.py in the world namespace,
ingress_guest.py inside a sandbox). Standard library only; imported from the
scripts' own directory."""
import threading


def read_body(handler):
    """Yield a request's body in pieces: Content-Length or chunked."""
    te = handler.headers.get("Transfer-Encoding", "")
    if "chunked" in te.lower():
        while True:
            line = handler.rfile.readline(1024)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return
            left = size
            while left:
                piece = handler.rfile.read(min(left, 1 << 20))
                if not piece:
                    return
                left -= len(piece)
                yield piece
            handler.rfile.readline(16)
    else:
        left = int(handler.headers.get("Content-Length") or 0)
        while left:
            piece = handler.rfile.read(min(left, 1 << 20))
            if not piece:
                return
            left -= len(piece)
            yield piece


def send_file(handler, path):
    """Answer 200 with the file at `path`, streamed in 1 MiB pieces."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(0)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(size))
        handler.end_headers()
        while True:
            piece = f.read(1 << 20)
            if not piece:
                break
            handler.wfile.write(piece)


def echo_forever(srv, greet=None):
    """Accept on the listening socket `srv` from a thread of its own; each
    connection gets `greet(conn)` first when given, then an echo of
    everything it sends."""

    def serve(conn):
        with conn:
            try:
                if greet:
                    greet(conn)
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
            except (OSError, EOFError):
                pass

    def loop():
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
