"""Download of the real benchmarks: fetch archives, resume, retry, verify checksums, extract and check in place.

URLs, checksums and expected counts live in `sources.yaml` (next to this file; another file of the same schema
can be passed). Archives are fetched over HTTP(S) with the standard library: a partial download is kept as
`<file>.part` and resumed with an HTTP Range request, transient failures are retried with exponential backoff,
and a finished file is checked against the publisher's checksum (sha256 or md5) before it takes its final name.
Where no checksum is published (GTA5, SYNTHIA), the file is checked instead: its length against the server's
Content-Length, that it is not an HTML or text page (a login or error page served with 200), and that it is a
whole archive (plca.data.extract.check_archive: zip CRCs, a tar listing read to its end, a RAR signature and
listing). A download that fails is moved aside to `<file>.bad`, with an error saying what was wrong and that a
rerun downloads it again. An archive found in the manual folder or the download folder is verified the same way
and used without any network access; one in the download folder that fails (left by an earlier run) is moved
aside and downloaded again, one in the manual folder is an error naming it (that folder is never written to).
When the network cannot be reached the error names the URL and where to put a manually downloaded copy.

Redirects are followed within the host asked for; a redirect to another host is refused with an error naming
both hosts, unless the dataset's `allow_redirect_hosts` in the sources file lists it (a publisher's CDN).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlencode, urlsplit

from tqdm import tqdm

from plca.config import from_dict, load_yaml
from plca.data.extract import (
    ArchiveError,
    ArchivePart,
    ExtractConfig,
    check_archive,
    extract_into_place,
    read_marker,
)
from plca.data.verify import VerifyConfig, VerifyReport, verify_dataset

log = logging.getLogger(__name__)

#: The packaged sources file (URLs, checksums, expected counts).
DEFAULT_SOURCES = Path(__file__).with_name("sources.yaml")
PART_SUFFIX = ".part"
#: A download (or a download folder's copy) that failed its checks is moved to `<file>.bad`, replacing an older one.
BAD_SUFFIX = ".bad"
USER_AGENT = "plca-downloader/1 (python-urllib)"
_HASH_CHUNK = 1 << 20
# HTTP statuses worth retrying: the server or a proxy is busy or timed out.
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_CONTENT_RANGE_UNSATISFIED = re.compile(r"bytes \*/(\d+)")
# Tags that mark the start of a file as an HTML page (a login or error page) rather than an archive.
_HTML_TAGS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<title", b"<form", b"<script", b"<meta")
_TITLE = re.compile(rb"<title[^>]*>\s*([^<]{1,120})", re.IGNORECASE)

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


class BadArchiveError(DownloadError):
    """A file without a published checksum is not a whole archive: an HTML or text page, cut short, unreadable."""


class RedirectError(DownloadError):
    """The server redirected to another host, which the dataset's sources entry does not allow."""


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
    #: Hosts the archives' URLs may redirect to ("cdn.example.org", or "*.example.org" for its subdomains);
    #: a redirect to any other host than the one asked for is refused.
    allow_redirect_hosts: list[str] = field(default_factory=list)


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


