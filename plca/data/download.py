"""Download of the real benchmarks: fetch archives, resume, retry, verify checksums, extract and check in place.

URLs, checksums and expected counts live in `sources.yaml` (next to this file; another file of the same schema
can be passed). Archives are fetched over HTTP(S) with the standard library: a partial download is kept as
`<file>.part` and resumed with an HTTP Range request, transient failures are retried with exponential backoff,
and a finished file is checked against the publisher's checksum (sha256 or md5) before it takes its final name.
An archive found in the manual folder or the download folder is verified and used without any network access;
when the network cannot be reached the error names the URL and where to put a manually downloaded copy.

Cityscapes needs an account. Its login follows the protocol of cityscapesscripts' downloader (csDownload):
GET then POST the login form (a 302 answer means success), then each package by id with the session cookie.
Credentials are handed in by the caller (see resolve_credentials); they are never logged or written anywhere.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import netrc
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlencode

from tqdm import tqdm

from plca.config import from_dict, load_yaml
from plca.data.extract import ArchivePart, ExtractConfig, extract_into_place, read_marker
from plca.data.verify import VerifyConfig, VerifyReport, verify_dataset

log = logging.getLogger(__name__)

#: The packaged sources file (URLs, checksums, expected counts).
DEFAULT_SOURCES = Path(__file__).with_name("sources.yaml")
PART_SUFFIX = ".part"
USER_AGENT = "plca-downloader/1 (python-urllib)"
_HASH_CHUNK = 1 << 20
# HTTP statuses worth retrying: the server or a proxy is busy or timed out.
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_CONTENT_RANGE_UNSATISFIED = re.compile(r"bytes \*/(\d+)")

# Failures of the network, as opposed to local file errors (which are raised as they are).
_NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)

T = TypeVar("T")


class DownloadError(RuntimeError):
    """An archive could not be fetched."""


class OfflineError(DownloadError):
    """The server could not be reached at all (no network, DNS failure, connection refused)."""


class ChecksumError(DownloadError):
    """A file's checksum or size differs from the published one."""


class CredentialsError(DownloadError):
    """A download needs an account and no (valid) credentials were given."""


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class ArchiveSource:
    """One archive of a dataset, as listed in sources.yaml."""

    file: str
    url: str
    sha256: str | None = None
    md5: str | None = None
    md5_url: str | None = None
    size: int | None = None
    subdir: str | None = None


@dataclass
class AuthSource:
    """How to log in to a dataset's site (only Cityscapes' protocol is known)."""

    kind: Literal["cityscapes"]
    login_url: str
    netrc_host: str
    username_env: str
    password_env: str


@dataclass
class DatasetSource:
    """A dataset's archives, layout and expected pair counts per split."""

    layout: Literal["gta5", "cityscapes", "synthia"]
    archives: list[ArchiveSource]
    expected: dict[str, int] = field(default_factory=dict)
    homepage: str = ""
    auth: AuthSource | None = None
    known_size_mismatches: list[str] = field(default_factory=list)


def load_sources(path: Path | str | None = None) -> dict[str, DatasetSource]:
    """Read a sources file (default: the packaged sources.yaml) into {dataset name: DatasetSource}."""
    path = Path(path) if path is not None else DEFAULT_SOURCES
    data = load_yaml(path)
    datasets = data.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise ValueError(f"{path}: expected a non-empty 'datasets' mapping")
    return {name: from_dict(DatasetSource, spec, f"{path}: datasets.{name}") for name, spec in datasets.items()}


# ----------------------------------------------------------------------------------------------- config


@dataclass
class FetchConfig:
    """Options of fetching archives."""

    #: Where archives are downloaded (and where a manually downloaded archive may also be put).
    archive_dir: Path = Path("data/archives")
    #: Folder checked first for manually downloaded archives (never written to); None = only archive_dir.
    manual_dir: Path | None = Path("data/manual")
    #: Retries after the first attempt, per request.
    retries: int = 4
    #: First wait before a retry; each further wait is `backoff_factor` times longer, at most `backoff_max_s`.
    backoff_s: float = 2.0
    backoff_factor: float = 2.0
    backoff_max_s: float = 60.0
    #: Socket timeout of one connection attempt or read.
    timeout_s: float = 60.0
    #: Bytes read from the network per write.
    chunk_bytes: int = 1 << 20
    #: Show a progress bar per download.
    progress: bool = True


