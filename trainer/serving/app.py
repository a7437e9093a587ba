"""The HTTP recommendation service's app (FastAPI), over a Recommender: request models, error answers, the
start-up (`open_service`: the export and catalogue loaded, the items journal replayed) and the listening socket.
The command that runs it, its endpoints and its answers are described in trainer/commands/serve.py.
"""

from __future__ import annotations

import base64
import binascii
import errno
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from transrec.data_shards.integrity import IntegrityError
from transrec.trainer.evaluation.ranking import NonFiniteScores
from transrec.trainer.evaluation.scoring import read_scoring, resolve_scoring
from transrec.trainer.serving.item_index import recommender_from_index
from transrec.trainer.serving.journal import ARCHIVED, DAMAGED, ItemJournal, JournalError
from transrec.trainer.serving.limits import (
    API_KEY_ENV,
    DEFAULT_MAX_BODY_BYTES,
    RequestGuard,
    bounded,
    check_image_pixels,
)
from transrec.trainer.serving.recommender import PLAIN, DuplicateItem, MicroBatcher, Recommender, UnknownItems

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
    """The service; with `batching`, concurrent /recommend requests share model passes (trainer/commands/recommend.py).
    `info`: extra /health fields (names, never paths); `api_key`: required by POST /items; `journal`: where added
    items are kept across restarts."""
    if batching and rec.batcher is None:
        rec.batcher = MicroBatcher(rec)
    app = FastAPI(title="TransRec recommendations", version="1")
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, api_key=api_key, protected=("/items",))
    kept = ("written to the service's items journal: restored when the service restarts" if journal else
            "kept in memory only: lost when the service restarts (start it with --items-journal FILE to keep added "
            "items)")

    add_error_handlers(app)

    @app.get("/health")
    def health() -> JSONResponse:
        reason = rec.unusable or rec.check_model()  # checked again: item vectors and the user encoder, now
        usable = reason is None
        body: dict[str, Any] = {
            "status": "ok" if usable else "unusable", "model_usable": usable, "items": len(rec.item_ids),
            "items_added": len(rec.item_ids) - rec.loaded_items, "nonfinite_requests": rec.nonfinite_requests,
            "writes_need_api_key": bool(api_key), "added_items_persist": journal is not None,
            "max_body_bytes": max_body_bytes, "scoring": rec.scoring.label, **(info or {})}
        if not usable:
            body["reason"] = reason
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


def add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON with one `detail` line: 400 for a body that is not JSON, 422 naming the bad fields, the
    HTTP errors the handlers raise, and 500 for anything else (the service goes on)."""

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


@dataclass(frozen=True)
class ServiceOptions:
    """A service's settings, checked (the serve command's flags: trainer/commands/serve.py)."""

    export: str
    shards: str
    device: str = "cpu"
    index: str | None = None  # an item index (serving.item_index) to serve from instead of encoding the catalogue
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: POST /items is open
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    items_journal: str | None = None  # None: items added over HTTP are kept in memory only
    journal_set_aside: bool = False  # damaged journal lines are moved to FILE.damaged instead of stopping the start
    batching: bool = True
    scoring: str = "export"  # scoring.SCORING_CHOICES
    prior_beta: float | None = None  # None: the export's (scoring.requested_scoring)


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


def open_service(a: ServiceOptions, show_progress: bool = True) -> Service:
    """The Recommender of `a`'s export and catalogue, the journal's items replayed, and the app; SystemExit with one
    line `error: ...` when any of it cannot be loaded."""
    try:  # opened and locked first: a journal in use by another service stops the start before the model loads
        journal = ItemJournal(Path(a.items_journal), a.journal_set_aside) if a.items_journal else None
    except JournalError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        if a.index:
            rec = recommender_from_index(Path(a.index), Path(a.export), Path(a.shards), a.device)
        else:
            rec = Recommender.from_export(a.export, a.shards, a.device, show_progress=show_progress)
        # the export is verified by now (its scoring.json among its files); the options override it
        rec.scoring = resolve_scoring(a.scoring, a.prior_beta, read_scoring(Path(a.export)))
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
    app = create_app(rec, info, batching=a.batching, api_key=a.api_key, max_body_bytes=a.max_body_bytes,
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
    """Add the journal's items in order, then compact it; returns how many were added. A damaged line, or an entry
    that is not an item: JournalError naming the file and line, nothing changed (moved to FILE.damaged with
    set_aside). An entry the model cannot encode: JournalError. Entries whose ids the catalogue already holds (the
    shards rebuilt with them) are not added again: their lines are moved to FILE.archived."""
    restored, present, aside = 0, [], []
    for number, entry in journal.entries():
        where = f"{journal.path} line {number}"
        try:
            req = ItemRequest.model_validate(entry)
        except ValidationError as e:
            if journal.set_aside:
                aside.append(number)
                continue
            raise journal.damage(number, f"is not an item ({_problem(e.errors()[0], '/items')})") from None
        try:
            add_from_request(rec, req)
        except DuplicateItem:
            present.append(number)
            continue
        except ValueError as e:  # NonFiniteScores, content the model cannot encode
            raise JournalError(f"{where}: {bounded(e, 300)}; start with the export the journal was written for, or "
                               "remove that line") from None
        restored += 1
    try:
        moved = journal.compact(archive=present, aside=aside)
    except OSError as e:
        raise JournalError(f"{journal.path} could not be compacted ({e.strerror or e}): no line was lost; free disk "
                           "space or fix the folder's permissions, then start again") from None
    name = journal.path.name
    if moved.get(DAMAGED):
        print(f"warning: {moved[DAMAGED]} damaged lines of {journal.path} moved to {name}{DAMAGED} (byte for byte; "
              "repair them and append them to the journal to restore their items)", file=sys.stderr)
    if moved.get(ARCHIVED):
        print(f"warning: {moved[ARCHIVED]} items of {journal.path} are already in the catalogue (shards rebuilt with "
              f"them?): not added again; their lines moved to {name}{ARCHIVED} (append them to the journal to "
              "restore them with another catalogue)", file=sys.stderr)
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

    host, port = sock.getsockname()[:2]
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run(sockets=[sock])
