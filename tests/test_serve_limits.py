"""The HTTP service against hostile callers: one id posted at once by many clients is added once; bodies over the
limit get 413 before they are read; types are strict and unknown fields rejected; error details are bounded;
/health shows no paths; POST /items takes an API key; the CLI refuses bad ports in one line and warns when it is
reachable from other machines without a key; added items survive a restart through the journal; a model giving
NaN or infinite vectors is reported (500 / 503, batch: one line) instead of answering empty lists.

Every bad request gets a 4xx and the next normal request still succeeds."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from test_serving import PICS, build_export, running

from transrec.trainer.serving.app import create_app
from transrec.trainer.serving.limits import is_loopback
from transrec.trainer.serving.recommender import Recommender

KEY = "test-key-0123456789abcdef"
NORMAL = {"history": ["a", "b"], "k": 2}


def fresh(export: Path, catalogue: Path) -> Recommender:
    return Recommender.from_export(export, catalogue, show_progress=False)


@pytest.fixture(scope="module")
def open_url(export, catalogue):
    """The service with its default settings (no API key, the default body limit) on a loopback port."""
    with running(create_app(fresh(export, catalogue))) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url(export, catalogue):
    """The service with an API key and a 4 KiB body limit."""
    with running(create_app(fresh(export, catalogue), api_key=KEY, max_body_bytes=4096)) as url:
        yield url


def still_serving(url: str) -> None:
    r = httpx.post(f"{url}/recommend", json=NORMAL)
    assert r.status_code == 200 and len(r.json()["items"]) == 2, r.text


# -- 1. one id from many clients at once -----------------------------------------------------------------------
def test_concurrent_posts_of_one_id_add_it_exactly_once(open_url):
    before = httpx.get(f"{open_url}/health").json()["items"]
    barrier = threading.Barrier(30)

    def post(_: int) -> httpx.Response:
        with httpx.Client(timeout=120) as client:
            barrier.wait()
            return client.post(f"{open_url}/items", json={"id": "same-film", "text": "A heist comedy in Rome"})

    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(post, range(30)))
    assert sorted(r.status_code for r in answers) == [200] + [409] * 29
    assert all("'same-film'" in r.json()["detail"] for r in answers if r.status_code == 409)
    after = httpx.get(f"{open_url}/health").json()["items"]
    assert after == before + 1
    items = httpx.post(f"{open_url}/recommend", json={"history": ["same-film"], "k": after,
                                                      "exclude_seen": False}).json()["items"]
    assert items.count("same-film") == 1 and len(items) == len(set(items)) == after


# -- 2. body size ------------------------------------------------------------------------------------------------
def test_default_body_limit_is_8_mib_and_answers_413(export, catalogue):
    client = TestClient(create_app(fresh(export, catalogue)))
    r = client.post("/recommend", json={**NORMAL, "padding": "x" * (8 * 2**20)})
    assert r.status_code == 413, r.text[:300]
    assert "8388608 bytes" in r.json()["detail"] and "--max-body-bytes" in r.json()["detail"]
    assert client.post("/recommend", json=NORMAL).status_code == 200


def test_body_limit_with_and_without_content_length(keyed_url):
    r = httpx.post(f"{keyed_url}/recommend", content=json.dumps({**NORMAL, "pad": "x" * 5000}),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]
    still_serving(keyed_url)

    def chunks():  # no Content-Length: sent chunked, counted as it arrives
        yield b'{"history": ["a"], "k": 2, "pad": "'
        for _ in range(6):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(f"{keyed_url}/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]
    still_serving(keyed_url)
    r = httpx.post(f"{keyed_url}/recommend", json={**NORMAL, "pad": "x" * 3000})  # under the limit: read, judged
    assert r.status_code == 422 and "pad: unknown field" in r.json()["detail"]
    still_serving(keyed_url)


def test_guard_answers_413_before_reading_the_rest_of_the_body():
    from transrec.trainer.serving.limits import RequestGuard

    called = []

    async def app(scope, receive, send):
        called.append(scope["path"])
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def run(headers: list[tuple[bytes, bytes]]) -> tuple[list[dict], int]:
        chunks = [{"type": "http.request", "body": b"x" * 400, "more_body": i < 99} for i in range(100)]
        pulled, sent = 0, []

        async def receive():
            nonlocal pulled
            pulled += 1
            return chunks[pulled - 1]

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/recommend", "headers": headers}
        asyncio.run(RequestGuard(app, max_body_bytes=1000, api_key=None)(scope, receive, send))
        return sent, pulled

    sent, pulled = run([(b"transfer-encoding", b"chunked")])
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413]
    assert pulled == 3  # 1,200 bytes after the third chunk of 400: the other 97 never read
    sent, pulled = run([(b"content-length", b"40000")])
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413]
    assert pulled == 0 and called == ["/recommend"]  # the app was reached once, by the chunked request only
    sent, pulled = run([(b"content-length", b"abc")])
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [400] and pulled == 0


# -- 3. strict types, unknown fields -------------------------------------------------------------------------------
def test_types_are_strict_and_unknown_fields_rejected(open_url):
    cases = [
        ("/recommend", {"history": ["a"], "k": "3"}, "k: "),
        ("/recommend", {"history": ["a"], "k": True}, "k: "),
        ("/recommend", {"history": ["a"], "k": 2.0}, "k: "),
        ("/recommend", {"history": ["a"], "exclude_seen": "no"}, "exclude_seen: "),
        ("/recommend", {"history": ["a"], "exclude_seen": 0}, "exclude_seen: "),
        ("/recommend", {"history": [1]}, "history.0: "),
        ("/recommend", {"history": "a"}, "history: "),
        ("/recommend", {"history": ["a"], "user": "u1"}, "user: unknown field"),
        ("/items", {"id": 7, "text": "x"}, "id: "),
        ("/items", {"id": "typed", "text": ["x"]}, "text: "),
        ("/items", {"id": "priced", "text": "x", "price": 3}, "price: unknown field"),
    ]
    for path, body, needle in cases:
        r = httpx.post(f"{open_url}{path}", json=body)
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert needle in r.json()["detail"], (body, r.json())
        still_serving(open_url)
    for body in ({"id": "typed"}, {"id": "priced"}):  # nothing was added by the rejected requests
        assert httpx.post(f"{open_url}/recommend", json={"history": [body["id"]], "k": 1}).status_code == 404


# -- 4. bounded error details --------------------------------------------------------------------------------------
def test_error_details_never_echo_more_than_a_short_prefix(open_url):
    ids = [f"{i:04d}" + "x" * 10_000 for i in range(300)]  # 3 MB of unknown ids
    r = httpx.post(f"{open_url}/recommend", json={"history": ids, "k": 2})
    assert r.status_code == 404 and len(r.content) < 1024, (r.status_code, len(r.content))
    assert "300 item ids" in r.json()["detail"] and "'0000xxxx" in r.json()["detail"]
    still_serving(open_url)
    r = httpx.post(f"{open_url}/recommend", json={"history": list(range(5000)), "k": 2})
    assert r.status_code == 422 and len(r.content) < 1024 and "4995 more" in r.json()["detail"]
    still_serving(open_url)
    r = httpx.post(f"{open_url}/recommend", json={**NORMAL, "y" * 100_000: 1})
    assert r.status_code == 422 and len(r.content) < 1024 and "unknown field" in r.json()["detail"]
    still_serving(open_url)
    r = httpx.post(f"{open_url}/items", json={"id": "a" + "\x00" * 511, "text": "x"})
    assert r.status_code == 200
    r = httpx.post(f"{open_url}/items", json={"id": "a" + "\x00" * 511, "text": "x"})
    assert r.status_code == 409 and len(r.content) < 1024 and "already in the catalogue" in r.json()["detail"]
    still_serving(open_url)


def test_an_image_declaring_a_huge_picture_is_refused_before_decoding(open_url):
    for (height, width), says in {(6000, 8000): "is 8000 x 6000 pixels",  # 48 MP: this service's limit
                                  (60000, 60000): "declares more than"}.items():  # 3.6 GP: Pillow's own limit
        jpeg = bytearray(PICS[0].read_bytes())
        sof = next(i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] in (0xC0, 0xC2))
        jpeg[sof + 5: sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")  # the header lies: data small
        r = httpx.post(f"{open_url}/items", json={"id": "bomb", "image_base64": base64.b64encode(bytes(jpeg)).decode()})
        detail = r.json()["detail"]
        assert r.status_code == 422 and says in detail and "over the service's limit of 40000000 pixels" in detail
        assert httpx.post(f"{open_url}/recommend", json={"history": ["bomb"], "k": 1}).status_code == 404
        still_serving(open_url)


# -- 5. /health -------------------------------------------------------------------------------------------------------
def test_health_shows_no_paths_and_what_a_user_needs(export, catalogue, tmp_path):
    from transrec.trainer.commands.serve import parse_args
    from transrec.trainer.serving.app import open_service

    svc = open_service(parse_args(["--export", str(export), "--shards", str(catalogue)]), show_progress=False)
    r = TestClient(svc.app).get("/health")
    svc.close()
    body = r.json()
    assert r.status_code == 200
    assert body["model_usable"] is True and body["items"] == 6 and body["items_added"] == 0
    assert body["writes_need_api_key"] is False and body["added_items_persist"] is False
    assert body["catalogue"] == catalogue.name
    assert str(export) not in r.text and str(catalogue) not in r.text
    assert not any("/" in str(v) or "\\" in str(v) for v in body.values()), body


# -- 6. API key, ports, exposure -------------------------------------------------------------------------------------
def test_api_key_guards_post_items_only(keyed_url, monkeypatch):
    import hmac

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    item = {"id": "keyed-1", "text": "A quiet drama"}
    r = httpx.post(f"{keyed_url}/items", json=item)
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    for headers in ({"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(f"{keyed_url}/items", json=item, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        still_serving(keyed_url)
    assert compared  # the key is compared in constant time
    assert httpx.post(f"{keyed_url}/recommend", json={"history": ["keyed-1"], "k": 1}).status_code == 404  # not added
    r = httpx.post(f"{keyed_url}/items", json=item, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["id"] == "keyed-1"
    r = httpx.post(f"{keyed_url}/items", json={"id": "keyed-2", "text": "x"}, headers={"X-API-Key": KEY})
    assert r.status_code == 200
    health = httpx.get(f"{keyed_url}/health")
    assert health.status_code == 200 and health.json()["writes_need_api_key"] is True
    still_serving(keyed_url)


def test_api_key_from_the_environment_and_bad_settings(monkeypatch):
    from transrec.trainer.commands.serve import parse_args

    base = ["--export", "x", "--shards", "y"]
    monkeypatch.setenv("TRANSREC_API_KEY", KEY)
    assert parse_args(base).api_key == KEY
    assert parse_args([*base, "--api-key", "another-key-0123456789"]).api_key == "another-key-0123456789"
    monkeypatch.delenv("TRANSREC_API_KEY")
    assert parse_args(base).api_key is None and parse_args(base).max_body_bytes == 8 * 2**20
    bad = {("--port", "70000"): "error: --port must be a whole number from 1 to 65535, got '70000'",
           ("--port", "0"): "error: --port must be a whole number from 1 to 65535, got '0'",
           ("--port", "http"): "error: --port must be a whole number from 1 to 65535, got 'http'",
           ("--max-body-bytes", "10"): "error: --max-body-bytes must be at least 1024",
           ("--api-key", ""): "error: --api-key is empty"}
    for args, message in bad.items():
        with pytest.raises(SystemExit) as e:
            parse_args([*base, *args])
        assert str(e.value.code).startswith(message) and "\n" not in str(e.value.code), e.value.code


def test_port_errors_are_one_line(tmp_path):
    from transrec.trainer.commands.serve import main

    r = subprocess.run([sys.executable, "-m", "transrec.trainer.commands.serve", "--export", "x", "--shards", "y",
                        "--port", "70000"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: --port must be a whole number from 1 to 65535, got '70000'"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as e:  # checked before the model loads (this export does not exist)
            main(["--export", "x", "--shards", "y", "--port", str(port)])
    assert str(e.value.code) == (f"error: --port {port}: 127.0.0.1:{port} is already in use (another service?): "
                                 "stop it or choose another --port")


def test_non_loopback_without_a_key_warns_in_one_line(export, catalogue, monkeypatch, capsys):
    from transrec.trainer.commands import serve

    served = []
    monkeypatch.setattr(serve, "serve_forever", lambda app, sock, log_level: served.append(sock.getsockname()))
    monkeypatch.delenv("TRANSREC_API_KEY", raising=False)
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
    argv = ["--export", str(export), "--shards", str(catalogue), "--host", "0.0.0.0", "--port", str(port)]
    serve.main(argv)
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 1 and "POST /items is open to anyone who can reach the port" in warnings[0], err
    assert any("lost when the service restarts" in line for line in err)
    monkeypatch.setenv("TRANSREC_API_KEY", KEY)
    serve.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert not [line for line in err if line.startswith("warning:")], err
    assert any("POST /items needs the API key" in line for line in err)
    assert served == [("0.0.0.0", port)] * 2
    serve.main(["--export", str(export), "--shards", str(catalogue), "--port", str(port)])  # loopback: no warning
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5"))


# -- 7. persistence ---------------------------------------------------------------------------------------------------
def test_without_a_journal_added_items_are_said_to_be_lost_on_restart(open_url):
    r = httpx.post(f"{open_url}/items", json={"id": "volatile", "text": "A short film"})
    assert r.status_code == 200 and r.json()["persisted"] is False
    assert "lost when the service restarts" in r.json()["note"] and "--items-journal" in r.json()["note"]
    assert httpx.get(f"{open_url}/health").json()["added_items_persist"] is False


def test_items_journal_restores_added_items_after_a_restart(export, catalogue, tmp_path, monkeypatch, capsys):
    from transrec.trainer.commands.serve import parse_args
    from transrec.trainer.serving.app import open_service

    journal = tmp_path / "items.jsonl"
    argv = ["--export", str(export), "--shards", str(catalogue), "--items-journal", str(journal), "--no-batching"]
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    first = open_service(parse_args(argv), show_progress=False)
    client = TestClient(first.app)
    jpeg = base64.b64encode(PICS[0].read_bytes()).decode()
    text = client.post("/items", json={"id": "j-text", "text": "A heist comedy in Rome"})
    image = client.post("/items", json={"id": "j-image", "image_base64": jpeg})
    assert text.status_code == image.status_code == 200 and text.json()["persisted"] is True
    assert "restored when the service restarts" in text.json()["note"]
    assert len(synced) >= 2  # each accepted item is on disk before its 200
    lines = journal.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"id": "j-text", "text": "A heist comedy in Rome"},
                                                    {"id": "j-image", "image_base64": jpeg}]
    assert client.post("/items", json={"id": "j-bad", "text": "   "}).status_code == 422  # refused: not journaled
    assert len(journal.read_text().splitlines()) == 2
    vectors = {i: first.rec.item_vectors[first.rec.index[i]].clone() for i in ("j-text", "j-image")}
    with pytest.raises(SystemExit) as e:  # one journal, one service: refused before the model loads
        open_service(parse_args(argv), show_progress=False)
    assert str(e.value.code) == (f"error: --items-journal {journal} is in use by another running service: stop it, "
                                 "or give this service its own journal")
    first.close()

    second = open_service(parse_args(argv), show_progress=False)  # the restart
    assert second.rec.item_ids[-2:] == ["j-text", "j-image"]
    for item, vec in vectors.items():
        torch.testing.assert_close(second.rec.item_vectors[second.rec.index[item]], vec, rtol=1e-5, atol=1e-5)
    health = TestClient(second.app).get("/health").json()
    assert health["items"] == 8 and health["items_added"] == 2 and health["added_items_persist"] is True
    second.close()

    with open(journal, "ab") as f:  # half a line at the end: an interrupted write, or a confirmed line damaged later
        f.write(b'{"id": "j-half", "te')
    before = journal.read_bytes()
    with pytest.raises(SystemExit) as e:  # refused, nothing cut (tests/test_faults_second_pass.py: --set-aside)
        open_service(parse_args(argv), show_progress=False)
    assert str(e.value.code).startswith(f"error: {journal} line 3 is damaged") and journal.read_bytes() == before
    third = open_service(parse_args([*argv, "--items-journal-set-aside"]), show_progress=False)
    assert third.rec.item_ids[-2:] == ["j-text", "j-image"] and "j-half" not in third.rec.index
    assert journal.read_text().splitlines() == lines  # the half line moved aside: the next item starts a clean line
    assert TestClient(third.app).post("/items", json={"id": "j-more", "text": "A western"}).status_code == 200
    assert [json.loads(line)["id"] for line in journal.read_text().splitlines()] == ["j-text", "j-image", "j-more"]
    third.close()

    journal.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")  # damage inside: refuse to start
    with pytest.raises(SystemExit) as e:
        open_service(parse_args(argv), show_progress=False)
    message = str(e.value.code)
    assert message.startswith(f"error: {journal} line 2 ") and "\n" not in message


# -- 8. non-finite scores --------------------------------------------------------------------------------------------
def test_nonfinite_item_vectors_make_the_model_unusable(export, catalogue):
    from transrec.trainer.evaluation.model_ranker import ranker_from_export
    from transrec.trainer.evaluation.ranking import NonFiniteScores

    ranker = ranker_from_export(export, catalogue, show_progress=False)
    with torch.no_grad():
        ranker.model.towers["text"].proj[-1].weight.fill_(float("nan"))
    rec = Recommender(ranker, ranker.item_vectors())
    text_items = int((ranker.store.modality == ranker.store.modality_names.index("text")).sum())
    assert text_items == 5  # two of the three image items have no picture: text
    assert "5 of 6 catalogue items" in rec.unusable
    with pytest.raises(NonFiniteScores, match="5 of 6 catalogue items"):
        rec.recommend(["a"], k=2)
    client = TestClient(create_app(rec))
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["model_usable"] is False
    assert "5 of 6 catalogue items" in health.json()["reason"]
    r = client.post("/recommend", json=NORMAL)
    assert r.status_code == 500 and "NaN or infinite" in r.json()["detail"] and "Traceback" not in r.text
    r = client.post("/items", json={"id": "nan-text", "text": "A heist comedy"})
    assert r.status_code == 500 and "'nan-text'" in r.json()["detail"] and "not added" in r.json()["detail"]
    assert "nan-text" not in rec.index
    assert client.post("/recommend", json={"history": [], "k": 2}).status_code == 200  # popularity needs no model


def test_nonfinite_user_vectors_answer_500(export, catalogue):
    from transrec.trainer.evaluation.ranking import NonFiniteScores

    rec = fresh(export, catalogue)
    assert rec.unusable is None
    with torch.no_grad():
        for p in rec.model.user_encoder.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteScores, match="1 of 1 histories"):
        rec.recommend(["a"], k=2)
    client = TestClient(create_app(rec))  # through the micro-batcher
    assert client.get("/health").json()["nonfinite_requests"] == 1
    r = client.post("/recommend", json=NORMAL)
    assert r.status_code == 500 and "NaN or infinite user vectors to 1 of 1 histories" in r.json()["detail"]
    assert client.get("/health").json()["nonfinite_requests"] == 2


def test_micro_batcher_fails_only_the_requests_with_nonfinite_scores(export, catalogue, monkeypatch):
    from transrec.trainer.evaluation.ranking import NonFiniteScores
    from transrec.trainer.serving.recommender import MicroBatcher

    alone = fresh(export, catalogue)
    shared = fresh(export, catalogue)
    real = shared.user_vectors
    poisoned = shared.index["f"]

    def user_vectors(histories, item_vectors=None):
        out = real(histories, item_vectors)
        out[[r for r, h in enumerate(histories) if poisoned in h]] = float("nan")
        return out

    monkeypatch.setattr(shared, "user_vectors", user_vectors)
    shared.batcher = MicroBatcher(shared, max_batch=64, max_wait_ms=100)
    asks = [["a", "f"] if i % 2 else ["a", "b"] for i in range(8)]

    def ask(history):
        try:
            return shared.recommend(history, k=2)
        except NonFiniteScores as e:
            return e

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, asks))
    assert shared.batcher.largest > 1
    for history, answer in zip(asks, got):
        if "f" in history:
            assert isinstance(answer, NonFiniteScores) and "1 of 1 histories" in str(answer)
        else:
            assert answer["items"] == alone.recommend(history, k=2)["items"]


def test_batch_command_stops_in_one_line_on_nonfinite_vectors(catalogue, tiny_bert_dir, tmp_path):
    from transrec.trainer.commands.recommend import main as batch_main

    nan_export = build_export(tmp_path / "export", tiny_bert_dir, nan_tower="text")
    out = tmp_path / "recs.jsonl"
    with pytest.raises(SystemExit) as e:
        batch_main(["--export", str(nan_export), "--shards", str(catalogue), "--k", "2", "--out", str(out)])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and "5 of 6 catalogue items" in message
    assert "NaN or infinite" in message and not out.exists()
    assert torch.isnan(Recommender.from_export(nan_export, catalogue, show_progress=False).item_vectors).any()
