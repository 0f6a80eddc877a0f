"""Downloads against a loopback HTTP server serving fixture archives in the real layouts: full, resumed,
corrupted, retried, offline then manual, credentials (missing, wrong, never logged); without a published
checksum, what a misbehaving server sends (an HTML page, a wrong Content-Length, a connection closed early, a
redirect to a login page or to another host) is refused, moved aside and fetched again on the next run."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from fixture_archives import (
    cityscapes_archives,
    fake_unrar,
    gta5_archives,
    sha256,
    synthia_archive,
    write_sources,
)
from loopback import SESSION_COOKIE, Behaviour, LoopbackServer, closed_port_url

from plca.config import from_dict
from plca.data.download import (
    BAD_SUFFIX,
    PART_SUFFIX,
    ArchiveSource,
    AuthSource,
    BadArchiveError,
    ChecksumError,
    Credentials,
    CredentialsError,
    DownloadError,
    DownloadParams,
    FetchConfig,
    OfflineError,
    RedirectError,
    download_dataset,
    fetch_archive,
    fetch_archives,
    load_sources,
    resolve_credentials,
)
from plca.data.extract import ExtractConfig, is_complete, read_marker, staging_dir
from plca.data.verify import DatasetError, VerifyConfig

USER, PASSWORD = "alice@example.org", "s3cret-Pa55word"


@pytest.fixture(scope="module")
def gta5_zips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return gta5_archives(tmp_path_factory.mktemp("gta5"), n=4, parts=2)


@pytest.fixture(scope="module")
def cs_zips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return cityscapes_archives(tmp_path_factory.mktemp("cs"), train=2, val=1, test=1)


def fetch_cfg(tmp_path: Path, **kw: object) -> FetchConfig:
    base = dict(archive_dir=tmp_path / "archives", manual_dir=tmp_path / "manual", retries=2, backoff_s=0.01,
                backoff_max_s=0.02, timeout_s=5.0, chunk_bytes=4096, progress=False)
    base.update(kw)
    return FetchConfig(**base)  # type: ignore[arg-type]


def params(tmp_path: Path, **fetch_kw: object) -> DownloadParams:
    return DownloadParams(out_dir=tmp_path / "raw", fetch=fetch_cfg(tmp_path, **fetch_kw),
                          verify=VerifyConfig(workers=1))


def gta5_source(srv: LoopbackServer, zips: dict[str, bytes], checksums: bool = True) -> dict:
    return {
        "layout": "gta5",
        "homepage": srv.url("/from_games/"),
        "expected": {"all": 4},
        "archives": [
            {"file": name, "url": srv.url(f"/data/{name}"), "sha256": sha256(data) if checksums else None}
            for name, data in zips.items()
        ],
    }


def archive(srv: LoopbackServer, name: str, data: bytes, **kw: object) -> ArchiveSource:
    return ArchiveSource(file=name, url=srv.url(f"/data/{name}"), sha256=sha256(data), **kw)  # type: ignore[arg-type]


def test_packaged_sources_list_the_real_archives_and_counts() -> None:
    src = load_sources()
    assert set(src) == {"gta5", "synthia", "cityscapes"}
    assert src["gta5"].expected == {"all": 24966} and len(src["gta5"].archives) == 20
    assert {a.file for a in src["gta5"].archives} == {f"{i:02d}_{k}.zip" for i in range(1, 11)
                                                      for k in ("images", "labels")}
    assert src["synthia"].expected == {"all": 9400} and src["synthia"].archives[0].subdir == "RAND_CITYSCAPES"
    cs = src["cityscapes"]
    assert cs.expected == {"train": 2975, "val": 500} and cs.auth is not None
    assert {a.file: a.url[-1] for a in cs.archives} == {"gtFine_trainvaltest.zip": "1",
                                                        "leftImg8bit_trainvaltest.zip": "3"}
    assert all(a.md5 and len(a.md5) == 32 for a in cs.archives)


def test_full_download_extracts_and_verifies_gta5(tmp_path: Path, gta5_zips: dict[str, bytes]) -> None:
    with LoopbackServer(Behaviour(files={f"/data/{k}": v for k, v in gta5_zips.items()})) as srv:
        sources = load_sources(write_sources(tmp_path / "sources.yaml", {"gta5": gta5_source(srv, gta5_zips)}))
        report = download_dataset("gta5", sources["gta5"], params(tmp_path))
        assert sorted(srv.paths_requested()) == sorted(f"/data/{k}" for k in gta5_zips)
    target = tmp_path / "raw/gta5"
    assert report.ok and report.counts == {"all": 4} and report.root == target
    assert sorted(p.name for p in (target / "images").iterdir()) == ["00001.png", "00002.png", "00003.png",
                                                                      "00004.png"]
    assert is_complete(target) and read_marker(target)["checksums"]["01_images.zip"] == \
        f"sha256:{sha256(gta5_zips['01_images.zip'])}"
    for name, data in gta5_zips.items():
        assert (tmp_path / "archives" / name).read_bytes() == data
    assert not list((tmp_path / "archives").glob(f"*{PART_SUFFIX}"))
    # a second run finds the dataset in place and does not touch the network (the server is gone)
    again = download_dataset("gta5", sources["gta5"], params(tmp_path))
    assert again.counts == {"all": 4}


def test_resume_from_a_partial_download(tmp_path: Path, gta5_zips: dict[str, bytes]) -> None:
    data = gta5_zips["01_images.zip"]
    cfg = fetch_cfg(tmp_path)
    cfg.archive_dir.mkdir()
    half = len(data) // 2
    (cfg.archive_dir / f"01_images.zip{PART_SUFFIX}").write_bytes(data[:half])
    with LoopbackServer(Behaviour(files={"/data/01_images.zip": data})) as srv:
        got = fetch_archive(archive(srv, "01_images.zip", data), cfg)
        (_, _, headers), = srv.requests
    assert headers["Range"] == f"bytes={half}-"
    assert got.path.read_bytes() == data and got.checksum == f"sha256:{sha256(data)}"


def test_dropped_connection_is_resumed_on_retry(tmp_path: Path, gta5_zips: dict[str, bytes]) -> None:
    data = gta5_zips["01_labels.zip"]
    b = Behaviour(files={"/data/01_labels.zip": data}, cut_first={"/data/01_labels.zip": 1})
    with LoopbackServer(b) as srv:
        got = fetch_archive(archive(srv, "01_labels.zip", data), fetch_cfg(tmp_path))
        first, second = srv.requests
    assert "Range" not in first[2] and second[2]["Range"] == f"bytes={len(data) // 2}-"
    assert got.path.read_bytes() == data


def test_server_failing_twice_then_succeeding_is_retried(tmp_path: Path, gta5_zips: dict[str, bytes],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    data = gta5_zips["02_images.zip"]
    b = Behaviour(files={"/data/02_images.zip": data}, fail_first={"/data/02_images.zip": 2})
    with LoopbackServer(b) as srv, caplog.at_level(logging.WARNING, logger="plca.data.download"):
        got = fetch_archive(archive(srv, "02_images.zip", data), fetch_cfg(tmp_path, retries=2))
        assert len(srv.requests) == 3
    assert got.path.read_bytes() == data
    assert caplog.text.count("HTTP 503") == 2 and "retry 2/2" in caplog.text
    # one failure more than the retries allow: an error naming the URL and the manual folder
    b = Behaviour(files={"/data/02_images.zip": data}, fail_first={"/data/02_images.zip": 3})
    with LoopbackServer(b) as srv:
        src = archive(srv, "02_images.zip", data)
        with pytest.raises(DownloadError) as err:
            fetch_archive(src, fetch_cfg(tmp_path / "b", retries=2))
    assert src.url in str(err.value) and "gave up after 3 attempts" in str(err.value)
    assert str(tmp_path / "b/manual/02_images.zip") in str(err.value)


def test_corrupted_download_fails_its_checksum_naming_the_file(tmp_path: Path, gta5_zips: dict[str, bytes]) -> None:
    data = gta5_zips["01_images.zip"]
    bad = bytearray(data)
    bad[len(bad) // 3] ^= 0xFF
    cfg = fetch_cfg(tmp_path)
    with LoopbackServer(Behaviour(files={"/data/01_images.zip": bytes(bad)})) as srv:
        with pytest.raises(ChecksumError) as err:
            fetch_archive(archive(srv, "01_images.zip", data), cfg)
    part = cfg.archive_dir / f"01_images.zip{PART_SUFFIX}"
    assert str(err.value).startswith(f"{part}: sha256 {sha256(bytes(bad))} does not match the published "
                                     f"{sha256(data)}")
    bad_copy = cfg.archive_dir / f"01_images.zip{BAD_SUFFIX}"
    assert str(err.value).endswith(f"; moved it to {bad_copy}, and a rerun downloads it again")
    assert not part.exists() and not (cfg.archive_dir / "01_images.zip").exists()
    assert bad_copy.read_bytes() == bytes(bad)


def test_corrupted_partial_file_is_downloaded_again_from_the_start(tmp_path: Path, gta5_zips: dict[str, bytes],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    data = gta5_zips["01_images.zip"]
    cfg = fetch_cfg(tmp_path)
    cfg.archive_dir.mkdir()
    (cfg.archive_dir / f"01_images.zip{PART_SUFFIX}").write_bytes(b"\0" * 100)  # not the file's first bytes
    with LoopbackServer(Behaviour(files={"/data/01_images.zip": data})) as srv, caplog.at_level(logging.WARNING):
        got = fetch_archive(archive(srv, "01_images.zip", data), cfg)
        assert [h.get("Range") for _, _, h in srv.requests] == ["bytes=100-", None]
    assert got.path.read_bytes() == data and "downloading 01_images.zip again from the start" in caplog.text


def test_whole_part_file_and_server_ignoring_range(tmp_path: Path, gta5_zips: dict[str, bytes]) -> None:
    data = gta5_zips["02_labels.zip"]
    cfg = fetch_cfg(tmp_path)
    cfg.archive_dir.mkdir()
    part = cfg.archive_dir / f"02_labels.zip{PART_SUFFIX}"
    part.write_bytes(data)  # finished but never renamed: the server answers 416 for the range past its end
    with LoopbackServer(Behaviour(files={"/data/02_labels.zip": data})) as srv:
        assert fetch_archive(archive(srv, "02_labels.zip", data), cfg).path.read_bytes() == data
        assert len(srv.requests) == 1
    part.write_bytes(data[:50])
    (cfg.archive_dir / "02_labels.zip").unlink()
    with LoopbackServer(Behaviour(files={"/data/02_labels.zip": data}, ignore_range=True)) as srv:
        assert fetch_archive(archive(srv, "02_labels.zip", data), cfg).path.read_bytes() == data


def test_missing_file_is_not_retried(tmp_path: Path) -> None:
    with LoopbackServer() as srv:
        src = ArchiveSource(file="01_images.zip", url=srv.url("/data/01_images.zip"))
        with pytest.raises(DownloadError, match=r"/data/01_images.zip: HTTP 404"):
            fetch_archive(src, fetch_cfg(tmp_path))
        assert len(srv.requests) == 1


def test_offline_names_the_url_and_manual_folder_then_uses_a_manual_copy(tmp_path: Path,
                                                                         gta5_zips: dict[str, bytes]) -> None:
    data = gta5_zips["01_labels.zip"]
    src = ArchiveSource(file="01_labels.zip", url=closed_port_url("/data/01_labels.zip"), sha256=sha256(data))
    cfg = fetch_cfg(tmp_path, retries=1)
    with pytest.raises(OfflineError) as err:
        fetch_archive(src, cfg)
    msg = str(err.value)
    assert src.url in msg and "Connection refused" in msg and "gave up after 2 attempts" in msg
    assert f"put it at {tmp_path / 'manual/01_labels.zip'} or {tmp_path / 'archives/01_labels.zip'}" in msg
    # a wrong manual copy is refused by name and left alone; the right one is verified and used, still offline
    cfg.manual_dir.mkdir()
    (cfg.manual_dir / "01_labels.zip").write_bytes(data[:-1] + b"!")
    with pytest.raises(ChecksumError, match=str(cfg.manual_dir / "01_labels.zip")):
        fetch_archive(src, cfg)
    assert (cfg.manual_dir / "01_labels.zip").exists()
    (cfg.manual_dir / "01_labels.zip").write_bytes(data)
    got = fetch_archive(src, cfg)
    assert got.path == cfg.manual_dir / "01_labels.zip" and got.checksum == f"sha256:{sha256(data)}"


def test_offline_dataset_download_from_manual_archives(tmp_path: Path, gta5_zips: dict[str, bytes]) -> None:
    spec = {"layout": "gta5", "expected": {"all": 4},
            "archives": [{"file": k, "url": closed_port_url(f"/{k}"), "sha256": sha256(v)} for k, v in
                         gta5_zips.items()]}
    sources = load_sources(write_sources(tmp_path / "s.yaml", {"gta5": spec}))
    p = params(tmp_path, retries=0)
    with pytest.raises(OfflineError, match="01_images.zip"):
        download_dataset("gta5", sources["gta5"], p)
    assert not (tmp_path / "raw/gta5").exists()
    p.fetch.manual_dir.mkdir()
    for name, data in gta5_zips.items():
        (p.fetch.manual_dir / name).write_bytes(data)
    assert download_dataset("gta5", sources["gta5"], p).counts == {"all": 4}


def test_without_published_checksum_the_size_is_checked_and_sha256_logged(
    tmp_path: Path, gta5_zips: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    data = gta5_zips["01_images.zip"]
    with LoopbackServer(Behaviour(files={"/data/01_images.zip": data})) as srv, caplog.at_level(logging.WARNING):
        src = ArchiveSource(file="01_images.zip", url=srv.url("/data/01_images.zip"))
        got = fetch_archive(src, fetch_cfg(tmp_path))
        assert (f"no published checksum; checked its size and its contents as a zip archive (sha256 {sha256(data)}"
                in caplog.text)
        wrong_size = ArchiveSource(file="x.zip", url=srv.url("/data/01_images.zip"), size=len(data) + 1)
        with pytest.raises(ChecksumError, match=f"{len(data)} bytes, expected {len(data) + 1}"):
            fetch_archive(wrong_size, fetch_cfg(tmp_path / "b"))
    assert got.checksum == f"sha256:{sha256(data)}"


def test_wrong_layout_is_caught_before_the_dataset_is_put_in_place(tmp_path: Path,
                                                                   gta5_zips: dict[str, bytes]) -> None:
    only_images = {k: v for k, v in gta5_zips.items() if "images" in k}
    with LoopbackServer(Behaviour(files={f"/data/{k}": v for k, v in only_images.items()})) as srv:
        sources = load_sources(write_sources(tmp_path / "s.yaml", {"gta5": gta5_source(srv, only_images)}))
        with pytest.raises(DatasetError, match=r"labels: folder missing"):
            download_dataset("gta5", sources["gta5"], params(tmp_path))
    assert not (tmp_path / "raw/gta5").exists() and not staging_dir(tmp_path / "raw/gta5").exists()


def test_malicious_archive_is_refused_naming_the_member(tmp_path: Path, gta5_zips: dict[str, bytes]) -> None:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("images/00001.png", b"x")
        zf.writestr(zipfile.ZipInfo("../../escaped.txt"), b"pwned")
    evil = buf.getvalue()
    with LoopbackServer(Behaviour(files={"/data/01_images.zip": evil})) as srv:
        spec = gta5_source(srv, {"01_images.zip": evil})
        sources = load_sources(write_sources(tmp_path / "s.yaml", {"gta5": spec}))
        with pytest.raises(Exception, match=r"'../../escaped.txt' would land outside the target folder"):
            download_dataset("gta5", sources["gta5"], params(tmp_path))
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "raw/gta5").exists()


def test_synthia_rar_through_the_extractor(tmp_path: Path) -> None:
    rar = synthia_archive(tmp_path / "src", n=3)
    (name, data), = rar.items()
    with LoopbackServer(Behaviour(files={f"/{name}": data})) as srv:
        spec = {"layout": "synthia", "expected": {"all": 3},
                "archives": [{"file": name, "url": srv.url(f"/{name}"), "subdir": "RAND_CITYSCAPES"}]}
        sources = load_sources(write_sources(tmp_path / "s.yaml", {"synthia": spec}))
        p = params(tmp_path)
        p.extract = ExtractConfig(rar_tools=[str(fake_unrar(tmp_path / "bin"))])
        report = download_dataset("synthia", sources["synthia"], p)
    assert report.counts == {"all": 3}
    assert sorted(p.name for p in (tmp_path / "raw/synthia/GT/LABELS").iterdir()) == [
        "0000000.png", "0000001.png", "0000002.png"]


# ------------------------------------------------------------------- no published checksum: what servers send

ERROR_PAGE = (b"<!DOCTYPE html>\n<html><head><title>503 Service Unavailable</title></head>\n"
              b"<body><h1>Service Unavailable</h1></body></html>\n")
FAULTY = "/data/01_images.zip"


def _html_page(b: Behaviour, srv: LoopbackServer, data: bytes) -> None:
    b.html_pages[FAULTY] = ERROR_PAGE


def _short_content_length(b: Behaviour, srv: LoopbackServer, data: bytes) -> None:
    b.wrong_length[FAULTY] = len(data) // 2


def _closed_early(b: Behaviour, srv: LoopbackServer, data: bytes) -> None:
    b.close_early[FAULTY] = len(data) // 2


def _login_redirect(b: Behaviour, srv: LoopbackServer, data: bytes) -> None:
    b.redirects[FAULTY] = f"/login/?next={FAULTY}"


SERVER_FAULTS = {
    # what the server does -> what the error must say
    "html page with 200": (_html_page, r"the server sent an HTML page \(a login or error page\?\) titled "
                                       r"'503 Service Unavailable', not the archive 01_images.zip"),
    "content-length shorter than the body": (_short_content_length, r"starts like a zip archive, but its end "
                                                                    r"\(the central directory\) is missing"),
    "connection closed early": (_closed_early, r"starts like a zip archive, but its end \(the central directory\) "
                                               r"is missing or damaged: cut short\?"),
    "redirect to a login page": (_login_redirect, r"the server sent an HTML page \(a login or error page\?\) titled "
                                                  r"'Login'.* \(the request was redirected to http://127.0.0.1:\d+"
                                                  r"/login/\?next=/data/01_images.zip\)"),
}


@pytest.mark.parametrize("fault", list(SERVER_FAULTS))
def test_without_checksum_a_bad_body_is_refused_moved_aside_and_fetched_again(
    tmp_path: Path, gta5_zips: dict[str, bytes], fault: str
) -> None:
    # Fault A: each of these was kept as 01_images.zip; prepare then failed with "not a zip, tar or rar archive"
    # and every rerun reused the bad file without a request and without saying to delete it.
    make_fault, message = SERVER_FAULTS[fault]
    data = gta5_zips["01_images.zip"]
    b = Behaviour(files={f"/data/{k}": v for k, v in gta5_zips.items()})
    p = params(tmp_path)
    archives = p.fetch.archive_dir
    with LoopbackServer(b) as srv:
        make_fault(b, srv, data)
        sources = load_sources(write_sources(tmp_path / "s.yaml", {"gta5": gta5_source(srv, gta5_zips, False)}))
        with pytest.raises(BadArchiveError, match=message) as err:
            download_dataset("gta5", sources["gta5"], p)
        bad = archives / f"01_images.zip{BAD_SUFFIX}"
        assert str(err.value).startswith(str(archives / f"01_images.zip{PART_SUFFIX}"))
        assert str(err.value).endswith(f"; moved it to {bad}, and a rerun downloads it again")
        assert bad.is_file() and bad.read_bytes() != data
        assert not (archives / "01_images.zip").exists() and not (tmp_path / "raw/gta5").exists()
        # the server mends its ways: the rerun downloads the archive again and the dataset is put in place
        b.html_pages.clear(), b.wrong_length.clear(), b.close_early.clear(), b.redirects.clear()
        before = srv.paths_requested().count(FAULTY)
        assert download_dataset("gta5", sources["gta5"], p).counts == {"all": 4}
        assert srv.paths_requested().count(FAULTY) == before + 1
    assert (archives / "01_images.zip").read_bytes() == data


def test_redirect_to_another_host_is_refused_unless_the_sources_allow_it(tmp_path: Path,
                                                                          gta5_zips: dict[str, bytes]) -> None:
    # Fault A: a redirect to another host was followed silently
    data = gta5_zips["01_images.zip"]
    b = Behaviour(files={f"/data/{k}": v for k, v in gta5_zips.items()} | {"/cdn/01_images.zip": data})
    with LoopbackServer(b) as srv:
        b.redirects[FAULTY] = srv.url("/cdn/01_images.zip", host="localhost")  # the same server, another host name
        spec = gta5_source(srv, gta5_zips, False)
        sources = load_sources(write_sources(tmp_path / "s.yaml", {"gta5": spec}))
        p = params(tmp_path)
        with pytest.raises(RedirectError) as err:
            download_dataset("gta5", sources["gta5"], p)
        msg = str(err.value)
        assert msg.startswith(f"{srv.url(FAULTY)}: the server redirected (HTTP 302) to {b.redirects[FAULTY]}")
        assert "on another host (127.0.0.1 -> localhost); refusing to follow it" in msg
        assert "add it to the dataset's allow_redirect_hosts in the sources file" in msg
        assert "/cdn/01_images.zip" not in srv.paths_requested()
        assert not list(p.fetch.archive_dir.glob("01_images.zip*"))
        # listed in the dataset's entry, the host is allowed
        spec["allow_redirect_hosts"] = ["localhost"]
        sources = load_sources(write_sources(tmp_path / "s.yaml", {"gta5": spec}))
        assert download_dataset("gta5", sources["gta5"], p).counts == {"all": 4}
        assert "/cdn/01_images.zip" in srv.paths_requested()
    assert (p.fetch.archive_dir / "01_images.zip").read_bytes() == data


def test_redirect_within_the_host_is_followed(tmp_path: Path, gta5_zips: dict[str, bytes]) -> None:
    data = gta5_zips["01_images.zip"]
    b = Behaviour(files={"/mirror/01_images.zip": data}, redirects={FAULTY: "/mirror/01_images.zip"})
    with LoopbackServer(b) as srv:
        got = fetch_archive(ArchiveSource(file="01_images.zip", url=srv.url(FAULTY)), fetch_cfg(tmp_path))
        assert srv.paths_requested() == [FAULTY, "/mirror/01_images.zip"]
    assert got.path.read_bytes() == data


def test_content_length_longer_than_the_body_is_never_kept(tmp_path: Path, gta5_zips: dict[str, bytes]) -> None:
    data = gta5_zips["01_images.zip"]
    b = Behaviour(files={FAULTY: data}, wrong_length={FAULTY: len(data) + 1000})
    cfg = fetch_cfg(tmp_path, retries=1)
    with LoopbackServer(b) as srv:
        src = ArchiveSource(file="01_images.zip", url=srv.url(FAULTY))
        with pytest.raises(DownloadError, match=rf"closed the connection at {len(data)} of the {len(data) + 1000} "
                                                r"bytes its Content-Length announced \(gave up after 2 attempts\)"):
            fetch_archive(src, cfg)
        assert not (cfg.archive_dir / "01_images.zip").exists()
        b.wrong_length.clear()  # the next run resumes the part (here: already whole)
        assert fetch_archive(src, cfg).path.read_bytes() == data


@pytest.mark.parametrize(
    ("left", "why"),
    [(ERROR_PAGE, r"the server sent an HTML page \(a login or error page\?\)"),
     (b"PK\x03\x04" + b"\0" * 200, r"starts like a zip archive, but its end")],
)
def test_bad_archive_left_by_an_earlier_run_is_moved_aside_and_fetched_again(
    tmp_path: Path, gta5_zips: dict[str, bytes], caplog: pytest.LogCaptureFixture, left: bytes, why: str
) -> None:
    # Fault A: a bad file kept by an earlier run was reused on every rerun, without a request
    p = params(tmp_path)
    p.fetch.archive_dir.mkdir(parents=True)
    (p.fetch.archive_dir / "01_images.zip").write_bytes(left)
    with LoopbackServer(Behaviour(files={f"/data/{k}": v for k, v in gta5_zips.items()})) as srv, \
            caplog.at_level(logging.WARNING, logger="plca.data.download"):
        sources = load_sources(write_sources(tmp_path / "s.yaml", {"gta5": gta5_source(srv, gta5_zips, False)}))
        assert download_dataset("gta5", sources["gta5"], p).counts == {"all": 4}
        assert FAULTY in srv.paths_requested()
    bad = p.fetch.archive_dir / f"01_images.zip{BAD_SUFFIX}"
    assert bad.read_bytes() == left
    assert (p.fetch.archive_dir / "01_images.zip").read_bytes() == gta5_zips["01_images.zip"]
    assert re.search(why, caplog.text)
    assert f"this copy from an earlier run was moved to {bad}, downloading 01_images.zip again" in caplog.text


def test_bad_manual_copy_without_checksum_is_an_error_naming_it_and_left_alone(
    tmp_path: Path, gta5_zips: dict[str, bytes]
) -> None:
    cfg = fetch_cfg(tmp_path)
    cfg.manual_dir.mkdir()
    manual = cfg.manual_dir / "01_images.zip"
    manual.write_bytes(gta5_zips["01_images.zip"][:-100])  # a browser download cut short
    with LoopbackServer(Behaviour(files={FAULTY: gta5_zips["01_images.zip"]})) as srv:
        with pytest.raises(BadArchiveError) as err:
            fetch_archive(ArchiveSource(file="01_images.zip", url=srv.url(FAULTY)), cfg)
        assert srv.requests == []
    msg = str(err.value)
    assert msg.startswith(f"{manual}: starts like a zip archive") and "This manual copy is left as it is" in msg
    assert manual.read_bytes() == gta5_zips["01_images.zip"][:-100]


def test_html_page_with_a_published_checksum_says_what_was_sent(tmp_path: Path,
                                                                gta5_zips: dict[str, bytes]) -> None:
    data = gta5_zips["01_images.zip"]
    with LoopbackServer(Behaviour(html_pages={FAULTY: ERROR_PAGE})) as srv:
        with pytest.raises(ChecksumError, match=r"does not match the published .*; the server sent an HTML page "
                                                r"\(a login or error page\?\) titled '503 Service Unavailable'"):
            fetch_archive(archive(srv, "01_images.zip", data), fetch_cfg(tmp_path))


def test_text_body_without_checksum_is_refused_quoting_it(tmp_path: Path) -> None:
    cfg = fetch_cfg(tmp_path)
    with LoopbackServer(Behaviour(files={FAULTY: b"Download quota exceeded, try again tomorrow\n"})) as srv:
        with pytest.raises(BadArchiveError, match=r"01_images.zip.part: the server sent text \('Download quota "
                                                  r"exceeded, try again tomorrow'\), not the archive 01_images.zip"):
            fetch_archive(ArchiveSource(file="01_images.zip", url=srv.url(FAULTY)), cfg)
    assert (cfg.archive_dir / f"01_images.zip{BAD_SUFFIX}").is_file()


@pytest.mark.parametrize("fault", ["html page with 200", "connection closed early"])
def test_synthia_rar_without_checksum_is_checked_before_it_is_kept(tmp_path: Path, fault: str) -> None:
    rar = synthia_archive(tmp_path / "src", n=3)
    (name, data), = rar.items()
    path = f"/{name}"
    b = Behaviour(files={path: data})
    if fault == "html page with 200":
        b.html_pages[path] = ERROR_PAGE
        message = r"the server sent an HTML page \(a login or error page\?\)"
    else:
        b.close_early[path] = len(data) // 2
        message = r"SYNTHIA_RAND_CITYSCAPES.rar.part: unrar cannot list it \(damaged, cut short"
    with LoopbackServer(b) as srv:
        spec = {"layout": "synthia", "expected": {"all": 3},
                "archives": [{"file": name, "url": srv.url(path), "subdir": "RAND_CITYSCAPES"}]}
        sources = load_sources(write_sources(tmp_path / "s.yaml", {"synthia": spec}))
        p = params(tmp_path)
        p.extract = ExtractConfig(rar_tools=[str(fake_unrar(tmp_path / "bin"))])
        with pytest.raises(BadArchiveError, match=message):
            download_dataset("synthia", sources["synthia"], p)
        assert (p.fetch.archive_dir / f"{name}{BAD_SUFFIX}").is_file()
        b.html_pages.clear(), b.close_early.clear()
        assert download_dataset("synthia", sources["synthia"], p).counts == {"all": 3}


# ------------------------------------------------------------------------------------------------ Cityscapes


def cs_behaviour(zips: dict[str, bytes]) -> Behaviour:
    return Behaviour(
        files={"/file-handling/?packageID=1": zips["gtFine_trainvaltest.zip"],
               "/file-handling/?packageID=3": zips["leftImg8bit_trainvaltest.zip"],
               "/md5-sum/?packageID=3": b"%s  leftImg8bit_trainvaltest.zip\n" % __import__("hashlib").md5(
                   zips["leftImg8bit_trainvaltest.zip"]).hexdigest().encode()},
        login_user=USER, login_password=PASSWORD)


def cs_spec(srv: LoopbackServer, zips: dict[str, bytes]) -> dict:
    import hashlib

    return {
        "layout": "cityscapes", "homepage": srv.url("/downloads/"), "expected": {"train": 2, "val": 1},
        "auth": {"kind": "cityscapes", "login_url": srv.url("/login/"), "netrc_host": "127.0.0.1",
                 "username_env": "CITYSCAPES_USERNAME", "password_env": "CITYSCAPES_PASSWORD"},
        "archives": [
            {"file": "gtFine_trainvaltest.zip", "url": srv.url("/file-handling/?packageID=1"),
             "md5": hashlib.md5(zips["gtFine_trainvaltest.zip"]).hexdigest()},
            # no md5 in the file: it is read from the site's md5 page, as cityscapesscripts does
            {"file": "leftImg8bit_trainvaltest.zip", "url": srv.url("/file-handling/?packageID=3"),
             "md5_url": srv.url("/md5-sum/?packageID=3")},
        ],
    }


def test_missing_cityscapes_credentials_fail_before_any_network_access(tmp_path: Path,
                                                                       cs_zips: dict[str, bytes]) -> None:
    with LoopbackServer(cs_behaviour(cs_zips)) as srv:
        source = from_dict_source(cs_spec(srv, cs_zips))
        creds = resolve_credentials(source.auth, {}, tmp_path / "no-netrc")
        assert creds is None
        with pytest.raises(CredentialsError) as err:
            fetch_archives(source, fetch_cfg(tmp_path), creds)
        assert srv.requests == []
    msg = str(err.value)
    assert "CITYSCAPES_USERNAME" in msg and "CITYSCAPES_PASSWORD" in msg and "netrc" in msg
    assert "gtFine_trainvaltest.zip, leftImg8bit_trainvaltest.zip" in msg and str(tmp_path / "manual") in msg


def from_dict_source(spec: dict):  # noqa: ANN201
    from plca.data.download import DatasetSource

    return from_dict(DatasetSource, spec, "test")


def test_cityscapes_login_download_and_credentials_never_leak(
    tmp_path: Path, cs_zips: dict[str, bytes], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    with LoopbackServer(cs_behaviour(cs_zips)) as srv, caplog.at_level(logging.DEBUG):
        source = from_dict_source(cs_spec(srv, cs_zips))
        env = {"CITYSCAPES_USERNAME": USER, "CITYSCAPES_PASSWORD": PASSWORD}
        creds = resolve_credentials(source.auth, env)
        assert creds == Credentials(USER, PASSWORD, "environment")
        assert USER not in repr(creds) and PASSWORD not in repr(creds)
        p = DownloadParams(out_dir=tmp_path / "raw", fetch=fetch_cfg(tmp_path, progress=True),
                           verify=VerifyConfig(workers=1))
        report = download_dataset("cityscapes", source, p, creds)
        methods = [(m, path) for m, path, _ in srv.requests]
        file_requests = [h for _, path, h in srv.requests if path.startswith("/file-handling")]
    assert report.counts == {"train": 2, "val": 1}
    assert methods[:2] == [("GET", "/login/"), ("POST", "/login/")]
    assert all(SESSION_COOKIE in h.get("Cookie", "") for h in file_requests) and len(file_requests) == 2
    assert srv.posted and USER.encode().replace(b"@", b"%40") in srv.posted[0]  # the form did carry them
    assert (tmp_path / "raw/cityscapes/gtFine/train").is_dir() and (tmp_path / "raw/cityscapes/license.txt").is_file()
    out = capsys.readouterr()
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "raw").rglob("*.json"))
    for secret in (USER, PASSWORD, PASSWORD.replace("-", "%2D")):
        assert secret not in caplog.text and secret not in out.out and secret not in out.err
        assert secret not in written


def test_wrong_cityscapes_password_is_a_clear_error_without_secrets(tmp_path: Path, cs_zips: dict[str, bytes],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    with LoopbackServer(cs_behaviour(cs_zips)) as srv, caplog.at_level(logging.DEBUG):
        source = from_dict_source(cs_spec(srv, cs_zips))
        with pytest.raises(CredentialsError) as err:
            fetch_archives(source, fetch_cfg(tmp_path), Credentials(USER, "wrong-password", "environment"))
        assert not any(path.startswith("/file-handling") for _, path, _ in srv.requests)
    assert "login refused (HTTP 200)" in str(err.value) and "CITYSCAPES_USERNAME" in str(err.value)
    for secret in (USER, "wrong-password"):
        assert secret not in str(err.value) and secret not in caplog.text


def test_cityscapes_offline_login_names_the_url_and_the_manual_folder(tmp_path: Path,
                                                                      cs_zips: dict[str, bytes]) -> None:
    with LoopbackServer(cs_behaviour(cs_zips)) as srv:
        spec = cs_spec(srv, cs_zips)
    spec["auth"]["login_url"] = closed_port_url("/login")
    with pytest.raises(OfflineError) as err:
        fetch_archives(from_dict_source(spec), fetch_cfg(tmp_path, retries=0), Credentials(USER, PASSWORD))
    msg = str(err.value)
    assert spec["auth"]["login_url"] in msg and str(tmp_path / "manual") in msg
    assert "gtFine_trainvaltest.zip, leftImg8bit_trainvaltest.zip" in msg and USER not in msg


def test_cityscapes_archives_in_the_manual_folder_need_no_account(tmp_path: Path, cs_zips: dict[str, bytes]) -> None:
    with LoopbackServer(cs_behaviour(cs_zips)) as srv:
        spec = cs_spec(srv, cs_zips)
    import hashlib

    spec["archives"][1]["md5"] = hashlib.md5(cs_zips["leftImg8bit_trainvaltest.zip"]).hexdigest()
    source = from_dict_source(spec)
    p = params(tmp_path)
    p.fetch.manual_dir.mkdir()
    for name, data in cs_zips.items():
        (p.fetch.manual_dir / name).write_bytes(data)
    report = download_dataset("cityscapes", source, p, credentials=None)
    assert report.counts == {"train": 2, "val": 1}


def test_credentials_from_a_netrc_file(tmp_path: Path) -> None:
    auth = AuthSource("cityscapes", "https://x/login/", "www.cityscapes-dataset.com", "CS_U", "CS_P")
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text(f"machine www.cityscapes-dataset.com login {USER} password {PASSWORD}\n")
    netrc_file.chmod(0o600)
    assert resolve_credentials(auth, {}, netrc_file) == Credentials(USER, PASSWORD, str(netrc_file))
    # the environment wins; one variable alone is not enough
    assert resolve_credentials(auth, {"CS_U": "u", "CS_P": "p"}, netrc_file) == Credentials("u", "p", "environment")
    assert resolve_credentials(auth, {"CS_U": "u"}, netrc_file).origin == str(netrc_file)
    netrc_file.write_text(f"machine other.host login {USER} password {PASSWORD}\n")
    assert resolve_credentials(auth, {}, netrc_file) is None
    netrc_file.write_text(f"machine www.cityscapes-dataset.com login {USER} password {PASSWORD} bogus\n")
    with pytest.raises(CredentialsError) as err:
        resolve_credentials(auth, {}, netrc_file)
    assert "cannot parse" in str(err.value) and PASSWORD not in str(err.value) and USER not in str(err.value)
