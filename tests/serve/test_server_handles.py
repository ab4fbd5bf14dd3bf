"""The three server handles share one base (serve/handle.py): url, base_url, stop and the context manager."""

from __future__ import annotations

import socket

from openllm_ds.serve import RunningServer, ServerHandle, VLLMServer, start_server
from openllm_ds.serve.replicas import RunningReplicas


def test_every_handle_is_a_server_handle():
    for cls in (RunningServer, VLLMServer, RunningReplicas):
        assert issubclass(cls, ServerHandle)
        assert cls.url is ServerHandle.url and cls.base_url is ServerHandle.base_url  # one url, not three
    replicas = RunningReplicas("0.0.0.0", 8123, started_ray=False, local=True, num_replicas=2)
    assert replicas.base_url == "http://127.0.0.1:8123/v1"  # every address: a client here connects over loopback
    assert RunningReplicas("::1", 9, False, True, 1).url == "http://[::1]:9"


def test_with_stops_the_server(small_run):
    with start_server(small_run, context_length=32, max_concurrency=1) as srv:
        assert srv.url == f"http://127.0.0.1:{srv.port}" and srv.base_url == srv.url + "/v1"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5):
            pass
    assert not srv.thread.is_alive() and srv.sock.fileno() == -1  # stopped: the thread ended, the socket closed


def test_a_handle_of_ones_own_is_a_context_manager():
    stopped = []

    class Handle(ServerHandle):
        host, port = "127.0.0.1", 5

        def stop(self):
            stopped.append(True)

    with Handle() as h:
        assert h.base_url == "http://127.0.0.1:5/v1"
    assert stopped == [True]
