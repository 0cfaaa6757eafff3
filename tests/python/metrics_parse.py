"""Parses a /metrics page with the official Prometheus client's parser.

Usage: metrics_parse.py openmetrics|prometheus < page

Reads the exposition on stdin and parses it with prometheus_client's
OpenMetrics parser (what the agent serves, by its Content-Type) or its
Prometheus text-format parser. Prints one JSON object:
{"families": [{"name", "type", "samples": [{"name", "labels", "value"}]}]}.
A page the parser rejects exits 1 with the parser's error on stderr: that is
what a scrape by Prometheus would drop.
"""

import json
import sys


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("openmetrics", "prometheus"):
        sys.exit(__doc__)
    text = sys.stdin.read()
    if sys.argv[1] == "openmetrics":
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
    else:
        from prometheus_client.parser import text_string_to_metric_families
    try:
        families = [
            {
                "name": f.name,
                "type": f.type,
                "samples": [
                    {"name": s.name, "labels": dict(s.labels), "value": s.value}
                    for s in f.samples
                ],
            }
            for f in text_string_to_metric_families(text)
        ]
    except Exception as e:  # the parser raises ValueError and others
        print(f"rejected: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    json.dump({"families": families}, sys.stdout)


if __name__ == "__main__":
    main()
