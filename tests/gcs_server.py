"""A Google Cloud Storage server on localhost for the tests (conftest's `gcs_endpoint`): gcp-storage-emulator's
request handler (the JSON API, objects in memory) behind a stdlib HTTP server of ours, so that it binds a free port
itself, runs in a daemon thread and stays up until the process exits. It must outlive the tests: tensorboardX
registers an exit handler per SummaryWriter that uploads a `gs://` events file once more, and its client retries
for two minutes where no server answers. Exit handlers run last-registered first, so the server, registered before
any writer, stops after them."""

from __future__ import annotations

import atexit
import functools
import sys
import threading
from http import server as http_server

from gcp_storage_emulator.handlers import buckets
from gcp_storage_emulator.server import RequestHandler
from gcp_storage_emulator.storage import Storage


class _Server(http_server.HTTPServer):
  """One request at a time, as the emulator's own server."""

  def handle_error(self, request, client_address):
    # gcsfs asks for an object and for a folder of that name at once and hangs up on the loser: not an error, and
    # its traceback would land on the stderr a test may be reading a one-line error from.
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)


def start(bucket: str) -> str:
  """Starts a server holding the empty bucket `bucket`; returns its URL (`http://127.0.0.1:PORT`)."""
  storage = Storage(use_memory_fs=True)
  buckets.create_bucket(bucket, storage)
  httpd = _Server(("127.0.0.1", 0), functools.partial(RequestHandler, storage))
  threading.Thread(target=httpd.serve_forever, name="gcs-server", daemon=True).start()
  atexit.register(httpd.shutdown)
  return f"http://127.0.0.1:{httpd.server_address[1]}"
