"""What every running server hands back (the built-in one, vLLM, Ray Serve's replicas): where it answers and how it
stops, as a context manager."""

from __future__ import annotations


class ServerHandle:
    """A server that answers at ``url`` (OpenAI clients take ``base_url``) until ``stop()``; ``with`` stops it."""

    host: str
    port: int

    @property
    def connect_host(self) -> str:
        """The address a client on this machine connects to (loopback for a server on every address)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def url(self) -> str:
        host = self.connect_host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What the OpenAI client takes as base_url."""
        return f"{self.url}/v1"

    def stop(self):
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
