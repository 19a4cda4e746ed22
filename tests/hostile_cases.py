"""Machinery of the hostile-files suite (``tests/test_hostile_files.py``): taking a valid
subnetwork file apart and putting it back together as an attacker would, and the runner that
opens each hostile folder in a process of its own, under a memory limit and a timeout.

Rewriting (``KenFile``): an attacker recomputes every checksum and digest, so a rewritten
file differs from a valid one only in what a case changes: each array's checksum
(``ken_hf.storage.format.checksum``), the ``digest`` of the ``ken`` document (xxh3 of its
text) and ``subnetwork_digest`` in the folder's ``ken_config.json`` are written to match.

Running (``Runner`` here, ``serve`` in the runner process): importing torch and transformers
costs seconds, so one runner process per test session imports them (and loads the base
models a ``KENModel.from_pretrained`` case needs) once; each case is an ``os.fork()`` of it.
The child drops to an address-space limit (``RLIMIT_AS``: its size at the fork plus the
case's budget), reads nothing from stdin, writes stdout and stderr into memory files, calls
the entry point once, timing that call alone, and reports what happened as JSON: the
outcome, the exception's class, its classes' names (MRO), message and traceback tail, or the
CLI's exit code, plus the logits of a model it loaded. The runner kills a child that
outlives the case's timeout. Run as a script, this module is the runner.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

SUBNETWORK = "ken_subnetwork.safetensors"
KEN_CONFIG = "ken_config.json"
MODEL_CONFIG = "config.json"
NESTING = 100_000  # JSON nested this deep ends CPython's recursive parser in RecursionError


# -- JSON texts ---------------------------------------------------------------------------
def nested(depth: int = NESTING) -> str:
    """A JSON list nested ``depth`` deep."""
    return "[" * depth + "]" * depth


def with_first_key(text: str, key: str, value_text: str) -> str:
    """The JSON object ``text`` with ``"key": value_text`` written before its first key (a
    second copy of a key it holds is a duplicate key: Python's parser keeps the last)."""
    body = text.lstrip()
    assert body.startswith("{"), body[:20]
    rest = body[1:].lstrip()
    separator = "" if rest.startswith("}") else ", "
    return "{" + json.dumps(key) + ": " + value_text + separator + rest


def lying_frame(size: int, run: int = 1000) -> bytes:
    """A zstd frame whose header declares ``size`` bytes of content but whose one block (a
    last, run-length block) holds ``run`` zero bytes: a frame the size of a tweet that
    claims gigabytes. Truthful when ``size == run``."""
    header = struct.pack("<I", 0xFD2FB528) + bytes([0xC0, 0x38]) + struct.pack("<Q", size)
    return header + (1 | 1 << 1 | run << 3).to_bytes(3, "little") + b"\x00"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, value, **dump_options) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, **dump_options) + "\n")


DELETE = object()  # a value of edit_ken_config: remove the key


def edit_ken_config(folder: Path, **changes) -> dict:
    """Set (or, with a value of ``DELETE``, remove) keys of ``folder``'s ``ken_config.json``."""
    path = folder / KEN_CONFIG
    values = read_json(path)
    for key, value in changes.items():
        if value is DELETE:
            values.pop(key, None)
        else:
            values[key] = value
    write_json(path, values)
    return values


# -- subnetwork files taken apart ---------------------------------------------------------
@dataclass
class Array:
    """One stored array: safetensors dtype name, shape, bytes."""

    dtype: str
    shape: list
    data: bytes


