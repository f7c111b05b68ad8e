"""One error root: a user mistake is one line and exit 2 (its traceback only with --debug); an OSError
on the user's path is one line naming the path; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import json

import pytest

import sdpo.stages.pairs
from sdpo.cli import main
from sdpo.errors import SdpoError, describe_os_error


@pytest.fixture
def scored(tmp_path):
    folder = tmp_path / "gen"
    folder.mkdir()
    rows = [{"prompt": "p", "path": f"media/{i}.png", "seed": i, "total": float(i), "scores": {"r": float(i)}}
            for i in range(2)]
    (folder / "candidates.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_a_user_mistake_is_one_line_and_exit_2(scored, capsys):
    assert main(["pairs", str(scored), "--margin", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdpo: error: ") and "--margin" in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_debug_shows_the_traceback_of_a_user_mistake(scored, capsys):
    assert main(["--debug", "pairs", str(scored), "--margin", "nan"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("sdpo: error: ")


def test_an_os_error_on_the_users_path_is_one_line_naming_it(scored, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(scored / "pairs.jsonl"))

    monkeypatch.setattr(sdpo.stages.pairs, "build_pairs", full_disk)
    assert main(["pairs", str(scored)]) == 2
    err = capsys.readouterr().err
    assert err == (f"sdpo: error: {scored / 'pairs.jsonl'}: No space left on device "
                   "(free some space and run the same command again)\n")


def test_a_bug_is_not_dressed_as_a_user_mistake(scored, monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("total")

    monkeypatch.setattr(sdpo.stages.pairs, "build_pairs", bug)
    with pytest.raises(KeyError):  # the console script prints its traceback and exits 1
        main(["pairs", str(scored)])
    monkeypatch.setattr(sdpo.stages.pairs, "build_pairs", lambda *a, **k: (_ for _ in ()).throw(ValueError("x")))
    with pytest.raises(ValueError):  # a bare ValueError is a bug too, not exit 2
        main(["pairs", str(scored)])


def test_every_user_error_kind_is_an_sdpo_error_and_its_builtin():
    from sdpo import errors

    for name in errors.__all__:
        kind = getattr(errors, name)
        if isinstance(kind, type) and kind is not SdpoError:
            assert issubclass(kind, SdpoError) and issubclass(kind, (ValueError, OSError, ImportError)), name
    assert describe_os_error(OSError(errno.EROFS, "Read-only file system", "/x")) == "/x: Read-only file system"


def test_every_error_class_the_package_defines_is_a_user_error():
    """A new ``FooError(ValueError)`` would escape the CLI as a traceback: every one derives from SdpoError."""
    import importlib
    import pkgutil

    import sdpo

    defined = []
    for module_info in pkgutil.walk_packages(sdpo.__path__, "sdpo."):
        try:
            module = importlib.import_module(module_info.name)
        except ImportError:  # an optional extra that is not installed
            continue
        defined += [value for value in vars(module).values() if isinstance(value, type)
                    and issubclass(value, Exception) and value.__module__ == module.__name__
                    and value.__name__.endswith("Error")]
    assert len(defined) >= 10
    assert [kind.__qualname__ for kind in defined if not issubclass(kind, SdpoError)] == []
