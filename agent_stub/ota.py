"""The agent's half of OTA: verify, download, A/B install, self-test, commit or roll back.

Standalone (stdlib + cryptography; onnxruntime only through the default model self-test).
The client constructs one ``OtaManager`` and feeds it ``rollout.offer`` / ``rollout.cancel``
frames; the manager reports progress through the async ``report`` callback, which the client
turns into durable ``rollout.status`` frames.

Order of an offer (docs/rollouts.md):
  1. verify the manifest's Ed25519 signature with a trusted key (``key_id`` from ``welcome``)
     — else ``rejected`` / ``signature_invalid``; the manifest, not the offer, is trusted.
  2. ``acked``; download the URL to ``downloads/<execution>.part`` (urllib in a thread),
     ``downloading`` → check size and SHA-256 against the manifest — else ``rejected`` /
     ``digest_mismatch`` and nothing is installed; ``downloaded``.
  3. wait for the offer's ``window`` (install only inside it; a missed window is a retryable
     ``failed`` / ``window_missed`` so the server re-offers with the next window).
  4. ``installing``: unpack into the inactive slot (A/B per component), ``verifying``: run the
     self-test on the candidate, switch the active slot, run the install hook (e.g. hot-swap
     the model) and a short health window; ``committed``, or restore the previous slot and
     ``rolled_back``.

Crash safety: every phase is written to ``ota/journal.json`` (atomic replace) before it
starts. On start-up ``resume()`` finishes what can be finished and rolls back the rest:
a download waiting for its window is re-verified and continues; an install interrupted in
``installing``/``verifying`` restores the previous slot and reports ``rolled_back``
(``interrupted``); a commit already recorded is reported again. Outcomes are remembered
(``ota/done.json``) so a duplicate offer is answered with the same outcome, not re-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import urllib.request
import zipfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent_stub.protocol import b64d, rollout_error

log = logging.getLogger(__name__)

Report = Callable[[Any, str, int, "dict[str, Any] | None"], Awaitable[None]]
SelfTest = Callable[[Path, dict], bool]
# Called with the slot now active, or with None when a rollback leaves no installed version
# (back to what the agent shipped with).
InstallHook = Callable[["Path | None", dict], None]
HealthCheck = Callable[[], bool]

CHUNK = 1 << 16
DONE_KEEP = 100

# TEST HOOK, used only by tests/reliability/test_faults_agent.py: with AGENT_STUB_OTA_PAUSE_AT
# set to one of the points below, the agent writes the file named by
# AGENT_STUB_OTA_PAUSE_MARKER when an install reaches that point and then blocks there forever,
# so the test can SIGKILL it at exactly that moment. Unset (always, in production) it costs an
# environment lookup.
#   downloaded  the artifact is on disk, not yet verified
#   unpacking   the first file is written into the new slot, the others not yet
#   switched    the new slot is active and hot-swapped, the health window not yet passed
#   committed   the commit is journaled, not yet recorded as done nor reported
PAUSE_AT_ENV = "AGENT_STUB_OTA_PAUSE_AT"
PAUSE_MARKER_ENV = "AGENT_STUB_OTA_PAUSE_MARKER"


def _test_pause(point: str) -> None:
    if os.environ.get(PAUSE_AT_ENV) != point:
        return
    Path(os.environ[PAUSE_MARKER_ENV]).write_text(point)
    while True:
        time.sleep(3600)


class OfferRejected(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class InstallFailed(Exception):
    def __init__(self, code: str, detail: str, *, retryable: bool = False) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.retryable = retryable


def _write_json(path: Path, data: Any) -> None:
    """Atomic: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def verify_manifest(manifest: bytes, signature: bytes, key_id: str, trusted: Mapping[str, bytes]) -> dict:
    """The manifest as a dict if ``signature`` verifies with the trusted key ``key_id``."""
    public = trusted.get(key_id)
    if public is None:
        raise OfferRejected("signature_invalid", f"artifact key {key_id!r} is not trusted")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, manifest)
    except (InvalidSignature, ValueError):
        raise OfferRejected("signature_invalid", "the manifest signature does not verify") from None
    try:
        body = json.loads(manifest)
    except ValueError:
        raise OfferRejected("signature_invalid", "the signed manifest is not JSON") from None
    for field in ("name", "kind", "version", "sha256", "size"):
        if field not in body:
            raise OfferRejected("signature_invalid", f"the signed manifest has no {field}")
    return body