class KenFile:
    """A subnetwork file (version 1 or 2) taken apart: ``metadata``, the ``document`` (the
    ``ken`` metadata entry, parsed) and ``arrays`` by key, in the order of their bytes.
    ``save`` writes it back, contiguous, every checksum and digest recomputed."""

    def __init__(self, folder: Path, name: str = SUBNETWORK) -> None:
        self.folder, self.path = Path(folder), Path(folder) / name
        raw = self.path.read_bytes()
        (length,) = struct.unpack_from("<Q", raw)
        header = json.loads(raw[8 : 8 + length])
        self.metadata: dict = header.pop("__metadata__")
        start = 8 + length
        records = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        self.arrays: dict[str, Array] = {}
        for key, record in records:
            begin, end = record["data_offsets"]
            data = raw[start + begin : start + end]
            self.arrays[key] = Array(record["dtype"], list(record["shape"]), data)
        self.document: dict = json.loads(self.metadata["ken"])
        self.version: str = self.metadata["format_version"]

    # what it holds
    def entry(self, name: str) -> dict:
        return self.document["tensors"][name]

    def keys_of(self, name: str) -> list[str]:
        """The array keys of tensor ``name``, in the order of its checksums."""
        entry = self.entry(name)
        if entry["kind"] == "whole":
            return [f"whole.{name}"]
        if self.version == "1":
            return [f"pruned.{name}.values", f"pruned.{name}.{entry['encoding']}"]
        return [f"pruned.{name}.{part}" for part in ("kept", "changed", "difference")]

    def unpacked(self, name: str, part: str):
        """The decompressed bytes (uint8 numpy) of array ``part`` of pruned tensor ``name``
        (version 2)."""
        import numpy as np
        import zstandard

        data = self.arrays[f"pruned.{name}.{part}"].data
        return np.frombuffer(zstandard.ZstdDecompressor().decompress(data), dtype=np.uint8)

    # changes
    def set_array(self, key: str, data: bytes, dtype: str = "U8", shape=None) -> None:
        """Store ``data`` as array ``key`` (a uint8 vector unless told otherwise)."""
        self.arrays[key] = Array(dtype, [len(data)] if shape is None else list(shape), data)

    def set_packed(self, name: str, part: str, raw: bytes, *, frame: bytes | None = None) -> None:
        """Array ``part`` of pruned tensor ``name`` (version 2) as the zstd frame of ``raw``
        (or the ``frame`` given)."""
        import zstandard

        packed = frame if frame is not None else zstandard.ZstdCompressor(level=1).compress(raw)
        self.set_array(f"pruned.{name}.{part}", packed)

    def rename_tensor(self, old: str, new: str) -> None:
        """Tensor ``old`` renamed ``new``: its entry, fingerprint and arrays."""
        tensors = self.document["tensors"]
        self.document["tensors"] = {new if k == old else k: v for k, v in tensors.items()}
        prints = self.document["fingerprints"]
        self.document["fingerprints"] = {new if k == old else k: v for k, v in prints.items()}
        prefix = f"{'whole' if tensors[old]['kind'] == 'whole' else 'pruned'}.{old}"
        self.arrays = {
            (key.replace(prefix, prefix.replace(old, new), 1) if key.startswith(prefix) else key):
            array
            for key, array in self.arrays.items()
        }  # fmt: skip

    def reseal(self, *names: str) -> None:
        """Recompute the checksums of tensors ``names`` (default: every tensor) from their
        arrays and the shapes their entries declare."""
        for name in names or list(self.document["tensors"]):
            entry = self.entry(name)
            entry["checksums"] = [
                array_checksum(self.arrays[key].data, entry["shape"]) for key in self.keys_of(name)
            ]

    # writing
    def layout(self) -> dict[str, list[int]]:
        """``{key: [begin, end]}`` of each array when written contiguously, in order."""
        offsets, position = {}, 0
        for key, array in self.arrays.items():
            offsets[key] = [position, position + len(array.data)]
            position += len(array.data)
        return offsets

    def data(self) -> bytes:
        return b"".join(array.data for array in self.arrays.values())

    def save(
        self,
        *,
        document_text: str | None = None,
        edit_header=None,
        header_text=None,
        data: bytes | None = None,
        update_config: bool = True,
    ) -> str:
        """Write the file (``document_text``: the ``ken`` entry's exact text; ``edit_header``:
        called with the header dict before it is encoded; ``header_text``: called with the
        encoded header text, returns the text to write; ``data``: the bytes after the
        header), with the document's digest, and that digest as ``subnetwork_digest`` in
        the folder's ``ken_config.json`` when it records one. Returns the digest."""
        import xxhash

        text = document_text if document_text is not None else json.dumps(self.document)
        digest = xxhash.xxh3_64_hexdigest(text.encode())
        metadata = dict(self.metadata, ken=text, digest=digest)
        header = {
            key: {"dtype": a.dtype, "shape": a.shape, "data_offsets": offsets}
            for (key, a), offsets in zip(self.arrays.items(), self.layout().values(), strict=True)
        }
        header["__metadata__"] = metadata
        if edit_header is not None:
            edit_header(header)
        encoded = json.dumps(header, separators=(",", ":"))
        if header_text is not None:
            encoded = header_text(encoded)
        raw = encoded.encode()
        raw += b" " * (-len(raw) % 8)
        body = self.data() if data is None else data
        self.path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
        config = self.folder / KEN_CONFIG
        if update_config and config.is_file() and "subnetwork_digest" in read_json(config):
            edit_ken_config(self.folder, subnetwork_digest=digest)
        return digest


