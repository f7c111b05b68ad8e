"""`sdpo label` and `sdpo pairs --from-labels` over HTTP and the command line, on a real generate folder:
answers saved once and resumed, refused requests that write nothing, no file outside the folder's
media, error cards for damaged media, pairs by majority with the raters' agreement."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from human_world import free_port, human_world, lower_index_wins, sdpo

from sdpo.cli import main
from sdpo.data.samples import read_samples
from sdpo.human.agreement import agreement
from sdpo.human.answers import effective_answers, read_answers
from sdpo.human.label import open_label_session
from sdpo.human.server import BackgroundServer, is_loopback, warn_host
from sdpo.human.session import Refused

pytest.importorskip("starlette", reason="the labelling pages need the human extra (pip install -e '.[human]')")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    return human_world(tmp_path_factory)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _post(url: str, body: object, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_answers_are_saved_once_resumed_and_become_pairs(world, tmp_path: Path, capsys) -> None:
    gen = world.fresh_gen("resume")
    session = open_label_session(gen, "ana")
    assert len(session.items) == 12  # 4 prompts x 3 candidates: every pair of each prompt
    given = {}
    with BackgroundServer(session, free_port()) as server:
        for _ in range(5):
            item = session.current()
            status, state = _post(f"{server.url}/api/answer", {"rater": "ana", "item": item.id,
                                                               "choice": lower_index_wins(item)})
            assert status == 200 and state["done"] == len(given) + 1
            given[item.id] = lower_index_wins(item)
        status, state = _post(f"{server.url}/api/undo", {"rater": "ana"})  # the fifth is taken back ...
        assert status == 200 and state["done"] == 4 and state["item"]["id"] == item.id
        status, _ = _post(f"{server.url}/api/answer", {"rater": "ana", "item": item.id, "choice": "tie"})
        assert status == 200  # ... and answered again
        given[item.id] = "tie"
    # a restart resumes: the same queue, where the rater stopped
    again = open_label_session(gen, "ana")
    assert [i.id for i in again.items] == [i.id for i in session.items]
    assert again.current().id == session.items[5].id
    header, records = read_answers(gen / "labels" / "ana.jsonl")
    assert header["mode"] == "paired" and header["rater"] == "ana"
    assert {k: a.choice for k, a in effective_answers(records).items()} == given
    assert [r.type for r in records] == ["answer"] * 5 + ["undo", "answer"]
    # every other item, and a second rater who disagrees once
    while (item := again.current()) is not None:
        again.answer({"rater": "ana", "item": item.id, "choice": "skip" if item.id.endswith("c001-c002") else
                      lower_index_wins(item)})
    bo = open_label_session(gen, "bo")
    for item in bo.items[:4]:
        choice = lower_index_wins(item) if item.id != session.items[0].id else \
            {"left": "right", "right": "left"}[lower_index_wins(item)]
        bo.answer({"rater": "bo", "item": item.id, "choice": choice})
    capsys.readouterr()
    assert main(["pairs", str(gen), "--from-labels"]) == 0
    printed = capsys.readouterr().out
    assert "by 2 rater(s)" in printed and "agreement:" in printed and "labelled twice" in printed
    pairs = [json.loads(line) for line in (gen / "pairs.jsonl").read_text().splitlines()]
    summary = json.loads((gen / "pairs.summary.json").read_text())
    assert summary["agreement"]["items_labelled_twice"] == 4 and summary["counts"]["contradictions"] == 1
    # what was chosen: the lower candidate index wins, except the ties and skips (no pair) and the contradiction,
    # where one vote each way has no majority
    ana = effective_answers(read_answers(gen / "labels" / "ana.jsonl")[1])
    expected = set()
    for key, answer in ana.items():
        if answer.choice in ("tie", "skip") or key == session.items[0].id:
            continue
        chosen, rejected = sorted(answer.shown)
        expected.add((answer.prompt, str((gen / chosen).resolve()), str((gen / rejected).resolve())))
    made = {(p["prompt"], str((gen / p["chosen"]).resolve()), str((gen / p["rejected"]).resolve())) for p in pairs}
    assert made == expected and summary["counts"]["no majority"] == 1
    assert all(p["gap"] == 1.0 and p["votes_rejected"] == 0 for p in pairs)
    from sdpo.data import read_pairs

    assert len(read_pairs(gen / "pairs.jsonl")) == len(expected)  # the manifest precompute reads


def test_refused_requests_write_nothing(world) -> None:
    gen = world.fresh_gen("refused")
    session = open_label_session(gen, "ana")
    item = session.current()
    answers = gen / "labels" / "ana.jsonl"
    with BackgroundServer(session, free_port()) as server:
        url = f"{server.url}/api/answer"
        before = answers.read_bytes()
        for body, status in [
            ({"rater": "ana", "item": "p09999-c000-c001", "choice": "left"}, 404),
            ({"rater": "bo", "item": item.id, "choice": "left"}, 403),
            ({"rater": "ana", "item": item.id, "choice": "both"}, 422),
            ({"rater": "ana", "item": item.id}, 400),
            ({"rater": "ana", "item": item.id, "choice": "left", "extra": 1}, 400),
            ([1, 2], 400),
            (b"{not json", 400),
            ({"rater": "ana", "item": item.id, "choice": "left", "pad": "x" * 5000}, 413),
        ]:
            code, reply = _post(url, body)
            assert code == status and reply["error"], (body, code, reply)
        code, reply = _post(url, b"--boundary\r\nContent-Disposition: form-data; name=file\r\n\r\nx",
                            "multipart/form-data; boundary=boundary")
        assert code == 415 and "upload" in reply["error"]
        assert _get(f"{server.url}/api/answer")[0] == 405
        # another site's page: its name pointed at 127.0.0.1 (DNS rebinding), or a cross-origin preflight
        rebound = urllib.request.Request(f"{server.url}/api/state", headers={"Host": "evil.example:" + server.url.rsplit(":", 1)[1]})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebound, timeout=10)
        assert refused.value.code == 400
        preflight = urllib.request.Request(url, method="OPTIONS", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(preflight, timeout=10)
        assert refused.value.code == 405 and "access-control-allow-origin" not in refused.value.headers
        assert answers.read_bytes() == before  # nothing written
        assert _post(url, {"rater": "ana", "item": item.id, "choice": "left"})[0] == 200
        code, reply = _post(url, {"rater": "ana", "item": item.id, "choice": "right"})
        assert code == 409 and "answered already" in reply["error"]
        assert _post(f"{server.url}/api/end", {"rater": "ana"})[0] == 404  # label has no end step
    assert len(read_answers(answers)[1]) == 1


def test_no_file_outside_the_folder_media_is_served(world, tmp_path: Path) -> None:
    gen = world.fresh_gen("traversal")
    secret = tmp_path / "secret.png"
    secret.write_bytes((gen / "media" / "p00000-c000.png").read_bytes())
    session = open_label_session(gen, "ana")
    view = session.state()["item"]
    with BackgroundServer(session, free_port()) as server:
        good = view["sides"][0]["url"]
        assert _get(server.url + good) == (200, (gen / view["names"][0]).read_bytes())
        attempts = ["/media/..%2Fcandidates.jsonl", "/media/%2e%2e%2fcandidates.jsonl", "/media/..%2F..%2F..%2Fetc%2Fpasswd",
                    "/media/%2Fetc%2Fpasswd", "/media//etc/passwd", "/media/media%2Fp00000-c000.png",
                    "/media/p00000-c000.png", "/static/..%2F__init__.py", "/static/%2e%2e/label.py",
                    "/static/../answers.py", "/candidates.jsonl", "/labels/ana.jsonl", "/%2Fetc%2Fpasswd",
                    f"{good}/..%2F..%2Fcandidates.jsonl", f"{good}%2F..%2F..%2Fcandidates.jsonl",
                    "/media/" + str(secret).replace("/", "%2F")]
        for attempt in attempts:
            status, body = _get(server.url + attempt)
            assert status == 404 and b"handwritten" not in body and not body.startswith(b"\x89PNG"), attempt
        # a media file swapped for a symlink out of the folder while the page runs: no longer served
        target = gen / view["names"][0]
        target.unlink()
        os.symlink(secret, target)
        assert _get(server.url + good)[0] == 404
        assert _post(f"{server.url}/api/answer", {"rater": "ana", "item": view["id"], "choice": "skip"})[0] == 200


def test_a_missing_or_damaged_file_is_an_error_card(world) -> None:
    gen = world.fresh_gen("damaged")
    (gen / "media" / "p00001-c000.png").unlink()
    (gen / "media" / "p00001-c001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    session = open_label_session(gen, "ana")
    with BackgroundServer(session, free_port()) as server:
        cards = 0
        while (state := json.loads(_get(f"{server.url}/api/state")[1]))["item"] is not None:
            errors = [side["error"] for side in state["item"]["sides"] if side["error"]]
            if errors:
                cards += 1
                assert any("missing" in e or "damaged" in e or "unreadable" in e for e in errors)
                for side in state["item"]["sides"]:
                    if side["error"]:
                        assert _get(server.url + side["url"])[0] in (200, 404)  # never a server error
            assert _post(f"{server.url}/api/answer", {"rater": "ana", "item": state["item"]["id"],
                                                      "choice": "skip" if errors else "left"})[0] == 200
        assert cards == 3  # prompt 1's three pairs each show a bad file; the server answered throughout


def test_a_restart_with_other_settings_or_a_torn_line(world, capsys) -> None:
    gen = world.fresh_gen("torn")
    session = open_label_session(gen, "ana", pairs_per_prompt=2, seed=3)
    assert len(session.items) == 8 and {i.prompt_index for i in session.items} == {0, 1, 2, 3}
    for item in session.items[:2]:
        session.answer({"rater": "ana", "item": item.id, "choice": "left"})
    path = gen / "labels" / "ana.jsonl"
    with open(path, "ab") as handle:  # killed in the middle of a write: the page was never told it was saved
        handle.write(b'{"type": "answer", "seq": 3, "it')
    resumed = open_label_session(gen, "ana", pairs_per_prompt=2, seed=3)
    assert len(resumed.answers.effective()) == 2 and path.read_bytes().endswith(b"\n")
    assert resumed.current().id == session.items[2].id
    # other settings for the same rater are refused in one line; another rater starts their own file
    assert main(["label", str(gen), "--rater", "ana", "--seed", "4", "--pairs-per-prompt", "2", "--port", str(free_port())]) == 2
    assert "other settings (settings.seed: was 3, now 4)" in capsys.readouterr().err
    assert main(["label", str(gen), "--rater", "../ana", "--port", str(free_port())]) == 2
    assert "rater name" in capsys.readouterr().err
    assert main(["label", str(gen), "--port", "0"]) == 2
    assert main(["label", str(world.root / "nowhere"), "--port", str(free_port())]) == 2
    assert main(["label", str(world.root / "models"), "--port", str(free_port())]) == 2
    assert "generate" in capsys.readouterr().err
    with open(path, "ab") as handle:
        handle.write(b"not json\n{}\n")
    assert main(["label", str(gen), "--rater", "ana", "--seed", "3", "--pairs-per-prompt", "2", "--port", str(free_port())]) == 2
    assert "ana.jsonl:4: invalid JSON" in capsys.readouterr().err


def test_unpaired_labels_record_their_mode_and_make_labelled_samples_not_pairs(world, capsys) -> None:
    gen = world.fresh_gen("unpaired")
    session = open_label_session(gen, "cy", unpaired=True)
    assert len(session.items) == 12 and all(len(i.shown) == 1 for i in session.items)
    view = session.state()
    assert view["choices"] == ["up", "down", "skip"] and len(view["item"]["sides"]) == 1
    for item, choice in zip(session.items[:3], ["up", "down", "skip"], strict=True):
        session.answer({"rater": "cy", "item": item.id, "choice": choice})
    assert read_answers(gen / "labels" / "cy.jsonl")[0]["mode"] == "unpaired"
    with pytest.raises(ValueError, match="choice"):
        session.answers.answer(session.items[4].id, "left", "p", 0, ["x"])
    assert main(["pairs", str(gen), "--from-labels"]) == 0
    assert "1 desirable, 1 undesirable" in capsys.readouterr().out and not (gen / "pairs.jsonl").exists()
    samples = read_samples(gen / "samples.jsonl")
    by_media = {s.media: s.desirable for s in samples}
    files = [(gen / item.shown[0]).resolve() for item in session.items[:2]]
    assert by_media == {files[0]: True, files[1]: False} and all(s.score is None for s in samples)
    # A second rater's "down" on the first candidate ties it: it is left out.
    other = open_label_session(gen, "dee", unpaired=True)
    other.answer({"rater": "dee", "item": session.items[0].id, "choice": "down"})
    assert main(["pairs", str(gen), "--from-labels", "--out", str(gen / "thumbs.jsonl")]) == 0
    assert "1 tie" in capsys.readouterr().out
    assert [s.desirable for s in read_samples(gen / "thumbs.jsonl")] == [False]


def test_agreement_figures_by_hand() -> None:
    # two raters, 4 shared items: agree on 3 (a, a, b), disagree on one; a = 5/8, b = 3/8 pooled
    ratings = {"ana": {"1": "a", "2": "a", "3": "b", "4": "a", "5": "a"}, "bo": {"1": "a", "2": "a", "3": "b", "4": "b"}}
    found = agreement(ratings)
    assert found.items_labelled_twice == 4 and found.raw == 0.75
    # Cohen: p_o = 3/4; ana 3a 1b, bo 2a 2b over the shared items: p_e = (3*2 + 1*2) / 16 = 1/2
    assert found.cohen_kappa == pytest.approx((0.75 - 0.5) / 0.5)
    # Fleiss: pooled a = 5/8, b = 3/8: p_e = 34/64
    assert found.fleiss_kappa == pytest.approx((0.75 - 34 / 64) / (1 - 34 / 64))
    assert agreement({"ana": {"1": "a"}}).raw is None


def test_a_non_loopback_host_is_warned_about(capsys) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    warn_host("127.0.0.1")
    assert capsys.readouterr().err == ""
    warn_host("0.0.0.0")
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err


def test_pairs_from_labels_on_a_folder_without_answers(world, capsys) -> None:
    gen = world.fresh_gen("no-answers")
    assert main(["pairs", str(gen), "--from-labels"]) == 2
    assert "sdpo label" in capsys.readouterr().err
    sdpo("score", str(gen), "--reward", "digits")
    sdpo("pairs", str(gen))  # scored pairs are as they were
    assert (gen / "pairs.jsonl").is_file()


def test_label_as_a_user_types_it(world, monkeypatch, capsys) -> None:
    gen = world.fresh_gen("typed")
    served = []
    monkeypatch.setattr("sdpo.human.server.serve", lambda session, host, port: served.append((session, host, port)))
    port = free_port()
    assert main(["label", str(gen), "--rater", "ana", "--pairs-per-prompt", "1", "--port", str(port)]) == 0
    session, host, served_port = served[0]
    assert (host, served_port, session.mode, len(session.items)) == ("127.0.0.1", port, "paired", 4)
    out = capsys.readouterr().out
    assert "label: 4 items for rater ana (0 answered)" in out and f"http://127.0.0.1:{port}/" in out
    assert main(["label", str(gen), "--rater", "bo", "--unpaired", "--host", "0.0.0.0", "--port", str(port)]) == 0
    assert served[1][0].mode == "unpaired" and served[1][1] == "0.0.0.0"
    assert (gen / "labels" / "ana.jsonl").is_file() and (gen / "labels" / "bo.jsonl").is_file()


def test_two_servers_on_one_raters_file_never_answer_an_item_twice(world, capsys) -> None:
    gen = world.fresh_gen("two-servers")
    first, second = open_label_session(gen, "ana"), open_label_session(gen, "ana")  # two terminals, one rater
    item = first.current()
    first.answer({"rater": "ana", "item": item.id, "choice": "left"})
    with pytest.raises(Refused, match="answered already"):
        second.answer({"rater": "ana", "item": item.id, "choice": "right"})
    assert second.current().id != item.id  # it read what the other one wrote
    second.undo({"rater": "ana"})  # takes back the other server's answer: the file is the one truth
    assert first.current().id == item.id and first.answers.effective() == {}
    _, records = read_answers(gen / "labels" / "ana.jsonl")
    assert [(r.type, r.seq) for r in records] == [("answer", 1), ("undo", 2)]
    # a hand-edited line of the wrong type is one line naming the file and line, not a traceback
    with open(gen / "labels" / "ana.jsonl", "a") as handle:
        handle.write(json.dumps({"type": "answer", "seq": 3, "item": item.id, "choice": 1, "prompt": "p",
                                 "prompt_index": 0, "shown": ["a", "b"], "time": "t"}) + "\n")
    assert main(["pairs", str(gen), "--from-labels"]) == 2
    assert "ana.jsonl:4: 'choice' must be a string" in capsys.readouterr().err


def test_a_port_in_use_is_one_line(world, capsys) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        gen = world.fresh_gen("port")
        assert main(["label", str(gen), "--rater", "probe", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (gen / "labels").exists()  # refused before anything was written
