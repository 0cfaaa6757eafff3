#!/usr/bin/env python3
"""The botocore verifier's signature check, for many requests at once.

Reads a JSON list of requests on stdin, each as the service receives it:
  {"method", "target" (path and query as forwarded), "headers": [[name, value], ...],
   "signed": [header names], "secret", "token" (or null), "region", "service"}
and prints a JSON list, one entry per request, of what sigv4_verifier.py
computes for it (the same function): {"canonical_request", "signature"}.
The SigV4 signature is botocore's; for SigV4A the caller verifies its
ECDSA signature over the string to sign of this canonical request.

One process for a whole property test: importing botocore costs more than
checking hundreds of requests.
"""

import json
import sys
from email.message import Message

from sigv4_verifier import expected_signature


def main():
    out = []
    for case in json.load(sys.stdin):
        headers = Message()
        for name, value in case["headers"]:
            headers[name] = value
        signature, canonical = expected_signature(
            case["method"], case["target"], headers, case["signed"], case["secret"],
            case["token"], case["region"], case["service"], headers.get("x-amz-date"),
        )
        out.append({"canonical_request": canonical, "signature": signature})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