def default_model_self_test(slot: Path, manifest: dict) -> bool:
    """Load the candidate ONNX model from the slot (with its ``.json`` sidecar) and run the
    known-good / known-fault self-test of ``agent_stub.inference``."""
    from agent_stub.inference import AnomalyModel, ModelError

    models = sorted(slot.glob("*.onnx"))
    if not models:
        log.warning("OTA self-test: no .onnx file in %s", slot)
        return False
    try:
        return AnomalyModel(models[0]).self_test()
    except ModelError as exc:
        log.warning("OTA self-test: %s", exc)
        return False


@dataclass
class _Slots:
    """A/B slots of one component: ``<root>/<kind>/{A,B}`` and ``active.json``."""

    root: Path
    kind: str

    @property
    def base(self) -> Path:
        return self.root / self.kind

    def active(self) -> dict:
        return _read_json(self.base / "active.json", {})

    def set_active(self, record: dict) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        _write_json(self.base / "active.json", record)

    def inactive_name(self) -> str:
        return "B" if self.active().get("slot", "A") == "A" else "A"

    def path(self, name: str) -> Path:
        return self.base / name


class OtaManager:
    """Applies rollout offers for one device. One execution at a time per component."""

    def __init__(self, state_dir: str | Path, trusted_keys: Mapping[str, bytes], *, report: Report,
                 self_test: SelfTest | None = None, install_hook: InstallHook | None = None,
                 health_check: HealthCheck | None = None, health_window_s: float = 3.0,
                 download_timeout_s: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(state_dir) / "ota"
        (self.dir / "downloads").mkdir(parents=True, exist_ok=True)
        (self.dir / "slots").mkdir(parents=True, exist_ok=True)
        self.trusted = dict(trusted_keys)
        self.report = report
        self.self_test = self_test or default_model_self_test
        self.install_hook = install_hook
        self.health_check = health_check
        self.health_window_s = health_window_s
        self.download_timeout_s = download_timeout_s
        self.clock = clock
        self.tasks: dict[str, asyncio.Task] = {}
        self.canceled: set[str] = set()

    # --- public ---------------------------------------------------------------------------

    def set_trusted_keys(self, keys: Mapping[str, bytes]) -> None:
        """Replace the trusted artifact keys (from a fresh ``welcome``)."""
        self.trusted = dict(keys)

    def active(self, kind: str) -> tuple[Path | None, dict]:
        """The active slot directory of a component and its record (version, sha256…)."""
        slots = _Slots(self.dir / "slots", kind)
        record = slots.active()
        return (slots.path(record["slot"]) if record.get("slot") else None), record

    async def handle_offer(self, frame: Mapping[str, Any]) -> None:
        """Start applying an offer (returns once the work is scheduled). A duplicate offer of a
        finished execution re-reports its outcome; one still in progress is ignored."""
        execution_id = frame.get("execution_id")
        key = str(execution_id)
        done = _read_json(self.dir / "done.json", {})
        if key in done:
            outcome = done[key]
            await self._report(execution_id, outcome["state"], 100, outcome.get("error"))
            return
        running = self.tasks.get(key)
        if running is not None and not running.done():
            return
        journal = self._journal()
        if journal and str(journal.get("execution_id")) != key and journal.get("phase") in ("installing", "verifying"):
            return  # another install is mid-flight; the server's deadline will re-offer later
        self.canceled.discard(key)
        self.tasks[key] = asyncio.get_running_loop().create_task(self._run(dict(frame)))

    async def handle_cancel(self, frame: Mapping[str, Any]) -> None:
        """Stop an execution that has not started installing (installs run to their outcome)."""
        key = str(frame.get("execution_id"))
        journal = self._journal()
        if journal and str(journal.get("execution_id")) == key and journal.get("phase") in ("installing",
                                                                                            "verifying", "committed"):
            return
        self.canceled.add(key)
        task = self.tasks.get(key)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(OSError):
            (self.dir / "downloads" / f"{key}.part").unlink()
        if journal and str(journal.get("execution_id")) == key:
            self._clear_journal()

    async def wait(self) -> None:
        """Wait for every running execution (tests, shutdown)."""
        tasks = [t for t in self.tasks.values() if not t.done()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def resume(self) -> None:
        """After a restart: finish or roll back what the journal says was in progress."""
        journal = self._journal()
        if not journal:
            return
        execution_id, phase = journal["execution_id"], journal["phase"]
        if phase == "downloaded":
            self.tasks[str(execution_id)] = asyncio.get_running_loop().create_task(
                self._run(journal["offer"], resumed=True))
        elif phase in ("installing", "verifying"):
            self._restore(journal)
            await self._finish(execution_id, "rolled_back", rollout_error(
                "interrupted", retryable=True, detail=f"the agent restarted during {phase}; previous version kept"))
        elif phase in ("committed", "rolled_back"):
            await self._finish(execution_id, phase, journal.get("error"))

    # --- the work -------------------------------------------------------------------------

    async def _report(self, execution_id: Any, state: str, progress: int = 0, error: dict | None = None) -> None:
        await self.report(execution_id, state, progress, error)

    def _journal(self) -> dict:
        return _read_json(self.dir / "journal.json", {})

    def _set_journal(self, data: dict) -> None:
        _write_json(self.dir / "journal.json", data)

    def _clear_journal(self) -> None:
        with contextlib.suppress(OSError):
            (self.dir / "journal.json").unlink()

    async def _finish(self, execution_id: Any, state: str, error: dict | None) -> None:
        # A retryable failure is not an outcome: the server retries with the same execution id
        # (and re-queues it after a quarantine is released), and that offer must run again.
        if not (state == "failed" and (error or {}).get("retryable")):
            done = _read_json(self.dir / "done.json", {})
            done[str(execution_id)] = {"state": state, "error": error, "at": int(self.clock() * 1000)}
            if len(done) > DONE_KEEP:
                for old in sorted(done, key=lambda k: done[k]["at"])[: len(done) - DONE_KEEP]:
                    done.pop(old)
            _write_json(self.dir / "done.json", done)
        self._clear_journal()
        await self._report(execution_id, state, 100 if state == "committed" else 0, error)

    async def _run(self, offer: dict, *, resumed: bool = False) -> None:
        execution_id = offer.get("execution_id")
        part = self.dir / "downloads" / f"{execution_id}.part"
        try:
            artifact = offer["artifact"]
            manifest = verify_manifest(b64d(artifact["manifest"]), b64d(artifact["signature"]),
                                       artifact["key_id"], self.trusted)
            if resumed:
                self._check_file(part, manifest)
            else:
                await self._report(execution_id, "acked")
                await self._download(execution_id, artifact["url"], part, manifest)
                _test_pause("downloaded")
                self._check_file(part, manifest)
                self._set_journal({"execution_id": execution_id, "phase": "downloaded", "offer": offer})
                await self._report(execution_id, "downloaded", 100)
            await self._wait_for_window(offer.get("window"))
            await self._install(execution_id, offer, manifest, part)
        except OfferRejected as exc:
            with contextlib.suppress(OSError):
                part.unlink()
            self._clear_journal()
            await self._finish(execution_id, "rejected", rollout_error(exc.code, retryable=False, detail=exc.detail))
        except InstallFailed as exc:
            with contextlib.suppress(OSError):
                part.unlink()
            await self._finish(execution_id, "failed",
                               rollout_error(exc.code, retryable=exc.retryable, detail=exc.detail))
        except asyncio.CancelledError:
            log.info("OTA execution %s canceled", execution_id)
            raise
        except (KeyError, TypeError, ValueError) as exc:
            await self._finish(execution_id, "rejected", rollout_error("bad_offer", retryable=False, detail=str(exc)))

    async def _download(self, execution_id: Any, url: str, part: Path, manifest: dict) -> None:
        await self._report(execution_id, "downloading", 0)
        size = int(manifest["size"])
        loop = asyncio.get_running_loop()
        progress_marks: list[int] = []

        def fetch() -> None:
            request = urllib.request.Request(url, headers={"User-Agent": "edge-agent-ota/1"})  # noqa: S310 -- http(s) from the server
            received = 0
            with urllib.request.urlopen(request, timeout=self.download_timeout_s) as response, open(part, "wb") as out:  # noqa: S310
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    received += len(chunk)
                    if received > size:
                        raise OfferRejected("digest_mismatch", f"download is larger than the manifest's {size} bytes")
                    out.write(chunk)
                    mark = min(99, received * 100 // max(size, 1)) // 25 * 25
                    if mark and mark not in progress_marks:
                        progress_marks.append(mark)
                        asyncio.run_coroutine_threadsafe(self._report(execution_id, "downloading", mark), loop)
                out.flush()
                os.fsync(out.fileno())

        try:
            await asyncio.to_thread(fetch)
        except OfferRejected:
            raise
        except OSError as exc:  # URLError, HTTPError, timeouts, disk errors
            raise InstallFailed("download_failed", f"download failed: {exc}", retryable=True) from None

    def _check_file(self, part: Path, manifest: dict) -> None:
        digest = hashlib.sha256()
        size = 0
        try:
            with open(part, "rb") as fh:
                for chunk in iter(lambda: fh.read(CHUNK), b""):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise InstallFailed("download_missing", f"downloaded file is gone: {exc}", retryable=True) from None
        if size != int(manifest["size"]) or digest.hexdigest() != manifest["sha256"]:
            raise OfferRejected("digest_mismatch", f"download has {size} bytes / sha256 {digest.hexdigest()[:16]}…, "
                                                   f"manifest says {manifest['size']} / {manifest['sha256'][:16]}…")

    async def _wait_for_window(self, window: Mapping[str, int] | None) -> None:
        if not window:
            return
        now_ms = self.clock() * 1000
        if now_ms >= window["end"]:
            raise InstallFailed("window_missed", "the maintenance window closed before the install could start",
                                retryable=True)
        if now_ms < window["start"]:
            await asyncio.sleep((window["start"] - now_ms) / 1000)

    def _unpack(self, part: Path, target: Path, manifest: dict) -> None:
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        if zipfile.is_zipfile(part):
            with zipfile.ZipFile(part) as archive:
                for member in archive.namelist():
                    resolved = (target / member).resolve()
                    if not resolved.is_relative_to(target.resolve()):
                        raise InstallFailed("bad_archive", f"archive member {member!r} escapes the slot")
                for index, member in enumerate(archive.namelist()):
                    archive.extract(member, target)
                    if index == 0:
                        _test_pause("unpacking")
        else:
            name = "model.onnx" if manifest.get("kind") == "model" else "artifact.bin"
            shutil.copyfile(part, target / name)

    async def _install(self, execution_id: Any, offer: dict, manifest: dict, part: Path) -> None:
        kind = manifest["kind"]
        slots = _Slots(self.dir / "slots", kind)
        previous = slots.active()
        new_slot = slots.inactive_name()
        record = {"slot": new_slot, "version": manifest["version"], "sha256": manifest["sha256"],
                  "name": manifest["name"]}
        journal = {"execution_id": execution_id, "phase": "installing", "kind": kind, "previous": previous,
                   "new": record, "offer": offer}
        self._set_journal(journal)
        await self._report(execution_id, "installing", 0)
        await asyncio.to_thread(self._unpack, part, slots.path(new_slot), manifest)
        with contextlib.suppress(OSError):
            part.unlink()
        self._set_journal({**journal, "phase": "verifying"})
        await self._report(execution_id, "verifying", 0)
        ok = await asyncio.to_thread(self._safe_self_test, slots.path(new_slot), manifest)
        reason = "self-test failed on the candidate"
        if ok:
            slots.set_active(record)
            try:
                if self.install_hook is not None:
                    await asyncio.to_thread(self.install_hook, slots.path(new_slot), manifest)
                _test_pause("switched")
                ok, reason = await self._health_window()
            except Exception as exc:  # noqa: BLE001 -- any failure to switch means roll back
                ok, reason = False, f"install hook failed: {exc}"
        if not ok:
            self._restore({**journal, "phase": "verifying"})
            error = rollout_error("self_test_failed" if "self-test" in reason else "health_check_failed",
                                  retryable=False, detail=reason)
            self._set_journal({**journal, "phase": "rolled_back", "error": error})
            await self._finish(execution_id, "rolled_back", error)
            return
        self._set_journal({**journal, "phase": "committed"})
        _test_pause("committed")
        await self._finish(execution_id, "committed", None)

    def _safe_self_test(self, slot: Path, manifest: dict) -> bool:
        try:
            return bool(self.self_test(slot, manifest))
        except Exception:
            log.warning("OTA self-test raised", exc_info=True)
            return False

    async def _health_window(self) -> tuple[bool, str]:
        deadline = time.monotonic() + self.health_window_s
        while True:
            if self.health_check is not None and not await asyncio.to_thread(self.health_check):
                return False, "health check failed after the switch"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True, "healthy"
            await asyncio.sleep(min(0.5, remaining))

    def _restore(self, journal: dict) -> None:
        """Put the previous version back as active (and tell the hook), after a failed or interrupted install."""
        slots = _Slots(self.dir / "slots", journal["kind"])
        previous = journal.get("previous") or {}
        if previous:
            slots.set_active(previous)
            if self.install_hook is not None and previous.get("slot"):
                try:
                    self.install_hook(slots.path(previous["slot"]), {"kind": journal["kind"], **previous})
                except Exception:
                    log.warning("restoring the previous %s failed", journal["kind"], exc_info=True)
        else:
            with contextlib.suppress(OSError):
                (slots.base / "active.json").unlink()
            # The candidate may already be running (hot-swapped before the health window):
            # tell the hook there is no installed version any more, so it goes back to the
            # one the agent shipped with instead of running what was just rolled back.
            if self.install_hook is not None:
                try:
                    self.install_hook(None, {"kind": journal["kind"]})
                except Exception:
                    log.warning("going back to the built-in %s failed", journal["kind"], exc_info=True)
