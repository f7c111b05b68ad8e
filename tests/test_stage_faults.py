"""What a stage does with a damaged file or a full disk (issue 19, "What must be shown").

Readers: for any bytes, or any mutation of a valid file (a cut line, a flipped byte, a wrong type, a
number that is not finite, a path out of its folder, a non-UTF-8 byte), every stage's reader returns a
valid typed result or raises an SdpoError of one line naming the file: never another exception, never
NaN or inf in what it returns. Hypothesis runs derandomized, so CI sees the same examples every time.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdpo.cli import main
from sdpo.data import read_pairs
from sdpo.errors import SdpoError
from sdpo.files import atomic_output, disk_budget, write_atomic
from sdpo.folders import MARKER, folder_kind, read_marker
from sdpo.stages.generate import CANDIDATES_FILE, SETTINGS_FILE, generate_settings
from sdpo.stages.online import OnlineConfig
from sdpo.stages.records import read_records

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# -- what a reader may give back ------------------------------------------------------------------------


def _finite(value: Any, where: str = "result") -> None:
    """No NaN or inf anywhere in ``value`` (nested dicts, lists, dataclass-like objects' dicts)."""
    if isinstance(value, float):
        assert math.isfinite(value), f"{where} holds {value}"
    elif isinstance(value, dict):
        for key, item in value.items():
            _finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _finite(item, f"{where}[{index}]")


def _one_line_naming(error: SdpoError, path: Path) -> str:
    message = str(error)
    assert "\n" not in message and message.strip(), repr(message)
    assert str(path) in message, (message, path)
    return message


# -- strategies ------------------------------------------------------------------------------------------

HUGE, LONG_INT = "__HUGE__", "__LONG_INT__"
"""Placeholders a row may hold: written as the JSON numbers 1e999 (infinity once parsed) and a 5,000-digit
integer (refused by Python's int parser), which json.dumps cannot write itself."""

BAD_PATHS = ["/etc/passwd", "../outside.png", "media/../../outside.png", "", "a\x00b.png", "~/x.png",
             "media/" + "x" * 300 + ".png"]

json_ish = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(BAD_PATHS + [HUGE, LONG_INT]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _dumps(row: Any) -> str:
    text = json.dumps(row, ensure_ascii=False)  # NaN / Infinity tokens where a float is not finite
    return text.replace(f'"{HUGE}"', "1e999").replace(f'"{LONG_INT}"', "9" * 5000)


@st.composite
def mutated_rows(draw: st.DrawFn, rows: list[dict[str, Any]]) -> bytes:
    """``rows`` (a valid JSONL file's) with some fields replaced, dropped or added, then the bytes cut,
    flipped or given a stray byte."""
    rows = [dict(row) for row in rows]
    for _ in range(draw(st.integers(0, 3))):
        row = rows[draw(st.integers(0, len(rows) - 1))]
        key = draw(st.sampled_from(sorted(row) + ["extra"]))
        if draw(st.booleans()):
            row[key] = draw(json_ish)
        else:
            row.pop(key, None)
    lines = [_dumps(row) if draw(st.integers(0, 9)) else _dumps(draw(json_ish)) for row in rows]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    for _ in range(draw(st.integers(0, 2))):
        action = draw(st.sampled_from(["cut", "flip", "insert"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "cut":
            data = data[:at]
        elif action == "flip" and data:
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
        else:
            data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\n", b"{", b'"'])) + data[at:]
    return data


EDGE_VALUES = [math.nan, math.inf, -math.inf, HUGE, LONG_INT, 10**400, {"digits": 10**400}, True, None, "3", 3.5, -1, [], {},
                          {"digits": math.nan}, {"digits": HUGE}, {"a\nb": 1}, "line\nbreak", *BAD_PATHS]
"""Single values a reader must refuse or carry through unchanged."""
EDGES = st.sampled_from(EDGE_VALUES)


@st.composite
def one_field(draw: st.DrawFn, rows: list[dict[str, Any]]) -> bytes:
    """The valid file of ``rows`` with one field of one row set to an edge value (or a new field)."""
    rows = [dict(row) for row in rows]
    row = rows[draw(st.integers(0, len(rows) - 1))]
    row[draw(st.sampled_from(sorted(row) + ["extra"]))] = draw(EDGES)
    return "".join(_dumps(row) + "\n" for row in rows).encode("utf-8")


def every_edge(rows: list[dict[str, Any]]) -> list[bytes]:
    """The valid file of ``rows`` with each field of its first row (and a new one) set to each edge value
    in turn: every case, not a sample of them."""
    files = []
    for key in sorted(rows[0]) + ["extra"]:
        for value in EDGE_VALUES:
            changed = [{**rows[0], key: value}, *rows[1:]]
            files.append("".join(_dumps(row) + "\n" for row in changed).encode("utf-8"))
    return files


def file_bytes(rows: list[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, one edge value in the valid file made of ``rows``, or a rougher mutation of it."""
    return st.binary(max_size=200) | one_field(rows) | mutated_rows(rows)


# -- candidates.jsonl (score, pairs) ---------------------------------------------------------------------

CANDIDATES = [{"prompt": f"a handwritten digit {n}", "prompt_index": n, "candidate_index": c, "seed": 3 + c,
               "path": f"media/{n:06d}-{c:02d}.png", "scores": {"digits": 0.25 * c}, "total": 0.25 * c}
              for n in range(2) for c in range(2)]


@FUZZ
@given(data=file_bytes(CANDIDATES))
def test_candidates_reader_returns_checked_records_or_one_line(tmp_path_factory, data):
    _check_candidates(tmp_path_factory.mktemp("candidates"), data)


def _check_candidates(folder: Path, data: bytes) -> None:
    path = folder / CANDIDATES_FILE
    path.write_bytes(data)
    try:
        records = read_records(folder)
    except SdpoError as error:
        _one_line_naming(error, path)
        return
    assert records
    for record in records:
        assert isinstance(record["prompt"], str) and isinstance(record["path"], str)
        assert type(record["prompt_index"]) is int and type(record["candidate_index"]) is int
        assert (folder / record["path"]).resolve().is_relative_to(folder.resolve())
        _finite(record)


def test_candidates_reader_with_each_edge_value_in_each_field(tmp_path):
    for data in every_edge(CANDIDATES):
        _check_candidates(tmp_path, data)


def test_the_valid_candidates_file_reads_as_written(tmp_path):
    (tmp_path / CANDIDATES_FILE).write_text("".join(json.dumps(row) + "\n" for row in CANDIDATES))
    assert read_records(tmp_path) == CANDIDATES


# -- pairs.jsonl with scores and gaps (precompute, train) -------------------------------------------------

PAIRS = [{"prompt": f"a handwritten digit {n}", "chosen": f"media/{n}-1.png", "rejected": f"media/{n}-0.png",
          "chosen_score": 0.75, "rejected_score": 0.25, "gap": 0.5} for n in range(2)]


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose media files exist, so a valid manifest reads."""
    folder = tmp_path_factory.mktemp("pairs")
    (folder / "media").mkdir()
    for n in range(2):
        for c in range(2):
            (folder / "media" / f"{n}-{c}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


def _check_pairs(folder: Path, data: bytes) -> None:
    path = folder / "pairs.jsonl"
    path.write_bytes(data)
    for policy in ("fail", "skip"):
        try:
            pairs = read_pairs(path, on_bad_pair=policy)
        except SdpoError as error:
            problems = getattr(error, "problems", [])
            if len(problems) > 1:  # one error lists every bad line: each one line naming file and line
                assert all(problem.where == f"{path}:{problem.line}" for problem in problems)
                assert all("\n" not in problem.reason for problem in problems)
            else:
                _one_line_naming(error, path)
            continue
        assert pairs
        for pair in pairs:
            assert isinstance(pair.prompt, str) and pair.prompt.strip()
            assert isinstance(pair.chosen, Path) and pair.chosen.is_file() and pair.rejected.is_file()
            assert pair.where.startswith(f"{path}:")
            _finite(pair.metadata)


@FUZZ
@given(data=file_bytes(PAIRS))
def test_pairs_reader_returns_usable_pairs_or_names_each_bad_line(pairs_folder, data):
    _check_pairs(pairs_folder, data)


def test_pairs_reader_with_each_edge_value_in_each_field(pairs_folder):
    for data in every_edge(PAIRS):
        _check_pairs(pairs_folder, data)


# -- generate.json and the folder's marker (a generate rerun) ------------------------------------------

SETTINGS = {"prompts": ["a handwritten digit 3"], "per_prompt": 2, "seed": 3, "batch_size": 4, "family": "toy",
            "sampler": {"num_inference_steps": 2, "guidance_scale": 1.25}, "lora": None}


MARKED = {"kind": "generate", "settings": SETTINGS}


@FUZZ
@given(settings_file=file_bytes([SETTINGS]), marker=file_bytes([MARKED]))
def test_a_generate_rerun_reads_any_settings_file_and_marker(tmp_path_factory, settings_file, marker):
    _check_generate_rerun(tmp_path_factory.mktemp("gen"), settings_file, marker)


def test_a_generate_rerun_with_each_edge_value_in_its_settings(tmp_path):
    for data in every_edge([SETTINGS]):
        _check_generate_rerun(tmp_path, data, b"")  # legacy: generate.json alone
        _check_generate_rerun(tmp_path, b"", b'{"kind": "generate", "settings": ' + data.strip() + b"}")


def _check_generate_rerun(folder: Path, settings_file: bytes, marker: bytes) -> None:
    (folder / "batches").mkdir(exist_ok=True)
    (folder / "batches" / "batch-000000.safetensors").write_bytes(b"")  # a batch is there: settings bind
    (folder / SETTINGS_FILE).write_bytes(settings_file)
    (folder / MARKER).write_bytes(marker)
    assert folder_kind(folder) in ("generate", *([read_marker(folder)["kind"]] if read_marker(folder) else []))
    try:
        generate_settings(folder, SETTINGS)
    except SdpoError as error:
        _one_line_naming(error, folder)


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a valid generate batch file: pixels, and the candidates' records in its metadata."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("batch") / "batch.safetensors"
    save_file({"pixels": torch.zeros(2, 1, 4, 4)}, str(path), metadata={"records": json.dumps(CANDIDATES[:2])})
    return path.read_bytes()


@st.composite
def damaged_batch(draw: st.DrawFn, valid: bytes) -> bytes:
    """A batch file cut short, with a flipped byte, or with other records in its metadata."""
    if draw(st.booleans()):
        at = draw(st.integers(0, len(valid) - 1))
        return valid[:at] if draw(st.booleans()) else valid[:at] + bytes([valid[at] ^ draw(st.integers(1, 255))]) \
            + valid[at + 1:]
    import torch
    from safetensors.torch import save

    records = draw(file_bytes(CANDIDATES[:2])).decode("utf-8", "replace").replace("\n", ",")
    return save({"pixels": torch.zeros(1)}, metadata={"records": f"[{records.rstrip(',')}]"})


@FUZZ
@given(data=st.data())
def test_a_generate_rerun_reads_any_batch_file(tmp_path_factory, batch_file, data):
    from sdpo.stages.generate import collect_records

    folder = tmp_path_factory.mktemp("gen")
    (folder / "batches").mkdir()
    path = folder / "batches" / "batch-000000.safetensors"
    path.write_bytes(data.draw(damaged_batch(batch_file)))
    try:
        records = collect_records(folder, 1)
    except SdpoError as error:
        _one_line_naming(error, path)
        return
    assert isinstance(records, list) and all(isinstance(record, dict) for record in records)
    _finite(records)


# -- the online config (YAML) -----------------------------------------------------------------------------

def _online(folder: Path) -> dict[str, Any]:
    prompts = folder / "prompts.txt"
    prompts.write_text("a handwritten digit 3\n")
    return {"family": "toy", "pretrained": str(folder / "base"), "prompts": str(prompts),
            "eval_prompts": str(prompts), "reward": "digits", "out": str(folder / "online"), "rounds": 1,
            "per_prompt": 2, "steps": 1, "guidance_scale": 1.25, "train": {"learning_rate": 1e-3, "lora_rank": 2},
            "reward_options": {}}


def _check_online(path: Path, data: bytes) -> None:
    import yaml

    try:
        yaml_text = data.decode("utf-8")
        if yaml_text.lstrip().startswith("{"):  # a JSON row: write it as YAML too, NaN as .nan
            yaml_text = yaml.safe_dump(json.loads(yaml_text))
        path.write_text(yaml_text, encoding="utf-8")
    except (UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError):
        path.write_bytes(data)
    try:
        config = OnlineConfig.from_file(path)
    except SdpoError as error:
        _one_line_naming(error, path)
        return
    assert isinstance(config.rounds, int) and config.rounds >= 1 and isinstance(config.train, dict)
    _finite(vars(config))


@FUZZ
@given(data=file_bytes([{}]) | one_field([{"x": 0}]))
def test_online_config_reader_returns_a_checked_config_or_one_line(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("online")
    valid = _online(folder)
    if data.startswith(b"{") and data.rstrip().endswith(b"}"):
        with contextlib.suppress(ValueError):  # the mutation applied to a valid config
            data = _dumps({**valid, **json.loads(data)}).encode("utf-8")
    _check_online(folder / "online.yaml", data)


def test_online_config_with_each_edge_value_in_each_field(tmp_path):
    valid = _online(tmp_path)
    for data in every_edge([valid]):
        _check_online(tmp_path / "online.yaml", data)
    assert OnlineConfig.from_file(_write_yaml(tmp_path / "ok.yaml", valid)).train == valid["train"]


def _write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


# == a full disk, midway through every stage ==============================================================
# Each stage runs three times on the tiny digits world: once whole (its writes through sdpo.files
# measured), once with half that space free (exit 2, one line naming the path, nothing torn or temporary
# left), then the same command again with space: the result equals the whole run's.


def _contents(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path, with the folder's own path written as
    ``<out>`` in text files (a run records its output_dir), safetensors by metadata and tensors (its
    header's key order is not fixed from one run to the next) and a cache manifest without its time."""
    import hashlib

    def digest(path: Path) -> str:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                parts = [json.dumps(handle.metadata(), sort_keys=True).encode()]
                parts += [key.encode() + handle.get_tensor(key).numpy().tobytes() for key in sorted(handle.keys())]
            return hashlib.sha256(b"\0".join(parts)).hexdigest()
        data = path.read_bytes()
        if path.suffix in (".json", ".jsonl", ".md", ".txt"):
            data = data.replace(str(folder).encode(), b"<out>")
        if path.name == "manifest.json":  # a cache's: when it was made, and its shards' byte hashes
            data = json.dumps(_without(json.loads(data), {"created", "sha256"}), sort_keys=True).encode()
        return hashlib.sha256(data).hexdigest()

    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".verified.json"}  # a cache's memo of its shards' file stats


def _without(value: Any, keys: set[str]) -> Any:
    if isinstance(value, dict):
        return {key: _without(item, keys) for key, item in value.items() if key not in keys}
    return [_without(item, keys) for item in value] if isinstance(value, list) else value


def _parses(path: Path) -> None:
    """``path`` reads whole in its own format (nothing torn is left behind)."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".jsonl":
        for line in path.read_text().splitlines():
            json.loads(line)
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            for key in list(handle.keys()):
                handle.get_tensor(key)
    elif path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            image.load()


def test_atomic_writes_make_files_as_open_does(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_atomic(tmp_path / "atomic.txt", "x")
    with atomic_output(tmp_path / "output.txt") as temporary:
        temporary.write_text("x")
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert modes["atomic.txt"] == modes["output.txt"] == modes["plain.txt"], modes  # not 0o600


def _stage(args: list[str]) -> int:
    return main(["--quiet", *args])


def _disk_full_then_again(capsys, command, ref: Path, cut: Path) -> None:
    """``command(out)`` (the CLI arguments writing ``out``) run whole into ``ref``, then into ``cut`` on a
    disk that fills halfway, then again into ``cut``: the files of ``cut`` then equal those of ``ref``."""
    with disk_budget(1 << 40) as whole:
        assert _stage(command(ref)) == 0
    assert whole.spent > 0, "the stage writes nothing through sdpo.files"
    capsys.readouterr()
    with disk_budget(whole.spent // 2):
        assert _stage(command(cut)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sdpo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "No space left" in lines[0] and f" {cut}" in lines[0] and ".tmp" not in lines[0], lines[0]
    for path in cut.parent.rglob("*"):
        assert "tmp" not in path.name.lower(), f"left behind: {path}"  # .x.tmp, .cache.tmp-*, .export-tmp
        if path.is_file():
            _parses(path)
    assert _stage(command(cut)) == 0
    assert _contents(cut) == _contents(ref)


@pytest.fixture(scope="module")
def stages(world, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A generate folder (unscored, scored, with pairs) and a trained run with checkpoints, made once."""
    base, _ = world
    root = tmp_path_factory.mktemp("faults")
    prompts = root / "prompts.txt"
    prompts.write_text("a handwritten digit 3\na handwritten digit 7\n")
    made = {"base": base, "prompts": prompts, "raw": root / "raw", "scored": root / "scored", "run": root / "run"}
    assert _stage(_generate(made, made["raw"])) == 0
    shutil.copytree(made["raw"], made["scored"])
    assert _stage(["score", str(made["scored"]), "--reward", "digits"]) == 0
    assert _stage(["pairs", str(made["scored"])]) == 0
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump({
        "family": "toy", "pretrained": str(base), "cache_dir": str(world[1]), "output_dir": str(made["run"]),
        "lora_rank": 2, "learning_rate": 1e-3, "max_steps": 2, "train_batch_size": 2, "checkpoint_every": 1,
        "report_to": "none"}))
    assert _stage(["train", str(config)]) == 0
    return made


def _generate(made: dict[str, Path], out: Path) -> list[str]:
    return ["generate", "--family", "toy", "--pretrained", str(made["base"]), "--prompts", str(made["prompts"]),
            "--per-prompt", "2", "--steps", "2", "--seed", "3", "--batch-size", "2", "--out", str(out)]


def _copied(made: dict[str, Path], name: str, tmp_path: Path):
    """A command maker that first copies ``made[name]`` to the folder it is given (once)."""
    def prepare(out: Path) -> Path:
        if not out.exists():
            shutil.copytree(made[name], out)
        return out
    return prepare


def test_generate_on_a_full_disk(stages, tmp_path, capsys):
    _disk_full_then_again(capsys, lambda out: _generate(stages, out), tmp_path / "ref" / "gen",
                          tmp_path / "cut" / "gen")


def test_score_on_a_full_disk(stages, tmp_path, capsys):
    copy = _copied(stages, "raw", tmp_path)
    _disk_full_then_again(capsys, lambda out: ["score", str(copy(out)), "--reward", "digits"],
                          tmp_path / "ref" / "gen", tmp_path / "cut" / "gen")


def test_pairs_on_a_full_disk(stages, tmp_path, capsys):
    copy = _copied(stages, "scored", tmp_path)
    _disk_full_then_again(capsys, lambda out: ["pairs", str(copy(out)), "--margin", "0.01"],
                          tmp_path / "ref" / "gen", tmp_path / "cut" / "gen")


def test_precompute_on_a_full_disk(stages, tmp_path, capsys):
    def command(out: Path) -> list[str]:
        return ["precompute", "--family", "toy", "--pretrained", str(stages["base"]), "--pairs",
                str(stages["scored"] / "pairs.jsonl"), "--out", str(out)]
    _disk_full_then_again(capsys, command, tmp_path / "ref" / "cache", tmp_path / "cut" / "cache")


def test_evaluate_on_a_full_disk(stages, tmp_path, capsys):
    def command(out: Path) -> list[str]:
        return ["evaluate", "--family", "toy", "--pretrained", str(stages["base"]), "--prompts",
                str(stages["prompts"]), "--run", f"tuned={stages['run']}", "--reward", "digits", "--steps", "2",
                "--out", str(out)]
    _disk_full_then_again(capsys, command, tmp_path / "ref" / "eval", tmp_path / "cut" / "eval")


def test_export_on_a_full_disk(stages, tmp_path, capsys):
    copy = _copied(stages, "run", tmp_path)
    _disk_full_then_again(capsys, lambda out: ["export", str(copy(out))], tmp_path / "ref" / "run",
                          tmp_path / "cut" / "run")


def test_online_on_a_full_disk(stages, tmp_path, capsys):
    def command(out: Path) -> list[str]:
        config = out.parent / "online.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump({
            "family": "toy", "pretrained": str(stages["base"]), "prompts": str(stages["prompts"]),
            "eval_prompts": str(stages["prompts"]), "reward": "digits", "out": str(out), "rounds": 1,
            "per_prompt": 2, "steps": 1, "num_inference_steps": 2, "evaluate_rounds": False,
            "train": {"train_batch_size": 2, "lora_rank": 2, "learning_rate": 1e-3, "report_to": "none"}}))
        return ["online", str(config)]
    _disk_full_then_again(capsys, command, tmp_path / "ref" / "online", tmp_path / "cut" / "online")
