#!/usr/bin/env python3
"""Independent SigV4 verifier for lattice's proxy tests (loopback only).

An HTTP/1.1 server that recomputes each request's signature with botocore's
SigV4Auth and answers:
  200 + JSON echo (method, path, body length, body SHA-256, ...) on success,
  403 + a one-line reason on any mismatch.

A connection that opens with the HTTP/2 preface is served as h2c (prior
knowledge, as gRPC clients do; needs the `h2` package): each stream is
verified the same way, and a request with `te: trailers` gets a
`grpc-status: 0` trailer. The echo's "http_version" says which it was.

Bodies are read in bounded chunks (Content-Length or chunked, trailers too)
and hashed as they stream; nothing is held whole.

Credentials it accepts, any combination:
  --access-key/--secret-key[/--token]   one fixed key
  --keys-file FILE     JSON {"AKID": {"secret": "...", "token": "..."}},
                       re-read on every request (keys issued during a test)
  --moto-sts-port N    runs moto's server in this process on 127.0.0.1:N and
                       accepts the credentials its STS issued (looked up in
                       moto's STS backend, the way AWS looks up a key)
  --container-creds-port N   also serves a container-credentials endpoint
                       (AWS_CONTAINER_CREDENTIALS_FULL_URI) on
                       --container-creds-host (default 127.0.0.1) port N
                       that hands out a fresh key per call, valid for
                       --container-creds-lifetime seconds, to callers whose
                       Authorization is one of the --container-creds-token
                       values (repeatable; it reads each token file given as
                       @PATH anew per call); it answers 500 while the file
                       --container-creds-fail-while exists. Each key issued
                       is accepted and printed as "ISSUED <json>" (with its
                       secret: for log scans, and the index of the token
                       that asked for it). Every call is printed as
                       "CREDS-CALL <json>" (status, caller).

Prints "LISTENING <port>" on stdout once serving (--port 0 picks one).
--host picks the address (default 127.0.0.1; IPv6 works). --log-requests
prints one "REQUEST <json>" line per request on stdout: status, reason, the
client's address ("peer"), the access key and, for keys moto's STS issued,
the role it assumed ("role_arn"), and the headers received, with the
signature and security token redacted.
"""

import argparse
import hashlib
import hmac
import json
import os
import re
import socket
import socketserver
import sys
import threading
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

CHUNK = 64 * 1024
# Request handlers run in threads: one line, written whole, at a time.
OUTPUT_LOCK = threading.Lock()


def emit(line):
    with OUTPUT_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<ak>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;\-]+), "
    r"Signature=(?P<sig>[0-9a-f]{64})$"
)


class Keys:
    def __init__(self, args):
        self.fixed = {}
        if args.access_key:
            self.fixed[args.access_key] = (args.secret_key, args.token)
        self.keys_file = args.keys_file
        self.moto = args.moto_sts_port is not None
        self.container = None

    def lookup(self, access_key):
        if access_key in self.fixed:
            return self.fixed[access_key]
        if self.keys_file:
            try:
                with open(self.keys_file) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                data = {}
            if access_key in data:
                k = data[access_key]
                return (k["secret"], k.get("token"))
        if self.container:
            found = self.container.lookup(access_key)
            if found:
                return found
        if self.moto:
            found = moto_lookup(access_key)
            if found:
                return found
        return None


def moto_lookup(access_key):
    """Secret and token of credentials moto's STS handed out."""
    role = moto_role(access_key)
    return (role.secret_access_key, role.session_token) if role else None


def moto_role(access_key):
    """The role session moto's STS issued `access_key` for, or None."""
    try:
        from moto.sts.models import sts_backends
    except ImportError:
        return None
    for account_backends in sts_backends.values():
        for backend in account_backends.values():
            for role in getattr(backend, "assumed_roles", []):
                if role.access_key_id == access_key:
                    return role
    return None