@dataclass
class DownloadParams:
    """The `download` section of params.yaml (one dataset per stage run, chosen on the command line)."""

    #: Each dataset is extracted to <out_dir>/<dataset name>.
    out_dir: Path = Path("data/raw")
    #: Sources file; None = the packaged plca/data/sources.yaml.
    sources: Path | None = None
    #: Delete downloaded archives (never the manual folder's) once the dataset is in place.
    keep_archives: bool = True
    fetch: FetchConfig = field(default_factory=FetchConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    #: {dataset: {split: pairs}} replacing the sources file's expected counts (e.g. for a partial copy).
    expected: dict[str, dict[str, int]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    """An account for a dataset site; repr() shows neither field."""

    username: str = field(repr=False)
    password: str = field(repr=False)
    #: Where they came from ("environment" or a netrc path), safe to log.
    origin: str = ""


def resolve_credentials(
    auth: AuthSource, environ: Mapping[str, str], netrc_file: Path | str | None = None
) -> Credentials | None:
    """Credentials from `environ` (auth.username_env / auth.password_env) or else a netrc entry for
    auth.netrc_host; None when neither has them. Errors never quote the file's contents."""
    user, password = environ.get(auth.username_env, ""), environ.get(auth.password_env, "")
    if user and password:
        return Credentials(user, password, "environment")
    if netrc_file is None or not Path(netrc_file).is_file():
        return None
    try:
        entry = netrc.netrc(str(netrc_file)).authenticators(auth.netrc_host)
    except netrc.NetrcParseError as exc:
        raise CredentialsError(f"{netrc_file}: cannot parse (line {exc.lineno})") from None
    except OSError as exc:
        raise CredentialsError(f"{netrc_file}: cannot read: {exc.strerror}") from None
    if entry is None or not entry[0] or not entry[2]:
        return None
    return Credentials(entry[0], entry[2], str(netrc_file))


# ----------------------------------------------------------------------------------------------- http


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turn redirects into HTTPError: Cityscapes answers a good login, and a refused download, with a 302."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        return None


class _Transient(Exception):
    """A failure worth retrying; `offline` when no connection could be made at all."""

    def __init__(self, message: str, offline: bool = False) -> None:
        super().__init__(message)
        self.offline = offline


def _classify(exc: BaseException, url: str) -> BaseException:
    """Map a network exception to _Transient (retry) or DownloadError (give up)."""
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code in _RETRY_STATUS:
            return _Transient(f"HTTP {exc.code} {exc.reason} from {url}")
        return DownloadError(f"{url}: HTTP {exc.code} {exc.reason}")
    if isinstance(exc, urllib.error.URLError):
        if isinstance(exc.reason, ssl.SSLError):  # a certificate problem does not go away by retrying
            return DownloadError(f"{url}: TLS failed: {exc.reason}")
        return _Transient(f"cannot reach {url}: {exc.reason}", offline=True)
    if isinstance(exc, TimeoutError):
        return _Transient(f"timed out reading {url}")
    return _Transient(f"connection to {url} broke: {exc!r}")


def _with_retries(action: Callable[[], T], url: str, cfg: FetchConfig, hint: str) -> T:
    """Run `action`, retrying transient failures with exponential backoff; the final error carries `hint`."""
    last: _Transient | None = None
    for attempt in range(cfg.retries + 1):
        if attempt:
            delay = min(cfg.backoff_max_s, cfg.backoff_s * cfg.backoff_factor ** (attempt - 1))
            log.warning("%s; retry %d/%d in %.1f s", last, attempt, cfg.retries, delay)
            time.sleep(delay)
        try:
            return action()
        except _Transient as exc:
            last = exc
        except _NETWORK_ERRORS as exc:
            mapped = _classify(exc, url)
            if not isinstance(mapped, _Transient):
                raise DownloadError(f"{mapped} {hint}") from exc
            last = mapped
    assert last is not None
    kind = OfflineError if last.offline else DownloadError
    raise kind(f"{last} (gave up after {cfg.retries + 1} attempts). {hint}")


def _manual_hint(archive: ArchiveSource, cfg: FetchConfig, homepage: str = "") -> str:
    where = [str(d / archive.file) for d in (cfg.manual_dir, cfg.archive_dir) if d is not None]
    site = f" (see {homepage})" if homepage else ""
    return (
        f"If this machine is offline, download {archive.file} from {archive.url}{site} elsewhere and put it at "
        f"{' or '.join(where)}; the next run verifies its checksum and uses it."
    )


def _download_once(opener: urllib.request.OpenerDirector, archive: ArchiveSource, part: Path, cfg: FetchConfig) -> None:
    """One attempt: continue `part` from its current size (Range) or start it over; raises _Transient."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        resp = opener.open(urllib.request.Request(archive.url, headers=headers), timeout=cfg.timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            # Range past the end: the part is already whole (kept from a run stopped before renaming) or stale.
            match = _CONTENT_RANGE_UNSATISFIED.match(exc.headers.get("Content-Range", "") or "")
            exc.close()
            if match and int(match.group(1)) == start:
                return
            part.unlink()
            raise _Transient(f"{archive.url} refused to resume {part.name}; starting over") from None
        raise
    with resp:
        mode = "wb"
        if resp.status == 206:
            match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "") or "")
            if not (start and match and int(match.group(1)) == start):
                part.unlink(missing_ok=True)
                raise _Transient(f"{archive.url} answered another range than asked for; starting over")
            mode = "ab"
        elif start:
            log.info("%s: the server sent the whole file; restarting %s", archive.url, part.name)
            start = 0
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else archive.size
        bar = tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=archive.file,
            disable=not cfg.progress, leave=False,
        )
        with part.open(mode) as fh, bar:
            while chunk := resp.read(cfg.chunk_bytes):
                fh.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Transient(f"{archive.url} closed the connection at {got} of {total} bytes")


def file_digest(path: Path | str, algorithm: str) -> str:
    """Hex digest of a file ("sha256", "md5", ...), read in chunks."""
    h = hashlib.new(algorithm)
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _published_checksum(
    archive: ArchiveSource, opener: urllib.request.OpenerDirector | None, cfg: FetchConfig
) -> tuple[str, str] | None:
    """(algorithm, hex digest) the publisher gives, from the sources file or else its md5 page."""
    if archive.sha256:
        return "sha256", archive.sha256.lower()
    if archive.md5:
        return "md5", archive.md5.lower()
    if archive.md5_url and opener is not None:
        def get() -> str:
            with opener.open(
                urllib.request.Request(archive.md5_url, headers={"User-Agent": USER_AGENT}), timeout=cfg.timeout_s
            ) as resp:
                return resp.read().decode("utf-8", "replace")

        text = _with_retries(get, archive.md5_url, cfg, _manual_hint(archive, cfg))
        words = text.split()
        if not words or not re.fullmatch(r"[0-9a-fA-F]{32}", words[0]):
            raise DownloadError(f"{archive.md5_url}: expected an md5 digest, got {text[:80]!r}")
        return "md5", words[0].lower()
    return None


def verify_file(path: Path, archive: ArchiveSource, checksum: tuple[str, str] | None) -> str:
    """Check size and checksum of a local archive; returns "algo:digest". Errors name the file."""
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        raise ChecksumError(f"{path}: {size} bytes, expected {archive.size} ({archive.file} from {archive.url})")
    if checksum is None:
        digest = file_digest(path, "sha256")
        log.warning("%s: no published checksum; checked its size only (sha256 %s, pin it in sources)", path, digest)
        return f"sha256:{digest}"
    algorithm, expected = checksum
    digest = file_digest(path, algorithm)
    if digest != expected:
        raise ChecksumError(f"{path}: {algorithm} {digest} does not match the published {expected} ({archive.url})")
    return f"{algorithm}:{digest}"


@dataclass
class FetchedArchive:
    """A verified archive on disk and the checksum it was verified with ("algo:digest")."""

    source: ArchiveSource
    path: Path
    checksum: str


def find_local(archive: ArchiveSource, cfg: FetchConfig) -> Path | None:
    """A finished copy in the manual folder or the download folder (first found), or None."""
    for folder in (cfg.manual_dir, cfg.archive_dir):
        if folder is not None and (folder / archive.file).is_file():
            return folder / archive.file
    return None


def fetch_archive(
    archive: ArchiveSource,
    cfg: FetchConfig,
    opener: urllib.request.OpenerDirector | None = None,
    homepage: str = "",
) -> FetchedArchive:
    """Return a verified copy of `archive`: a local one if present, else downloaded (resuming any .part)."""
    local = find_local(archive, cfg)
    if local is not None:
        log.info("using %s (found locally; verifying)", local)
        return FetchedArchive(archive, local, verify_file(local, archive, _published_checksum(archive, None, cfg)))
    opener = opener or urllib.request.build_opener()
    hint = _manual_hint(archive, cfg, homepage)
    cfg.archive_dir.mkdir(parents=True, exist_ok=True)
    final = cfg.archive_dir / archive.file
    part = final.with_name(final.name + PART_SUFFIX)
    checksum = _published_checksum(archive, opener, cfg)
    for fresh_start in (False, True):
        resumed = part.exists() and part.stat().st_size > 0
        if resumed:
            log.info("resuming %s from %d bytes", part, part.stat().st_size)
        else:
            log.info("downloading %s from %s", archive.file, archive.url)
        _with_retries(lambda: _download_once(opener, archive, part, cfg), archive.url, cfg, hint)
        try:
            digest = verify_file(part, archive, checksum)
        except ChecksumError as exc:
            part.unlink()
            if resumed and not fresh_start:
                # The kept prefix may come from another version of the file: one clean download decides.
                log.warning("%s after resuming; downloading %s again from the start", exc, archive.file)
                continue
            raise ChecksumError(f"{exc}; the bad download was deleted, run again to retry") from None
        os.replace(part, final)
        return FetchedArchive(archive, final, digest)
    raise AssertionError("unreachable")


def cityscapes_login(
    auth: AuthSource, credentials: Credentials, cfg: FetchConfig, hint: str = ""
) -> urllib.request.OpenerDirector:
    """Log in like cityscapesscripts' downloader; returns an opener holding the session cookie."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()), _NoRedirect())
    headers = {"User-Agent": USER_AGENT}

    def get_form() -> None:
        try:
            opener.open(urllib.request.Request(auth.login_url, headers=headers), timeout=cfg.timeout_s).close()
        except urllib.error.HTTPError as exc:
            if exc.code in _RETRY_STATUS:
                raise
            exc.close()  # a redirect here is fine: only the session cookie matters

    def post_form() -> int:
        form = urlencode({"username": credentials.username, "password": credentials.password, "submit": "Login"})
        req = urllib.request.Request(auth.login_url, data=form.encode(), headers=headers)
        try:
            with opener.open(req, timeout=cfg.timeout_s) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            if exc.code in _RETRY_STATUS:
                raise
            exc.close()
            return exc.code

    _with_retries(get_form, auth.login_url, cfg, hint)
    status = _with_retries(post_form, auth.login_url, cfg, hint)
    if status != 302:  # the site redirects after a good login and shows the form again otherwise
        raise CredentialsError(
            f"{auth.login_url}: login refused (HTTP {status}); check the account given by "
            f"{auth.username_env}/{auth.password_env} or the netrc entry for {auth.netrc_host} ({credentials.origin})"
        )
    log.info("logged in to %s (credentials from %s)", auth.login_url, credentials.origin or "caller")
    return opener


def fetch_archives(
    source: DatasetSource, cfg: FetchConfig, credentials: Credentials | None = None
) -> list[FetchedArchive]:
    """All archives of a dataset, verified; local copies are used first, then missing ones are downloaded.

    A dataset that needs an account raises CredentialsError before any network access when archives are
    missing and no credentials were given.
    """
    missing = [a for a in source.archives if find_local(a, cfg) is None]
    opener = None
    if missing and source.auth is not None:
        auth = source.auth
        files = ", ".join(a.file for a in missing)
        folder = cfg.manual_dir or cfg.archive_dir
        if credentials is None:
            raise CredentialsError(
                f"{files} must be downloaded from {source.homepage or auth.login_url} with an account: set "
                f"{auth.username_env} and {auth.password_env}, or add a line `machine {auth.netrc_host} login USER "
                f"password PASS` to ~/.netrc; or download them yourself and put them in {folder}"
            )
        hint = f"If this machine is offline, download {files} from {source.homepage} and put them in {folder}."
        opener = cityscapes_login(auth, credentials, cfg, hint)
    return [fetch_archive(a, cfg, opener, source.homepage) for a in source.archives]


# ----------------------------------------------------------------------------------------------- whole dataset


def download_dataset(
    name: str, source: DatasetSource, params: DownloadParams, credentials: Credentials | None = None
) -> VerifyReport:
    """Fetch, extract and verify dataset `name` into <params.out_dir>/<name>; returns the verification report.

    A folder already completed for `name` is verified again and kept. Nothing replaces the target unless the
    extracted copy passes verification.
    """
    target = params.out_dir / name
    expected = params.expected.get(name, source.expected)

    def verify(folder: Path) -> VerifyReport:
        return verify_dataset(folder, source.layout, expected, params.verify, source.known_size_mismatches)

    marker = read_marker(target)
    if marker is not None and marker.get("dataset") == name:
        log.info("%s is already in place (%s); verifying it again", name, target)
        return verify(target).raise_if_failed()
    fetched = fetch_archives(source, params.fetch, credentials)
    reports: list[VerifyReport] = []

    def check(folder: Path) -> None:
        reports.append(verify(folder).raise_if_failed())

    extract_into_place(
        [ArchivePart(f.path, f.source.subdir) for f in fetched],
        target,
        params.extract,
        check=check,
        marker={"dataset": name, "checksums": {f.path.name: f.checksum for f in fetched}},
    )
    if not params.keep_archives:
        for f in fetched:
            if f.path.parent == params.fetch.archive_dir:
                f.path.unlink()
    report = reports[-1]
    report.root = target
    log.info("%s in place at %s: pairs %s", name, target, report.counts)
    return report
