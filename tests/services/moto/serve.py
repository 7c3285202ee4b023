"""moto's S3 server, with S3's atomic conditional writes.

moto (5.2) checks a PUT's If-Match / If-None-Match and then stores the object with nothing
held in between (moto/s3/responses.py, put_object), and serves each request on its own
thread: two racing conditional PUTs on one ETag can both succeed, where S3 lets exactly one
win. The storage drivers' compare-and-swap is built on S3's guarantee, and the driver
contract test races 16 swappers on one key, so under load it failed on moto's race rather
than on ours.

This runs moto's own server (`moto.server.main`, same arguments as `moto_server`) with one
lock around every request that changes something (anything but GET, HEAD and OPTIONS):
writes are applied one at a time, as S3 applies conditional writes to one key. Reads stay
concurrent.
"""

import threading

import moto.server

_writes = threading.Lock()
_READS = {"GET", "HEAD", "OPTIONS"}


def _one_write_at_a_time(app):
    def wrapped(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET") in _READS:
            return app(environ, start_response)
        with _writes:
            # The whole answer is produced under the lock (moto answers from memory).
            return list(app(environ, start_response))

    return wrapped


_run_simple = moto.server.run_simple


def _run_simple_serialised(host, port, app, **kwargs):
    return _run_simple(host, port, _one_write_at_a_time(app), **kwargs)


moto.server.run_simple = _run_simple_serialised

if __name__ == "__main__":
    moto.server.main()
