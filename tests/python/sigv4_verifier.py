#!/usr/bin/env python3
"""Independent SigV4 verifier for lattice's proxy tests (loopback only).

An HTTP/1.1 server that recomputes each request's signature with botocore's
SigV4Auth and answers:
  200 + JSON echo (method, path, body length, body SHA-256, ...) on success,
  403 + a one-line reason on any mismatch.

Bodies are read in bounded chunks (Content-Length or chunked, trailers too)
and hashed as they stream; nothing is held whole.

Credentials it accepts, any combination:
  --access-key/--secret-key[/--token]   one fixed key
  --keys-file FILE     JSON {"AKID": {"secret": "...", "token": "..."}},
                       re-read on every request (keys issued during a test)
  --moto-sts-port N    runs moto's server in this process on 127.0.0.1:N and
                       accepts the credentials its STS issued (looked up in
                       moto's STS backend, the way AWS looks up a key)

Prints "LISTENING <port>" on stdout once serving (--port 0 picks one).
"""

import argparse
import hashlib
import hmac
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

CHUNK = 64 * 1024
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
        if self.moto:
            found = moto_lookup(access_key)
            if found:
                return found
        return None


def moto_lookup(access_key):
    """Secret and token of credentials moto's STS handed out."""
    from moto.sts.models import sts_backends

    for account_backends in sts_backends.values():
        for backend in account_backends.values():
            for role in getattr(backend, "assumed_roles", []):
                if role.access_key_id == access_key:
                    return (role.secret_access_key, role.session_token)
    return None


class BodyError(Exception):
    pass


def read_body(rfile, headers):
    """Streams the request body; returns (length, sha256 hex, trailer names)."""
    digest = hashlib.sha256()
    length = 0
    trailers = []
    te = headers.get("Transfer-Encoding", "")
    if "chunked" in te.lower():
        while True:
            line = rfile.readline(1024)
            if not line:
                raise BodyError("chunked body ended early")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            left = size
            while left:
                data = rfile.read(min(CHUNK, left))
                if not data:
                    raise BodyError("chunk ended early")
                digest.update(data)
                length += len(data)
                left -= len(data)
            if rfile.readline(16).strip():
                raise BodyError("missing CRLF after chunk")
        while True:
            line = rfile.readline(8192)
            if not line or not line.strip():
                break
            trailers.append(line.split(b":", 1)[0].decode().strip().lower())
    else:
        left = int(headers.get("Content-Length", "0") or 0)
        while left:
            data = rfile.read(min(CHUNK, left))
            if not data:
                raise BodyError("body ended early")
            digest.update(data)
            length += len(data)
            left -= len(data)
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
    server_version = "sigv4-verifier"

    def log_message(self, fmt, *args):  # quiet
        pass

    def handle_any(self):
        cfg = self.server.cfg
        try:
            length, body_sha, trailers = read_body(self.rfile, self.headers)
        except (BodyError, ValueError) as e:
            return self.reply(400, {"error": f"body: {e}"})
        reason = self.verify(cfg, body_sha)
        if reason:
            return self.reply(403, {"error": reason})
        path, _, query = self.path.partition("?")
        echo = {
            "method": self.command,
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
        self.reply(200, echo)

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
        data = (json.dumps(obj) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = handle_any


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--region", required=True)
    p.add_argument("--service", default="vpc-lattice-svcs")
    p.add_argument("--access-key")
    p.add_argument("--secret-key")
    p.add_argument("--token")
    p.add_argument("--keys-file")
    p.add_argument("--moto-sts-port", type=int)
    args = p.parse_args()

    if args.moto_sts_port is not None:
        from moto.server import ThreadedMotoServer

        ThreadedMotoServer(ip_address="127.0.0.1", port=args.moto_sts_port, verbose=False).start()

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.cfg = args
    server.keys = Keys(args)
    print(f"LISTENING {server.server_address[1]}", flush=True)
    # Exit when the parent closes our stdin (no orphans if it dies).
    threading.Thread(target=lambda: (sys.stdin.read(), server.shutdown()), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
