"""A local web server for the download tests (NISQA's weights, the published weights): it serves a
folder on 127.0.0.1 from a thread, and answers /truncated/NAME with NAME's first half under the
Content-Length of the whole file, as a connection that breaks off does."""

import contextlib
import functools
import http.server
import os
import socket
import threading
from typing import Iterator

TRUNCATED = "/truncated/"


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet: the tests read the client's messages
        pass

    def do_GET(self) -> None:
        if not self.path.startswith(TRUNCATED):
            super().do_GET()
            return
        data = open(os.path.join(self.directory, self.path[len(TRUNCATED):]), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2])
        self.close_connection = True


@contextlib.contextmanager
def serving(folder: str) -> Iterator[str]:
    """Serve `folder` while the block runs; yields the base URL (http://127.0.0.1:PORT)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def closed_port_url() -> str:
    """The URL of a port on 127.0.0.1 that nothing listens on (it was free a moment ago): a
    connection to it is refused, as offline."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"
