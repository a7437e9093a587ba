"""HTTP recommendation service over an export and a catalogue (FastAPI + uvicorn, loopback by default).

    python -m transrec.trainer.serve --export DIR --shards DIR [--index DIR] [--host 127.0.0.1] [--port 8000]
        [--api-key KEY | env TRANSREC_API_KEY] [--max-body-bytes 8388608] [--items-journal FILE] [--no-batching]
        [--scoring export|model|mean|popularity] [--prior-beta X]

    POST /recommend {"history": ["raw id", ...], "k": 10, "exclude_seen": true} -> {"items": [...], "scores": [...],
                                                                                    "ignored": [...], "note": ""}
    POST /items     {"id": "new id", "text": "...", "image_base64": "<JPEG>"} -> {"id": ..., "tower": ..., "items": N,
                                                                                 "persisted": bool, "note": "..."}
                    {"id": "new id", "content": {"<modality>": value}}  (a registered modality's content)
    GET  /health    -> {"status": "ok", "model_usable": true, "items": N, "scoring": "...", ...}  (503: model unusable)

Items are scored as the export's scoring.json says (absent: the model's user vector), or as --scoring and
--prior-beta say (trainer/recommend_scoring.py); an --index's approximate search serves only the model's user vector
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
they are lost when the service stops. docs/recommend.md ("Security") says what is exposed and what is not protected.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import errno
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from transrec.data_shards.integrity import IntegrityError
from transrec.trainer.evaluate import NonFiniteScores
from transrec.trainer.model_eval import export_cli
from transrec.trainer.recommend import PLAIN, DuplicateItem, MicroBatcher, Recommender, UnknownItems
from transrec.trainer.recommend_scoring import add_scoring_args, check_scoring_args, scoring_from_args
from transrec.trainer.scoring import read_scoring
from transrec.trainer.serve_limits import (
    API_KEY_ENV,
    DEFAULT_MAX_BODY_BYTES,
    MIN_MAX_BODY_BYTES,
    ItemJournal,
    JournalError,
    RequestGuard,
    bounded,
    check_image_pixels,
    is_loopback,
)

MAX_K = 1000
MAX_HISTORY = 10_000
MAX_PROBLEMS = 5  # validation problems listed in a 422's detail; the rest are counted


class RecommendRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    history: list[str] = Field(default_factory=list, max_length=MAX_HISTORY)
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True


class ItemRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    id: str = Field(min_length=1, max_length=512)
    text: str | None = Field(None, max_length=100_000)
    image_base64: str | None = Field(None, max_length=20_000_000)
    content: dict[str, Any] | None = None  # {modality: value}: a registered modality other than text and image


FIELDS = {"/recommend": RecommendRequest, "/items": ItemRequest}


def add_from_request(rec: Recommender, req: ItemRequest, journal: ItemJournal | None = None) -> str:
    """Add `req`'s item to `rec` (its tower returned); with `journal`, the request is written there first."""
    image = None
    if req.image_base64:
        try:
            image = base64.b64decode(req.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image_base64 is not valid base64 (send the JPEG file's bytes, base64-encoded)") from None
        check_image_pixels(image)
    entry = req.model_dump(exclude_none=True)
    return rec.add_item(req.id, req.text, image, req.content,
                        before_insert=None if journal is None else lambda: journal.append(entry))


# What a request's error answers, the first class that matches (the first three are ValueErrors themselves).
ERROR_STATUS = ((UnknownItems, 404), (DuplicateItem, 409), (NonFiniteScores, 500), (JournalError, 503),
                (ValueError, 422))


def as_http_error(e: Exception) -> HTTPException:
    """The HTTP error of an exception the Recommender or the journal raised (ERROR_STATUS), its message the detail."""
    status = next(code for cls, code in ERROR_STATUS if isinstance(e, cls))
    return HTTPException(status, str(e))


def _problem(e: dict, path: str) -> str:
    """One validation error as `field: what is wrong`, without the input."""
    where = ".".join(bounded(p, 40) for p in e.get("loc", ()) if p != "body") or "body"
    if e.get("type") == "extra_forbidden":
        model = FIELDS.get(path)
        accepted = f" (accepted: {', '.join(model.model_fields)})" if model else ""
        return f"{where}: unknown field{accepted}"
    return f"{where}: {bounded(e.get('msg', 'invalid'), 160)}"


def create_app(rec: Recommender, info: dict | None = None, batching: bool = True, *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, journal: ItemJournal | None = None) -> FastAPI:
    """The service; with `batching`, concurrent /recommend requests share model passes (trainer/recommend.py).
    `info`: extra /health fields (names, never paths); `api_key`: required by POST /items; `journal`: where added
    items are kept across restarts."""
    if batching and rec.batcher is None:
        rec.batcher = MicroBatcher(rec)
    app = FastAPI(title="TransRec recommendations", version="1")
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, api_key=api_key, protected=("/items",))
    kept = ("written to the service's items journal: restored when the service restarts" if journal else
            "kept in memory only: lost when the service restarts (start it with --items-journal FILE to keep added "
            "items)")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            why = bounded((bad_json.get("ctx") or {}).get("error", ""), 120)
            return JSONResponse(status_code=400, content={"detail": f"the body is not valid JSON ({why}): send a JSON "
                                                          "object with content-type: application/json"})
        problems = [_problem(e, request.url.path) for e in errors[:MAX_PROBLEMS]]
        more = f"; and {len(errors) - MAX_PROBLEMS} more problems" if len(errors) > MAX_PROBLEMS else ""
        detail = f"{'; '.join(problems)}{more} (the fields and their JSON types: GET /docs)"
        return JSONResponse(status_code=422, content={"detail": bounded(detail)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": bounded(exc.detail)},
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=500, content={"detail": f"internal error ({type(exc).__name__}): the request "
                                                      "was not completed; the service's log has the details"})

    @app.get("/health")
    def health() -> JSONResponse:
        usable = rec.unusable is None
        body: dict[str, Any] = {
            "status": "ok" if usable else "unusable", "model_usable": usable, "items": len(rec.item_ids),
            "items_added": len(rec.item_ids) - rec.loaded_items, "nonfinite_requests": rec.nonfinite_requests,
            "writes_need_api_key": bool(api_key), "added_items_persist": journal is not None,
            "max_body_bytes": max_body_bytes, "scoring": rec.scoring.label, **(info or {})}
        if not usable:
            body["reason"] = rec.unusable
        return JSONResponse(status_code=200 if usable else 503, content=body)

    @app.post("/recommend")
    def recommend(req: RecommendRequest) -> dict:
        try:
            return rec.recommend(req.history, req.k, req.exclude_seen)
        except (ValueError, JournalError) as e:
            raise as_http_error(e) from None

    @app.post("/items")
    def add_item(req: ItemRequest) -> dict:
        try:
            tower = add_from_request(rec, req, journal)
        # 422: no content, an undecodable image (CorruptImageError), content that does not fit; 409, 500, 503
        except (ValueError, JournalError) as e:
            raise as_http_error(e) from None
        return {"id": req.id, "tower": tower, "items": len(rec.item_ids), "persisted": journal is not None,
                "note": kept}

    return app


# -- the command -----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's settings, checked: SystemExit with one line `error: ...` naming a bad one."""
    p = export_cli("python -m transrec.trainer.serve", __doc__)
    p.add_argument("--index", default=None,
                   help="an item index from `python -m transrec.trainer.index` (skips encoding)")
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
    if a.api_key is not None:
        if not a.api_key:
            raise SystemExit(f"error: {source} is empty: give a key (e.g. python -c 'import secrets; "
                             f"print(secrets.token_urlsafe(32))'), or unset it to leave POST /items open")
        if not (a.api_key.isascii() and a.api_key.isprintable() and " " not in a.api_key):
            raise SystemExit(f"error: {source} must be printable ASCII without spaces (it travels in an HTTP header)")
    return a


@dataclass
class Service:
    """A loaded service: the app, its Recommender and journal, and the lines it reports at start."""

    app: FastAPI
    rec: Recommender
    journal: ItemJournal | None
    lines: list[str] = field(default_factory=list)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()


def open_service(a: argparse.Namespace, show_progress: bool = True) -> Service:
    """The Recommender of `a`'s export and catalogue, the journal's items replayed, and the app; SystemExit with one
    line `error: ...` when any of it cannot be loaded."""
    try:  # opened and locked first: a journal in use by another service stops the start before the model loads
        journal = ItemJournal(Path(a.items_journal)) if a.items_journal else None
    except JournalError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        if a.index:
            from transrec.trainer.index import recommender_from_index

            rec = recommender_from_index(Path(a.index), Path(a.export), Path(a.shards), a.device)
        else:
            rec = Recommender.from_export(a.export, a.shards, a.device, show_progress=show_progress)
        # the export is verified by now (its scoring.json among its files); the options override it
        rec.scoring = scoring_from_args(a, read_scoring(Path(a.export)))
        restored = _replay(rec, journal) if journal is not None and not rec.unusable else 0
    except (FileNotFoundError, ValueError, IntegrityError, JournalError) as e:
        if journal is not None:
            journal.close()
        raise SystemExit(f"error: {e}") from None
    lines: list[str] = []
    if journal is not None:
        lines.append(f"items added over HTTP are written to {a.items_journal} and restored at start ({restored} "
                     "restored now)" + (": none, the model is unusable; the journal is kept as it is" if rec.unusable
                                        else ""))
    else:
        lines.append("items added over HTTP are kept in memory only: lost when the service restarts "
                     "(--items-journal FILE keeps them)")
    approximate = rec.ann is not None and rec.scoring == PLAIN
    info = {"catalogue": Path(a.shards).name, "search": "approximate index" if approximate else "exact"}
    app = create_app(rec, info, batching=not a.no_batching, api_key=a.api_key, max_body_bytes=a.max_body_bytes,
                     journal=journal)
    if rec.ann is not None and not approximate:
        lines.append("the index's approximate search serves the model's user vector without a prior only: exact "
                     "search")
    lines[:0] = [f"{len(rec.item_ids)} items of the catalogue {Path(a.shards).name} ({info['search']} search; "
                 f"scoring: {rec.scoring.label})",
                 "POST /items needs the API key (Authorization: Bearer KEY or X-API-Key: KEY)" if a.api_key else
                 f"POST /items is open: no API key (set {API_KEY_ENV} or --api-key to require one)"]
    if rec.unusable:
        lines.append(f"warning: the model is unusable: {rec.unusable}; /recommend answers 500 and /health 503")
    return Service(app, rec, journal, lines)


def _replay(rec: Recommender, journal: ItemJournal) -> int:
    """Add the journal's items in order; returns how many. An entry that cannot be added: JournalError naming the
    file and line. Ids already in the catalogue (e.g. the shards rebuilt with them) are skipped and counted."""
    restored, present = 0, 0
    for number, entry in journal.entries():
        where = f"{journal.path} line {number}"
        try:
            req = ItemRequest.model_validate(entry)
        except ValidationError as e:
            raise JournalError(f"{where} is not an item ({_problem(e.errors()[0], '/items')}): repair or remove that "
                               "line, then start again") from None
        try:
            add_from_request(rec, req)
        except DuplicateItem:
            present += 1
            continue
        except ValueError as e:  # NonFiniteScores, content the model cannot encode
            raise JournalError(f"{where}: {bounded(e, 300)}; start with the export the journal was written for, or "
                               "remove that line") from None
        restored += 1
    if present:
        print(f"warning: {present} items of {journal.path} are already in the catalogue (shards rebuilt with them?): "
              "skipped", file=sys.stderr)
    return restored


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound now (before the model loads): SystemExit with one line when it cannot be."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise SystemExit(f"error: --port {port}: {host}:{port} is already in use (another service?): stop it or "
                             "choose another --port") from None
        raise SystemExit(f"error: --host {host} --port {port} cannot be bound ({e.strerror or e}): give an address "
                         "of this machine (127.0.0.1: this machine only; 0.0.0.0: every interface) and a free port"
                         + (" (ports below 1024 need privileges)" if port < 1024 else "")) from None
    return sock


def serve_forever(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    import uvicorn

    host, port = sock.getsockname()[:2]
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run(sockets=[sock])


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
