"""A Google Cloud Storage server on localhost for the tests (conftest's `gcs_endpoint`): gcp-storage-emulator's
request handler (the JSON API, objects in memory) behind a stdlib HTTP server of ours, which binds a free port
itself and runs in a daemon thread until the process exits.

One addition to the emulator: GCS names an object's generation in the `x-goog-generation` header of every media
download, which is how tensorstore learns the version of a ranged read (then writing, for instance an OCDBT
manifest, on the condition that the object is still that version). The emulator sends no such header, so
tensorstore took the version for 0 and refused the write ("Malformed StorageGeneration"), in about two checkpoint
saves of three; the handler here adds it.
"""

from __future__ import annotations

import atexit
import functools
import re
import sys
import threading
from http import server as http_server
from urllib.parse import unquote, urlparse

from gcp_storage_emulator.handlers import buckets
from gcp_storage_emulator.server import RequestHandler
from gcp_storage_emulator.storage import Storage

_OBJECT = re.compile(r"^(?:/download)?/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<name>.+)$")


class _Handler(RequestHandler):
  """The emulator's handler, sending `x-goog-generation` with media downloads as GCS does."""

  def send_response(self, code, message=None):
    self.status_sent = code
    super().send_response(code, message)

  def end_headers(self):
    url = urlparse(self.path)
    found = _OBJECT.match(url.path)
    media = url.path.startswith("/download/") or "alt=media" in url.query.split("&")
    if self.command == "GET" and found and media and getattr(self, "status_sent", 0) in (200, 206):
      stored = self.storage.get_file_obj(found["bucket"], unquote(found["name"]))
      self.send_header("x-goog-generation", stored["generation"])
    super().end_headers()


class _Server(http_server.HTTPServer):
  """One request at a time, as the emulator's own server. Connections wait in a listen queue as long as a client
  opens them at once (fsspec's concurrent ranged reads open dozens): with the default queue of 5, the kernel dropped
  the others' first packets and their clients waited seconds to try again."""

  request_queue_size = 256

  def handle_error(self, request, client_address):
    # gcsfs asks for an object and for a folder of that name at once and hangs up on the loser: not an error, and
    # its traceback would land on the stderr a test may be reading a one-line error from.
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)


def start(bucket: str) -> str:
  """Starts a server holding the empty bucket `bucket`; returns its URL (`http://127.0.0.1:PORT`)."""
  storage = Storage(use_memory_fs=True)
  buckets.create_bucket(bucket, storage)
  httpd = _Server(("127.0.0.1", 0), functools.partial(_Handler, storage))
  threading.Thread(target=httpd.serve_forever, name="gcs-server", daemon=True).start()
  atexit.register(httpd.shutdown)
  return f"http://127.0.0.1:{httpd.server_address[1]}"
