"""HTTP recommendation service over an export and a catalogue (FastAPI + uvicorn, loopback by default).

    python -m transrec.trainer.serve --export DIR --shards DIR [--index DIR] [--host 127.0.0.1] [--port 8000]

    POST /recommend {"history": ["raw id", ...], "k": 10, "exclude_seen": true} -> {"items": [...], "scores": [...],
                                                                                    "ignored": [...], "note": ""}
    POST /items     {"id": "new id", "text": "...", "image_base64": "<JPEG>"} -> {"id": ..., "tower": ..., "items": N}
                    {"id": "new id", "content": {"<modality>": value}}  (a registered modality's content)
    GET  /health    -> {"status": "ok", "items": N, ...}

Bad requests get a 4xx whose "detail" names the problem (400 malformed JSON or fields, 404 no known item in the
history, 409 an id already present, 422 a k out of range, content missing, an undecodable image, or content that
does not fit its tower); the service
keeps running. The model runs in eval mode without gradients; concurrent /recommend requests arriving within 2 ms
share one model pass (`--no-batching`: one pass each), and items added by POST /items are recommendable at once
(cold start, no retraining).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from transrec.trainer.model_eval import export_cli
from transrec.trainer.recommend import MicroBatcher, Recommender, UnknownItems

MAX_K = 1000
MAX_HISTORY = 10_000


class RecommendRequest(BaseModel):
    history: list[str] = Field(default_factory=list, max_length=MAX_HISTORY)
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True


class ItemRequest(BaseModel):
    id: str = Field(min_length=1, max_length=512)
    text: str | None = Field(None, max_length=100_000)
    image_base64: str | None = Field(None, max_length=20_000_000)
    content: dict[str, Any] | None = None  # {modality: value}: a registered modality other than text and image


def create_app(rec: Recommender, info: dict | None = None, batching: bool = True) -> FastAPI:
    """The service; with `batching`, concurrent /recommend requests share model passes (trainer/recommend.py)."""
    if batching and rec.batcher is None:
        rec.batcher = MicroBatcher(rec)
    app = FastAPI(title="TransRec recommendations", version="1")

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {e.get('msg', 'invalid')}")
        k_range = any(e.get("loc", ())[-1:] == ("k",) for e in exc.errors())
        return JSONResponse(status_code=422 if k_range else 400, content={"detail": "; ".join(problems)})

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "items": len(rec.item_ids), **(info or {})}

    @app.post("/recommend")
    def recommend(req: RecommendRequest) -> dict:
        try:
            return rec.recommend(req.history, req.k, req.exclude_seen)
        except UnknownItems as e:
            raise HTTPException(404, str(e)) from None
        except ValueError as e:
            raise HTTPException(422, str(e)) from None

    @app.post("/items")
    def add_item(req: ItemRequest) -> dict:
        image = None
        if req.image_base64:
            try:
                image = base64.b64decode(req.image_base64, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPException(422, "image_base64 is not valid base64 (send the JPEG file's bytes, "
                                         "base64-encoded)") from None
        if req.id in rec.index:
            raise HTTPException(409, f"item {req.id!r} is already in the catalogue")
        try:
            tower = rec.add_item(req.id, req.text, image, req.content)
        except ValueError as e:  # no content, an undecodable image (CorruptImageError), an id added meanwhile
            status = 409 if "already in the catalogue" in str(e) else 422
            raise HTTPException(status, str(e)) from None
        return {"id": req.id, "tower": tower, "items": len(rec.item_ids)}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = export_cli("python -m transrec.trainer.serve", __doc__)
    p.add_argument("--index", default=None,
                   help="an item index from `python -m transrec.trainer.index` (skips encoding)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-batching", action="store_true", help="one model pass per request")
    a = p.parse_args(argv)
    try:
        if a.index:
            from transrec.trainer.index import recommender_from_index

            rec = recommender_from_index(Path(a.index), Path(a.export), Path(a.shards), a.device)
        else:
            rec = Recommender.from_export(a.export, a.shards, a.device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    info = {"export": str(a.export), "shards": str(a.shards), "index": a.index}
    uvicorn.run(create_app(rec, info, batching=not a.no_batching), host=a.host, port=a.port, log_level="info")


if __name__ == "__main__":
    main()
