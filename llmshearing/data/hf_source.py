"""A Hugging Face dataset (``datasets``: a Hub id, a local folder of data files, or a ``save_to_disk`` folder) as the
raw input of data prep, instead of a RedPajama-style folder of JSONL files.

The dataset is written once as the folder data prep reads (``<domain>/part-00000.jsonl``, rows in the dataset's
order), next to the output under a marked temporary name, and removed after. Its domains come from a column
(``--domain-column``, dotted for nested fields: RedPajama's ``meta.redpajama_set_name``) or are one given name
(``--domain``). Everything after that is data prep's own (split by document, packing, manifest); the manifest
records the dataset as its input.

    python data_prep/prepare_data.py --hf-dataset togethercomputer/RedPajama-Data-1T-Sample \\
        --domain-column meta.redpajama_set_name --output /data/rp_mds --tokenizer <model> --seq-len 4096
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Optional

__all__ = ["export_hf_dataset"]

log = logging.getLogger(__name__)


def _load(name: str, split: str, config: Optional[str]):
    try:
        import datasets
    except ImportError:
        raise ImportError("a Hugging Face dataset as input needs the datasets package: pip install -e '.[hf]'") from None
    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))  # save_to_disk output
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"--hf-dataset {name} has splits {list(ds)}, not {split!r}; give --hf-split")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(name, config, split=split)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--hf-dataset {name}: neither a local dataset folder nor a reachable Hub dataset "
                                f"({' '.join(str(e).split())[:200]}); download it where the Hub is reachable "
                                f"(huggingface-cli download --repo-type dataset {name}) or give a local folder") from None


def _field(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def export_hf_dataset(name: str, out: Path, text_column: str = "text", domain_column: Optional[str] = None,
                      domain: Optional[str] = None, split: str = "train", config: Optional[str] = None) -> dict:
    """Write dataset ``name`` as ``out/<domain>/part-00000.jsonl`` (``{"text": ...}`` per row); returns its identity
    for the manifest.

    Raises:
        ValueError: no text column, neither a domain column nor a domain name, or a domain name that cannot be a
            folder name.
    """
    if (domain_column is None) == (domain is None):
        raise ValueError("a Hugging Face dataset needs its domains: --domain-column COLUMN (a column, dotted for a "
                         "nested field) or --domain NAME (one domain)")
    ds = _load(name, split, config)
    if text_column not in ds.column_names:
        raise ValueError(f"--hf-dataset {name} has no column {text_column!r} (columns: {ds.column_names}); give "
                         "--text-column")
    top = (domain_column or "").split(".")[0]
    if domain_column and top not in ds.column_names:
        raise ValueError(f"--hf-dataset {name} has no column {top!r} (columns: {ds.column_names}); fix --domain-column")
    out.mkdir(parents=True)
    handles: dict[str, Any] = {}
    counts: dict[str, int] = {}
    try:
        for row in ds:
            d = domain if domain is not None else _field(row, domain_column)
            if d is None or not re.fullmatch(r"[\w.-]+", str(d)):
                raise ValueError(f"row {sum(counts.values())}: domain {d!r} from --domain-column {domain_column} is "
                                 "missing or not a folder name")
            d = str(d)
            if d not in handles:
                (out / d).mkdir()
                handles[d] = open(out / d / "part-00000.jsonl", "w", encoding="utf-8")
            handles[d].write(json.dumps({"text": row[text_column]}, ensure_ascii=False) + "\n")
            counts[d] = counts.get(d, 0) + 1
    finally:
        for fh in handles.values():
            fh.close()
    log.info("Hugging Face dataset %s (%s): %s", name, split, ", ".join(f"{d} {n} documents" for d, n in counts.items()))
    return {"hf_dataset": name, "split": split, "config": config, "fingerprint": getattr(ds, "_fingerprint", None),
            "rows": sum(counts.values()), "text_column": text_column, "domain_column": domain_column,
            "domain": domain}