def _host_allowed(host: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        pattern = pattern.lower()
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class _SameHostRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects within the host first asked for, and to the allowed hosts only; refuse others."""

    def __init__(self, allow_hosts: Sequence[str] = ()) -> None:
        self.allow_hosts = tuple(allow_hosts)

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        origin = req.origin_req_host.lower()  # the host of the chain's first request (kept across redirects)
        host = (urlsplit(newurl).hostname or "").lower()
        if host != origin and not _host_allowed(host, self.allow_hosts):
            fp.close()
            raise RedirectError(
                f"{req.full_url}: the server redirected (HTTP {code}) to {newurl}, on another host ({origin} -> "
                f"{host}); refusing to follow it. If {host} is where the publisher keeps its files (a mirror or "
                "CDN), add it to the dataset's allow_redirect_hosts in the sources file"
            )
        log.info("%s redirected (HTTP %d) to %s", req.full_url, code, newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def public_opener(allow_redirect_hosts: Sequence[str] = ()) -> urllib.request.OpenerDirector:
    """An opener for public downloads: redirects are followed within the host asked for and to
    `allow_redirect_hosts`; any other redirect raises RedirectError naming both hosts."""
    return urllib.request.build_opener(_SameHostRedirect(allow_redirect_hosts))


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


def _download_once(
    opener: urllib.request.OpenerDirector, archive: ArchiveSource, part: Path, cfg: FetchConfig
) -> str | None:
    """One attempt: continue `part` from its current size (Range) or start it over; raises _Transient.
    Returns the URL the body came from (after redirects), None when the part was already whole."""
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
                return None
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
        landed = resp.geturl()
        length = resp.headers.get("Content-Length")
        announced = start + int(length) if length and length.isdigit() else None
        total = announced if announced is not None else archive.size
        bar = tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=archive.file,
            disable=not cfg.progress, leave=False,
        )
        with part.open(mode) as fh, bar:
            while chunk := resp.read(cfg.chunk_bytes):
                fh.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if announced is not None and got != announced:
        raise _Transient(
            f"{archive.url} closed the connection at {got} of the {announced} bytes its Content-Length announced"
        )
    if total is not None and got < total:
        raise _Transient(f"{archive.url} closed the connection at {got} of {total} bytes")
    return landed


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


def _sniff_page(path: Path) -> str | None:
    """What the file is when its start reads as a web page or as text, else None: "an HTML page (a login or error
    page?) titled 'Login'", "text ('Quota exceeded')"."""
    with path.open("rb") as fh:
        head = fh.read(4096)
    lead = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if lead.startswith(b"<") and any(tag in lead for tag in _HTML_TAGS):
        title = _TITLE.search(head)
        named = f" titled {title.group(1).strip().decode('utf-8', 'replace')!r}" if title else ""
        return f"an HTML page (a login or error page?){named}"
    if head and b"\0" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if all(c.isprintable() or c in "\t\r\n" for c in text):
            return f"text ({text.strip().splitlines()[0][:80]!r})" if text.strip() else "blank text"
    return None


def _page_hint(path: Path) -> str:
    page = _sniff_page(path)
    return f"; the server sent {page}" if page else ""


def verify_file(
    path: Path, archive: ArchiveSource, checksum: tuple[str, str] | None, extract: ExtractConfig | None = None
) -> str:
    """Check size and checksum of a local archive; returns "algo:digest". Errors name the file.

    Without a published checksum the file is checked instead: not an HTML or text page, and a whole archive
    (check_archive, with `extract`'s RAR tools); such failures raise BadArchiveError.
    """
    if checksum is None:
        page = _sniff_page(path)
        if page:
            raise BadArchiveError(f"{path}: the server sent {page}, not the archive {archive.file} ({archive.url})")
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        raise ChecksumError(
            f"{path}: {size} bytes, expected {archive.size} ({archive.file} from {archive.url}){_page_hint(path)}"
        )
    if checksum is None:
        try:
            kind = check_archive(path, extract)
        except ArchiveError as exc:
            raise BadArchiveError(
                f"{exc} ({archive.file} from {archive.url}; no checksum is published, so it was checked as an "
                "archive)"
            ) from None
        digest = file_digest(path, "sha256")
        log.warning(
            "%s: no published checksum; checked its size and its contents as a %s archive (sha256 %s, pin it "
            "in sources)", path, kind, digest,
        )
        return f"sha256:{digest}"
    algorithm, expected = checksum
    digest = file_digest(path, algorithm)
    if digest != expected:
        raise ChecksumError(
            f"{path}: {algorithm} {digest} does not match the published {expected} ({archive.url}){_page_hint(path)}"
        )
    return f"{algorithm}:{digest}"