def array_checksum(data: bytes, shape) -> str:
    """The checksum the format records for a stored array's bytes and its tensor's shape."""
    import numpy as np
    import torch

    from ken_hf.storage.format import checksum

    return checksum(torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()), shape)


# -- what the child process runs ----------------------------------------------------------
def _vm_size() -> int:
    """This process's address space in bytes (``VmSize``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _call(request: dict, bases: dict):
    """A function of no arguments that runs the request's entry point, and whether its
    result is a CLI exit code."""
    from ken_hf import (
        AutoKENModelForSequenceClassification,
        KENConfig,
        KENModel,
        KENSubnetwork,
    )
    from ken_hf.cli import main

    entry, folder, kwargs = request["entry"], request.get("folder"), request.get("kwargs", {})
    if entry == "cli":
        return (lambda: main(request["argv"])), True
    if entry == "config":
        return (lambda: KENConfig.from_pretrained(folder, **kwargs)), False
    if entry == "subnetwork":

        def read_and_use():
            subnetwork = KENSubnetwork.from_pretrained(folder, **kwargs)
            # Tensors are decoded on first use: a refusal may come then, as a user would meet it.
            for table in (subnetwork.pruned, subnetwork.whole):
                for name in table:
                    table[name]
            return subnetwork

        return read_and_use, False
    if entry == "auto":
        auto = AutoKENModelForSequenceClassification
        return (lambda: auto.from_pretrained(folder, **kwargs)), False
    if entry == "kenmodel":
        base = bases[request["base"]]
        return (lambda: KENModel.from_pretrained(base, folder, **kwargs)), False
    raise ValueError(f"unknown entry point {entry!r}")


def _child(request: dict, bases: dict, result_fd: int, out_fd: int, err_fd: int) -> None:
    """Runs in the forked child: one entry point, reported as JSON into ``result_fd``."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # a prompt gets end-of-file at once instead of waiting
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    os.chdir(request["cwd"])
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    report: dict = {}
    with contextlib.ExitStack() as stack:
        if request.get("hub"):
            from fake_hub import huggingface_hub_at

            stack.enter_context(huggingface_hub_at(request["hub"]["url"], request["hub"]["cache"]))
        call, is_cli = _call(request, bases)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _vm_size() + int(request["memory_budget"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        start = time.perf_counter()
        value = error = None
        try:
            value = call()
        except BaseException as caught:  # SystemExit and MemoryError included
            error = caught
        elapsed = time.perf_counter() - start
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        report["elapsed"] = elapsed
        if is_cli and (error is None or isinstance(error, SystemExit)):
            code = value if error is None else error.code
            report.update(outcome="exit", exit_code=code if isinstance(code, int) else repr(code))
        elif error is not None:
            report.update(
                outcome="raised",
                type=type(error).__name__,
                mro=[cls.__name__ for cls in type(error).__mro__],
                message=str(error)[:4000],
                traceback="".join(traceback.format_exception(error, limit=-12))[-6000:],
            )
        else:
            report.update(outcome="ok", value=type(value).__name__)
            if request.get("input_ids") is not None and hasattr(value, "forward"):
                import torch

                with torch.no_grad():
                    ids = torch.tensor(request["input_ids"])
                    report["logits"] = value(input_ids=ids).logits.tolist()
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(result_fd, json.dumps(report).encode())


def _run_one(request: dict, bases: dict) -> dict:
    """Fork, run the request in the child, wait at most its timeout (then kill the child)."""
    fds = [os.memfd_create(name) for name in ("result", "stdout", "stderr")]
    pid = os.fork()
    if pid == 0:
        try:
            _child(request, bases, *fds)
        except BaseException:
            with contextlib.suppress(BaseException):
                message = traceback.format_exc()[-6000:]
                os.write(fds[0], json.dumps({"outcome": "harness", "message": message}).encode())
        finally:
            os._exit(0)
    deadline = time.monotonic() + request["timeout"]
    timed_out, status = False, 0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            timed_out = True
            break
        time.sleep(0.002)
    texts = []
    for fd in fds:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        os.close(fd)
        texts.append(b"".join(chunks).decode("utf-8", "replace"))
    result_text, stdout, stderr = texts
    try:
        result = json.loads(result_text)
    except ValueError:
        result = {"outcome": "died", "message": f"no report (wait status {status})"}
    if timed_out:
        result = {"outcome": "timeout", "message": f"killed after {request['timeout']} s"}
    result.update(stdout=stdout[-20000:], stderr=stderr[-20000:])
    return result


def serve(bases_json: str) -> None:
    """The runner's main loop: one JSON request per line on stdin, one JSON result per line
    on the original stdout (anything else printed goes to stderr)."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (the viz command's import, done once)
    import torch

    torch.set_num_threads(1)
    import transformers

    import fake_hub  # noqa: F401
    import ken_hf.cli  # noqa: F401
    import ken_hf.making.from_checkpoints  # noqa: F401
    import ken_hf.viz  # noqa: F401

    transformers.logging.set_verbosity_error()
    bases = {}
    for name, path in json.loads(bases_json).items():
        torch.manual_seed(0)
        bases[name] = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2
        ).eval()
        with torch.no_grad():  # weights in memory of their own, as a model in use holds them
            for parameter in bases[name].parameters():
                parameter.data = parameter.data.clone()
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        protocol.write(json.dumps(_run_one(json.loads(line), bases)) + "\n")


# -- the pytest side ----------------------------------------------------------------------
class Runner:
    """The runner process, seen from the tests: ``run(request)`` returns the child's report.
    ``bases``: ``{name: checkpoint folder}`` of the base models to preload."""

    def __init__(self, bases: dict[str, str], log: Path) -> None:
        home = log.parent / "home"  # caches of huggingface_hub, transformers, matplotlib
        env = dict(
            os.environ,
            HF_HOME=str(home / "hf"),
            MPLCONFIGDIR=str(home / "matplotlib"),
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            MALLOC_ARENA_MAX="2",  # a thread's malloc arena is address space too
            HF_HUB_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            TRANSFORMERS_VERBOSITY="error",
            PYTHONDONTWRITEBYTECODE="1",
        )
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, __file__, json.dumps(bases)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env,
        )
        self._buffer = b""
        ready = self._read_line(300)
        if ready != {"ready": True}:
            raise RuntimeError(f"runner did not start: {ready}; log: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def _read_line(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"runner gave no answer in {timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"runner exited; log: {self.log_tail()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, request: dict) -> dict:
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()
        return self._read_line(request["timeout"] + 60)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


if __name__ == "__main__":
    serve(sys.argv[1])
