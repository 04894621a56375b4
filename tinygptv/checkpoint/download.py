# Resumable HTTPS download of one file into a `.part` file (HTTP Range), with a progress bar, retries and a free-space
# check; and the sha256 of a file. Used by fetch.py for the release files that live outside the Hugging Face Hub.
# Data path: URL -> [download.py] -> <name>.part -> fetch.py verifies and renames it into place.
from __future__ import annotations

import hashlib
import http.client
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

CHUNK = 1 << 20
USER_AGENT = "tinygptv-fetch"
RETRY_WAIT_S = 2.0  # first wait before a retry; doubles per failure in a row, at most 30 s
# What a dropped connection or a stalled server looks like to urllib; each is retried from where the file stopped.
TRANSIENT = (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError, TimeoutError, socket.timeout,
             urllib.error.URLError)


class DownloadError(ValueError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def download_resumable(url: str, part: Path, *, retries: int = 3, timeout: float = 60.0, quiet: bool = False) -> int:
    """Append the rest of `url` to `part`, asking only for the bytes it lacks, and return the full size. A cut
    connection is retried up to `retries` times in a row (progress resets the count); Ctrl-C leaves `part` as it is,
    so the next call resumes it."""
    part.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            total = _continue(url, part, have, timeout, quiet)
        except TRANSIENT as e:
            failures = 0 if _grew(part, have) else failures + 1
            if failures > retries:
                raise DownloadError(f"{url}: download failed {failures} times in a row ({type(e).__name__}: {e}); "
                                    f"{part} keeps what arrived and the next run resumes it") from None
            time.sleep(min(RETRY_WAIT_S * 2 ** max(failures - 1, 0), 30.0))
            continue
        size = part.stat().st_size
        if total is None or size == total:
            return size
        failures = 0 if size > have else failures + 1  # the server closed early without an error: resume
        if failures > retries:
            raise DownloadError(f"{url}: the server keeps ending the file early ({size:,} of {total:,} bytes in "
                                f"{part}); run the command again to resume")


def _grew(part: Path, before: int) -> bool:
    return part.exists() and part.stat().st_size > before


def _continue(url: str, part: Path, have: int, timeout: float, quiet: bool) -> int | None:
    """One request for bytes `have`..end, appended to `part`. Returns the file's full size when the server says it."""
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part is complete, or longer than the file
            total = _total_from_range(e.headers.get("Content-Range"))
            if total == have:
                return total
            part.unlink()
            raise ConnectionResetError(f"{part} ({have:,} bytes) does not fit the file on the server; restarting")
        if e.code >= 500:  # the server's trouble, usually brief: retried
            raise ConnectionError(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    with response:
        if have and response.status == 206:
            start = _start_from_range(response.headers.get("Content-Range"))
            if start != have:
                raise DownloadError(f"{url}: asked for bytes from {have:,}, the server sent from {start}")
            total = _total_from_range(response.headers.get("Content-Range"))
            mode = "ab"
        else:  # a fresh download, or a server that ignores Range: start again from byte 0
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        if total is not None:
            _check_space(part.parent, total - have, url)
        _copy(response, part, mode, have, total, quiet)
    return total


def _copy(response, part: Path, mode: str, have: int, total: int | None, quiet: bool) -> None:
    with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=part.name.removesuffix(".part"), disable=quiet, leave=False) as bar:
        while block := response.read(CHUNK):
            f.write(block)
            bar.update(len(block))


def _start_from_range(value: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    return int(match.group(1)) if match else None


def _total_from_range(value: str | None) -> int | None:
    match = re.match(r"bytes (?:\d+-\d+|\*)/(\d+)", value or "")
    return int(match.group(1)) if match else None


def _check_space(folder: Path, needed: int, url: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DownloadError(f"{url}: needs {needed / 1e9:.2f} GB more in {folder}, which has {free / 1e9:.2f} GB free")
