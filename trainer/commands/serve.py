"""Command: the HTTP recommendation service over an export and a catalogue (FastAPI + uvicorn, loopback by default).

    python -m transrec.trainer.commands.serve --export DIR --shards DIR [--index DIR] [--host 127.0.0.1] [--port 8000]
        [--api-key KEY | env TRANSREC_API_KEY] [--max-body-bytes 8388608] [--no-batching]
        [--items-journal FILE [--items-journal-set-aside]] [--scoring export|model|mean|popularity] [--prior-beta X]

    POST /recommend {"history": ["raw id", ...], "k": 10, "exclude_seen": true} -> {"items": [...], "scores": [...],
                                                                                    "ignored": [...], "note": ""}
    POST /items     {"id": "new id", "text": "...", "image_base64": "<JPEG>"} -> {"id": ..., "tower": ..., "items": N,
                                                                                 "persisted": bool, "note": "..."}
                    {"id": "new id", "content": {"<modality>": value}}  (a registered modality's content)
    GET  /health    -> {"status": "ok", "model_usable": true, "items": N, "scoring": "...", ...}  (503: model unusable)

Items are scored as the export's scoring.json says (absent: the model's user vector), or as --scoring and
--prior-beta say (trainer/commands/export_args.py); an --index's approximate search serves only the model's user vector
without a prior (otherwise: exact search).

Bad requests get a 4xx whose "detail" names the problem and never echoes more than a short prefix of the request:
400 a body that is not JSON, 401 POST /items without the API key (when the service has one), 404 no known item in
the history, 409 an id already present (of concurrent requests with one id exactly one is added), 413 a body over
--max-body-bytes (refused before it is read), 422 a field of the wrong JSON type (types are strict: "3" is not an
integer), an unknown field, k out of range, content missing, an undecodable image or one over 40 megapixels, or
content that does not fit its tower. A model giving NaN or infinite vectors or scores gets 500 with a JSON
"detail" (and /health 503). The service keeps running. The model runs in eval mode without gradients; concurrent
/recommend requests arriving within 2 ms share one model pass (`--no-batching`: one pass each), and items added by
POST /items are recommendable at once (cold start, no retraining). Added items are kept across restarts only with
--items-journal FILE (each accepted item written and fsynced there before its 200, replayed at start); without it
they are lost when the service stops. A damaged journal line stops the start, naming it (nothing is changed);
--items-journal-set-aside moves damaged lines to FILE.damaged instead. At start the lines of items the catalogue
already holds are moved to FILE.archived (serving/journal.py). docs/recommend.md ("Security") says what is exposed
and what is not protected.
"""

from __future__ import annotations

import os
import sys

from transrec.trainer.commands.export_args import add_scoring_args, check_scoring_args, export_cli
from transrec.trainer.serving.app import ServiceOptions, bind_socket, open_service, serve_forever
from transrec.trainer.serving.limits import (
    API_KEY_ENV,
    DEFAULT_MAX_BODY_BYTES,
    MIN_MAX_BODY_BYTES,
    bounded,
    is_loopback,
)


# -- the command -----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> ServiceOptions:
    """The command's settings, checked: SystemExit with one line `error: ...` naming a bad one."""
    p = export_cli("python -m transrec.trainer.commands.serve", __doc__)
    p.add_argument("--index", default=None,
                   help="an item index from `python -m transrec.trainer.commands.index` (skips encoding)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", default="8000", help="TCP port, 1 to 65535 (default 8000)")
    p.add_argument("--api-key", default=None,
                   help=f"key POST /items requires (Authorization: Bearer KEY or X-API-Key: KEY); default: the "
                        f"environment variable {API_KEY_ENV}, which keeps the key out of process listings; "
                        "neither: POST /items is open")
    p.add_argument("--max-body-bytes", default=str(DEFAULT_MAX_BODY_BYTES),
                   help=f"largest request body accepted, in bytes (default {DEFAULT_MAX_BODY_BYTES} = 8 MiB); larger: "
                        "413")
    p.add_argument("--items-journal", default=None,
                   help="file that keeps items added by POST /items across restarts (appended and fsynced before "
                        "each 200, replayed at start); default: none, added items are lost when the service stops")
    p.add_argument("--items-journal-set-aside", action="store_true",
                   help="start although lines of the items journal are damaged: they are moved, byte for byte, to "
                        "FILE.damaged (default: the service does not start and names the line)")
    p.add_argument("--no-batching", action="store_true", help="one model pass per request")
    add_scoring_args(p)
    a = p.parse_args(argv)
    check_scoring_args(p, a)
    if not (a.port.isdigit() and 1 <= int(a.port) <= 65535):
        raise SystemExit(f"error: --port must be a whole number from 1 to 65535, got {bounded(a.port, 40)!r}")
    a.port = int(a.port)
    if not (a.max_body_bytes.isdigit() and int(a.max_body_bytes) >= MIN_MAX_BODY_BYTES):
        raise SystemExit(f"error: --max-body-bytes must be at least {MIN_MAX_BODY_BYTES} (bytes), got "
                         f"{bounded(a.max_body_bytes, 40)!r}")
    a.max_body_bytes = int(a.max_body_bytes)
    source = "--api-key"
    if a.api_key is None and API_KEY_ENV in os.environ:
        a.api_key, source = os.environ[API_KEY_ENV], API_KEY_ENV
    if a.items_journal_set_aside and not a.items_journal:
        raise SystemExit("error: --items-journal-set-aside applies to the items journal: give --items-journal FILE")
    if a.api_key is not None:
        if not a.api_key:
            raise SystemExit(f"error: {source} is empty: give a key (e.g. python -c 'import secrets; "
                             f"print(secrets.token_urlsafe(32))'), or unset it to leave POST /items open")
        if not (a.api_key.isascii() and a.api_key.isprintable() and " " not in a.api_key):
            raise SystemExit(f"error: {source} must be printable ASCII without spaces (it travels in an HTTP header)")
    return ServiceOptions(a.export, a.shards, a.device, a.index, a.host, a.port, a.api_key, a.max_body_bytes,
                          a.items_journal, a.items_journal_set_aside, not a.no_batching, a.scoring, a.prior_beta)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    sock = bind_socket(a.host, a.port)
    service = None
    try:
        service = open_service(a)
        url = f"http://{'[' + a.host + ']' if ':' in a.host else a.host}:{a.port}"
        for line in [f"serving {service.lines[0]} on {url}", *service.lines[1:]]:
            print(line, file=sys.stderr)
        if not is_loopback(a.host):
            print(f"warning: {a.host}:{a.port} is reachable from other machines without an API key: POST /items is "
                  f"open to anyone who can reach the port; set {API_KEY_ENV} (or --api-key), or serve on 127.0.0.1 "
                  "behind a reverse proxy" if not a.api_key else
                  f"note: {a.host}:{a.port} is reachable from other machines over plain HTTP (no TLS): the API key "
                  "travels unencrypted; put a TLS reverse proxy in front", file=sys.stderr)
        serve_forever(service.app, sock, log_level="info")
    finally:
        sock.close()
        if service is not None:
            service.close()


if __name__ == "__main__":
    main()
