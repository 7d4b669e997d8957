"""Registry client: references, auth, manifests, ranged and multi-range blob reads, pushes.

One `RegistryClient` per process (it owns the pooled `requests.Session`), shared by all threads.
Configuration comes from config.toml through `RegistryConfig.from_toml(doc)`:

    [resolver]
    request_timeout_sec = 30            # read timeout per request
    connect_timeout_sec = 10
    auth_file = "/run/containers/0/auth.json"   # else $REGISTRY_AUTH_FILE, else the usual files
    ca_file = "/etc/ssl/extra-ca.pem"   # extra CA bundle for every host

    [[resolver.host."docker.io".mirrors]]      # tried in order, then docker.io itself
    host = "mirror.example.com:5000"
    insecure = true                     # plain HTTP to this mirror
    request_timeout_sec = 10
    header = { "X-Foo" = "bar" }

    [resolver.host."registry.example.com:5000"]  # a private registry
    ca_file = "/etc/registry-ca.pem"    # its CA (implies HTTPS)
    username = "builder"                # else credentials from the auth files / helpers
    password = "..."
    header = { "X-Team" = "storage" }
    # insecure = true                   # HTTPS without verification, falling back to plain HTTP

    [blob]
    max_retries = 3                     # connection errors, timeouts, 429, 5xx except 501
    min_wait_msec = 30                  # exponential back-off with jitter, capped by max_wait_msec
    max_wait_msec = 10000
    fetching_timeout_sec = 30           # total retry budget of one operation
    valid_interval = 60                 # a blob's redirect target (presigned URL) is reused this long
    force_single_range_mode = false

Credentials, first match wins: what the container runtime sent for the exact image reference
(`runtime_credentials`; pulls to that reference's own registry only, never a mirror), config.toml
(above), then $REGISTRY_AUTH_FILE or `auth_file` alone,
else ${XDG_RUNTIME_DIR}/containers/auth.json (or /run/containers/<uid>/auth.json),
~/.config/containers/auth.json, $DOCKER_CONFIG/config.json or ~/.docker/config.json, ~/.dockercfg;
within a file `credHelpers[host]`, then `auths` (most specific key first), then `credsStore`
(`docker-credential-NAME get`). Loopback hosts use plain HTTP unless they turn out to speak only TLS.
"""
from .client import Manifest, RegistryClient, RegistryConfig
from .config import HostConfig, MirrorConfig
from .errors import (
    AuthError,
    InvalidReferenceError,
    NotFoundError,
    RegistryError,
    RegistryTimeoutError,
    ShortReadError,
    UnreachableError,
)
from .reference import Reference, parse_reference

__all__ = [
    "AuthError", "HostConfig", "InvalidReferenceError", "Manifest", "MirrorConfig", "NotFoundError",
    "Reference", "RegistryClient", "RegistryConfig", "RegistryError", "RegistryTimeoutError",
    "ShortReadError", "UnreachableError", "parse_reference",
]