def _move_aside(path: Path, final: Path) -> Path:
    """Move a file that failed its checks to `<final>.bad` (replacing an older one) so no run reuses it."""
    bad = final.with_name(final.name + BAD_SUFFIX)
    os.replace(path, bad)
    return bad


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


def _verified_local(archive: ArchiveSource, cfg: FetchConfig, extract: ExtractConfig | None) -> FetchedArchive | None:
    """The local copy, verified; None when there is none, or when the download folder's copy failed (it is moved
    aside, to be downloaded again). A manual copy that fails is an error: that folder is never written to."""
    local = find_local(archive, cfg)
    if local is None:
        return None
    log.info("using %s (found locally; verifying)", local)
    try:
        return FetchedArchive(archive, local, verify_file(local, archive, _published_checksum(archive, None, cfg),
                                                          extract))
    except (ChecksumError, BadArchiveError) as exc:
        if local.parent != cfg.archive_dir:
            raise type(exc)(
                f"{exc}. This manual copy is left as it is: replace it with a whole copy, or remove it to have "
                "the archive downloaded"
            ) from None
        bad = _move_aside(local, local)
        log.warning("%s; this copy from an earlier run was moved to %s, downloading %s again", exc, bad, archive.file)
        return None


def _download(
    archive: ArchiveSource,
    cfg: FetchConfig,
    opener: urllib.request.OpenerDirector,
    homepage: str,
    extract: ExtractConfig | None,
) -> FetchedArchive:
    """Download `archive` into the download folder (resuming any .part) and verify it before it takes its name."""
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
        landed = _with_retries(lambda: _download_once(opener, archive, part, cfg), archive.url, cfg, hint)
        try:
            digest = verify_file(part, archive, checksum, extract)
        except (ChecksumError, BadArchiveError) as exc:
            if resumed and not fresh_start:
                # The kept prefix may come from another version of the file: one clean download decides.
                part.unlink()
                log.warning("%s after resuming; downloading %s again from the start", exc, archive.file)
                continue
            bad = _move_aside(part, final)
            via = f" (the request was redirected to {landed})" if landed and landed != archive.url else ""
            raise type(exc)(f"{exc}{via}; moved it to {bad}, and a rerun downloads it again") from None
        os.replace(part, final)
        return FetchedArchive(archive, final, digest)
    raise AssertionError("unreachable")


def fetch_archive(
    archive: ArchiveSource,
    cfg: FetchConfig,
    opener: urllib.request.OpenerDirector | None = None,
    homepage: str = "",
    extract: ExtractConfig | None = None,
    allow_redirect_hosts: Sequence[str] = (),
) -> FetchedArchive:
    """Return a verified copy of `archive`: a local one if present and good, else downloaded (resuming any .part).

    `extract` gives the RAR tools that check an archive without a published checksum; without `opener`, a
    public_opener(allow_redirect_hosts) is used.
    """
    local = _verified_local(archive, cfg, extract)
    if local is not None:
        return local
    return _download(archive, cfg, opener or public_opener(allow_redirect_hosts), homepage, extract)


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
    source: DatasetSource,
    cfg: FetchConfig,
    credentials: Credentials | None = None,
    extract: ExtractConfig | None = None,
) -> list[FetchedArchive]:
    """All archives of a dataset, verified; local copies are used first, then missing ones are downloaded.

    A dataset that needs an account raises CredentialsError before any network access when archives are
    missing and no credentials were given. A download folder's copy that fails verification counts as missing.
    """
    local = {a.file: _verified_local(a, cfg, extract) for a in source.archives}
    missing = [a for a in source.archives if local[a.file] is None]
    opener = public_opener(source.allow_redirect_hosts)
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
    return [local[a.file] or _download(a, cfg, opener, source.homepage, extract) for a in source.archives]


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
    fetched = fetch_archives(source, params.fetch, credentials, params.extract)
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
