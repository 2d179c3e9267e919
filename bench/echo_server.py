"""Host-side echo server (127.0.0.1 unless --bind) for the connect/request/response and
latency figures: one thread, non-blocking, so neither thread start-up nor a
stuck client slows the others. Prints its port, then serves until killed
or until --lifetime seconds have passed."""

import argparse
import selectors
import socket
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lifetime", type=float, default=3600.0)
    ap.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    args = ap.parse_args()

    sel = selectors.DefaultSelector()
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((args.bind, 0))
    ls.listen(1024)
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ, None)
    print(ls.getsockname()[1], flush=True)

    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            if key.data is None:
                while True:
                    try:
                        c, _ = ls.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(c, selectors.EVENT_READ, "conn")
                continue
            c = key.fileobj
            try:
                data = c.recv(65536)
                if data:
                    # Small requests: the send buffer always has room.
                    c.sendall(data)
                    continue
            except OSError:
                pass
            sel.unregister(c)
            c.close()


if __name__ == "__main__":
    main()