class ContainerCreds:
    """The keys a container-credentials endpoint handed out."""

    def __init__(self, args):
        self.tokens = args.container_creds_token or [""]
        self.lifetime = args.container_creds_lifetime
        self.fail_while = args.container_creds_fail_while
        self.lock = threading.Lock()
        self.issued = {}

    def lookup(self, access_key):
        with self.lock:
            return self.issued.get(access_key)

    def caller(self, authorization):
        """Index of the accepted token `authorization` is, or None."""
        for i, token in enumerate(self.tokens):
            if token.startswith("@"):
                try:
                    with open(token[1:]) as f:
                        token = f.read().strip()
                except OSError:
                    continue
            if authorization == token:
                return i
        return None

    def issue(self, caller):
        with self.lock:
            n = len(self.issued)
            ak = f"ASIACONTAINER{n:06d}"
            secret = f"container/secret/{n}/abcdefghijklmnopqrstuvwxyz0123"
            token = f"container-session-token-{n}-0123456789abcdef"
            self.issued[ak] = (secret, token)
        expiry = int(time.time() + self.lifetime)
        issued = {"access_key": ak, "secret": secret, "token": token, "expiry_unix": expiry,
                  "caller": caller}
        emit("ISSUED " + json.dumps(issued))
        return {
            "AccessKeyId": ak,
            "SecretAccessKey": secret,
            "Token": token,
            "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiry)),
        }


class ContainerCredsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # quiet
        pass

    def do_GET(self):
        creds = self.server.creds
        caller = creds.caller(self.headers.get("authorization"))
        if caller is None:
            status = 403
        elif creds.fail_while and os.path.exists(creds.fail_while):
            status = 500
        else:
            status = 200
        emit("CREDS-CALL " + json.dumps({"status": status, "caller": caller}))
        if status == 403:
            return self.answer(403, {"error": "bad authorization token"})
        if status == 500:
            return self.answer(500, {"error": "credentials temporarily unavailable"})
        self.answer(200, creds.issue(caller))

    def answer(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class BodyError(Exception):
    pass


def read_body(rfile, headers):
    """Streams the request body; returns (length, sha256 hex, trailer names)."""
    digest = hashlib.sha256()
    length = 0
    trailers = []

    def consume(size, short):
        # Reads `size` bytes into the digest; `short` names a body cut off.
        nonlocal length
        left = size
        while left:
            data = rfile.read(min(CHUNK, left))
            if not data:
                raise BodyError(short)
            digest.update(data)
            left -= len(data)
        length += size

    te = headers.get("Transfer-Encoding", "")
    if "chunked" in te.lower():
        while True:
            line = rfile.readline(1024)
            if not line:
                raise BodyError("chunked body ended early")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            consume(size, "chunk ended early")
            if rfile.readline(16).strip():
                raise BodyError("missing CRLF after chunk")
        while True:
            line = rfile.readline(8192)
            if not line or not line.strip():
                break
            trailers.append(line.split(b":", 1)[0].decode().strip().lower())
    else:
        consume(int(headers.get("Content-Length", "0") or 0), "body ended early")
    return length, digest.hexdigest(), trailers


def expected_signature(method, path, headers, signed, secret, token, region, service, amz_date):
    host = headers.get("host")
    req_headers = {}
    for name in signed:
        values = headers.get_all(name) or []
        req_headers[name] = ",".join(v.strip() for v in values)
    request = AWSRequest(method=method, url="http://" + host + path, headers=req_headers)
    request.context["timestamp"] = amz_date
    auth = SigV4Auth(Credentials("unused", secret, token), service, region)
    canonical = auth.canonical_request(request)
    string_to_sign = auth.string_to_sign(request, canonical)
    return auth.signature(string_to_sign, request), canonical


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body go out in two writes: without TCP_NODELAY the
    # second waits for the peer's delayed ACK (40 ms per keep-alive request).
    disable_nagle_algorithm = True
    server_version = "sigv4-verifier"

    def log_message(self, fmt, *args):  # quiet
        pass

    def handle_one_request(self):
        # As BaseHTTPRequestHandler's, but a connection opening with the
        # HTTP/2 preface (prior knowledge, as gRPC clients do) is served as h2c.
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            self.close_connection = True
            return
        if self.raw_requestline == H2_PREFACE_LINE:
            serve_h2(self, self.raw_requestline)
            self.close_connection = True
            return
        if len(self.raw_requestline) > 65536:
            self.send_error(414)
            return
        if not self.parse_request():
            return
        method = getattr(self, "do_" + self.command, None)
        if method is None:
            self.send_error(501, f"unsupported method {self.command!r}")
            return
        method()
        self.wfile.flush()

    def handle_any(self):
        self.access_key = None
        cfg = self.server.cfg
        try:
            length, body_sha, trailers = read_body(self.rfile, self.headers)
        except (BodyError, ValueError) as e:
            return self.reply(400, {"error": f"body: {e}"})
        reason = self.verify(cfg, body_sha)
        if reason:
            # Shaped like Lattice's own denial; "error" holds the reason.
            return self.reply(403, {"type": "AccessDeniedException", "error": reason})
        self.reply(200, self.echo(length, body_sha, trailers))

    def echo(self, length, body_sha, trailers):
        """What the verifier accepted, as the 200 answer's JSON."""
        path, _, query = self.path.partition("?")
        return {
            "method": self.command,
            "http_version": self.request_version,
            "path": path,
            "query": query,
            "host": self.headers.get("host"),
            "body_length": length,
            "body_sha256": body_sha,
            "trailers": trailers,
            "access_key": self.access_key,
            "amz_date": self.headers.get("x-amz-date"),
            "content_sha256": self.headers.get("x-amz-content-sha256"),
            "authorization_count": len(self.headers.get_all("authorization") or []),
            "signed_headers": self.signed,
            "header_names": sorted({k.lower() for k in self.headers.keys()}),
        }

    def verify(self, cfg, body_sha):
        self.access_key = None
        self.signed = None
        auths = self.headers.get_all("authorization") or []
        if len(auths) != 1:
            return f"expected one Authorization header, got {len(auths)}"
        m = AUTH_RE.match(auths[0])
        if not m:
            return "malformed Authorization header"
        self.access_key = m["ak"]
        self.signed = m["signed"].split(";")
        if m["region"] != cfg.region or m["service"] != cfg.service:
            return f"scope {m['region']}/{m['service']} is not {cfg.region}/{cfg.service}"
        for required in ("host", "x-amz-date", "x-amz-content-sha256"):
            if required not in self.signed:
                return f"{required} is not signed"
        amz_date = self.headers.get("x-amz-date", "")
        if not amz_date.startswith(m["date"]):
            return "x-amz-date does not match the credential scope date"
        key = self.server.keys.lookup(m["ak"])
        if key is None:
            return f"unknown access key {m['ak']}"
        secret, token = key
        sent_token = self.headers.get("x-amz-security-token")
        if token and sent_token != token:
            return "x-amz-security-token does not match the credentials"
        if token and "x-amz-security-token" not in self.signed:
            return "x-amz-security-token is not signed"
        payload = self.headers.get("x-amz-content-sha256")
        if payload != "UNSIGNED-PAYLOAD" and payload != body_sha:
            return "x-amz-content-sha256 does not match the body"
        sig, canonical = expected_signature(
            self.command, self.path, self.headers, self.signed, secret, token,
            cfg.region, cfg.service, amz_date,
        )
        if not hmac.compare_digest(sig, m["sig"]):
            return "signature mismatch; canonical request was: " + canonical.replace("\n", "\\n")
        return None

    def reply(self, status, obj):
        if self.server.cfg.log_requests:
            self.log_request_line(status, obj.get("error"))
        data = (json.dumps(obj) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request_line(self, status, reason):
        headers = [[k.lower(), redact(k, v)] for k, v in self.headers.items()]
        access_key = getattr(self, "access_key", None)
        role = moto_role(access_key) if access_key and self.server.keys.moto else None
        line = {
            "status": status,
            "reason": reason,
            "method": self.command,
            "http_version": self.request_version,
            "path": self.path,
            "peer": self.client_address[0],
            "access_key": access_key,
            "role_arn": role.role_arn if role else None,
            "session_name": role.session_name if role else None,
            "headers": headers,
        }
        emit("REQUEST " + json.dumps(line))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = handle_any


H2_PREFACE_LINE = b"PRI * HTTP/2.0\r\n"


class H2Stream:
    """One HTTP/2 request, shaped like a Handler for verify/echo/logging."""

    request_version = "HTTP/2"
    verify = Handler.verify
    echo = Handler.echo
    log_request_line = Handler.log_request_line

    def __init__(self, server, headers):
        self.server = server
        self.headers = Message()
        pseudo = {}
        for name, value in headers:
            if name.startswith(":"):
                pseudo[name] = value
            else:
                self.headers[name] = value
        self.command = pseudo.get(":method", "")
        self.path = pseudo.get(":path", "")
        # SigV4 signs the authority as "host" whichever way it travelled.
        if "host" not in self.headers and ":authority" in pseudo:
            self.headers["host"] = pseudo[":authority"]
        self.digest = hashlib.sha256()
        self.length = 0
        self.trailers = []

    def answer(self):
        """(status, JSON object), as Handler.handle_any decides them."""
        body_sha = self.digest.hexdigest()
        reason = self.verify(self.server.cfg, body_sha)
        if reason:
            return 403, {"type": "AccessDeniedException", "error": reason}
        return 200, self.echo(self.length, body_sha, self.trailers)


def serve_h2(handler, preface_line):
    """Serves one h2c connection; each request is verified like an HTTP/1.1
    one and answered with the same JSON, plus a `grpc-status: 0` trailer
    when the request said `te: trailers`."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import (
        ConnectionTerminated,
        DataReceived,
        RequestReceived,
        StreamEnded,
        StreamReset,
        TrailersReceived,
    )

    conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    streams = {}
    data = preface_line
    while data:
        for event in conn.receive_data(data):
            if isinstance(event, RequestReceived):
                streams[event.stream_id] = H2Stream(handler.server, event.headers)
                streams[event.stream_id].client_address = handler.client_address
            elif isinstance(event, DataReceived):
                stream = streams[event.stream_id]
                stream.digest.update(event.data)
                stream.length += len(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, TrailersReceived):
                streams[event.stream_id].trailers += [n.lower() for n, _ in event.headers]
            elif isinstance(event, StreamEnded):
                h2_reply(conn, event.stream_id, streams.pop(event.stream_id))
            elif isinstance(event, StreamReset):
                streams.pop(event.stream_id, None)
            elif isinstance(event, ConnectionTerminated):
                handler.wfile.write(conn.data_to_send())
                return
        handler.wfile.write(conn.data_to_send())
        handler.wfile.flush()
        data = handler.rfile.read1(CHUNK)


def h2_reply(conn, stream_id, stream):
    status, obj = stream.answer()
    if stream.server.cfg.log_requests:
        stream.log_request_line(status, obj.get("error"))
    data = (json.dumps(obj) + "\n").encode()
    if stream.command == "HEAD":
        data = b""
    trailers = stream.headers.get("te") == "trailers"
    conn.send_headers(
        stream_id,
        [
            (":status", str(status)),
            ("content-type", "application/json"),
            ("server", "sigv4-verifier"),
        ],
    )
    step = conn.max_outbound_frame_size
    for i in range(0, len(data), step):
        conn.send_data(stream_id, data[i : i + step])
    if trailers:
        conn.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
    else:
        conn.end_stream(stream_id)


def redact(name, value):
    """Header value safe to print: no signature, no token."""
    name = name.lower()
    if name == "authorization":
        head, found, _ = value.partition("Signature=")
        return head + "Signature=<redacted>" if found else "<redacted>"
    if name == "x-amz-security-token":
        return "<redacted>"
    return value


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # As a real service's: a burst of new connections (a proxy's pool
    # refilled at once) must not overflow the accept queue (5 by default),
    # whose dropped handshakes cost the client a 1 s SYN retransmission.
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        # A client gone mid-request (a proxy killed under load) is not the
        # service's error: no traceback.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)

    def server_bind(self):
        # Skips HTTPServer's getfqdn(): no reverse DNS lookup of the address.
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.server_address[0]
        self.server_port = self.server_address[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log-requests", action="store_true")
    p.add_argument("--region", required=True)
    p.add_argument("--service", default="vpc-lattice-svcs")
    p.add_argument("--access-key")
    p.add_argument("--secret-key")
    p.add_argument("--token")
    p.add_argument("--keys-file")
    p.add_argument("--moto-sts-port", type=int)
    p.add_argument("--container-creds-port", type=int)
    p.add_argument("--container-creds-host", default="127.0.0.1")
    p.add_argument("--container-creds-token", action="append")
    p.add_argument("--container-creds-lifetime", type=float, default=3600)
    p.add_argument("--container-creds-fail-while")
    args = p.parse_args()

    if args.moto_sts_port is not None:
        from moto.server import ThreadedMotoServer

        ThreadedMotoServer(ip_address="127.0.0.1", port=args.moto_sts_port, verbose=False).start()

    keys = Keys(args)
    if args.container_creds_port is not None:
        keys.container = ContainerCreds(args)
        creds_server = Server((args.container_creds_host, args.container_creds_port), ContainerCredsHandler)
        creds_server.creds = keys.container
        threading.Thread(target=creds_server.serve_forever, daemon=True).start()

    if ":" in args.host:
        Server.address_family = socket.AF_INET6
    server = Server((args.host, args.port), Handler)
    server.cfg = args
    server.keys = keys
    print(f"LISTENING {server.server_address[1]}", flush=True)
    # Exit when the parent closes our stdin (no orphans if it dies).
    threading.Thread(target=lambda: (sys.stdin.read(), server.shutdown()), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
