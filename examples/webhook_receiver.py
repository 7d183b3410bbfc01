"""An example receiver of safety-monitor's alert webhooks, standard library plus this package.

    WEBHOOK_SECRETS=whsec_... python examples/webhook_receiver.py --port 9000

Configure the service with ``webhooks: [{name: ops, url: "http://HOST:9000/hook", secrets:
["whsec_..."]}]``. Each delivery is verified (signature, timestamp within 5 minutes, body
against the alert contract) and de-duplicated by its ``webhook-id`` (deliveries are at least
once: a retry after a lost answer sends the same alert again). Accepted alerts are printed as
one JSON line each on stdout; a bad delivery gets 401 and a line on stderr. Several secrets,
comma-separated, are accepted while one is being rotated.

A real receiver would hand the alert to its queue and answer 2xx quickly: the service waits
``webhook_timeout_s`` (5 s) for the answer and retries anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from monitor.webhooks import WebhookVerificationError, verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    secrets = [s for s in os.environ.get("WEBHOOK_SECRETS", "").split(",") if s]
    if not secrets:
        sys.exit("set WEBHOOK_SECRETS to the webhook's secret(s), comma-separated")
    seen: set[str] = set()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                alert = verify(body, dict(self.headers.items()), secrets)
            except WebhookVerificationError as exc:
                print(f"refused: {exc}", file=sys.stderr, flush=True)
                self.send_response(401)
                self.end_headers()
                return
            with lock:
                new = alert.alert_id not in seen
                seen.add(alert.alert_id)
            if new:
                print(json.dumps(alert.model_dump(mode="json")), flush=True)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # quiet access log
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"listening on http://{args.host}:{args.port}/hook", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
