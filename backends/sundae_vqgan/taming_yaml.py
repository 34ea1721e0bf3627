"""Read the VQ-GAN settings out of a taming-transformers YAML config, without PyYAML.

Taming configs use a small part of YAML: nested mappings by indentation, scalars,
inline lists (`ch_mult: [1,1,2,2,4]`), block lists of scalars and `#` comments.
This parser reads that part and rejects anything else with a clear error; the
weights' shapes remain the main source of the architecture.
"""

from __future__ import annotations

import re
from typing import Any

from sundae_cli.errors import CheckpointError

YAML_HINT = "omit the YAML; the architecture is inferred from the checkpoint's weights"
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_yaml_subset(text: str) -> dict[str, Any]:
    """Parse the indentation-based YAML subset of taming configs into dicts/lists."""
    rows = _rows(text)
    root: dict[str, Any] = {}
    stack: list[tuple[int, Any]] = [(-1, root)]
    for position, (indent, content) in enumerate(rows):
        is_item = content == "-" or content.startswith("- ")
        while indent < stack[-1][0] or (
            indent == stack[-1][0] and not (is_item and isinstance(stack[-1][1], list))
        ):
            stack.pop()
        parent = stack[-1][1]

        if is_item:
            if not isinstance(parent, list):
                raise ValueError(f"list item outside a list: {content!r}")
            parent.append(_scalar(content[1:].strip()))
            continue
        key, colon, value = content.partition(":")
        if not colon or not isinstance(parent, dict):
            raise ValueError(f"unsupported line: {content!r}")
        if value.strip():
            parent[key.strip()] = _scalar(value.strip())
            continue
        following = rows[position + 1][1] if position + 1 < len(rows) else ""
        child: Any = [] if following.startswith("-") else {}
        parent[key.strip()] = child
        stack.append((indent, child))
    return root


def _rows(text: str) -> list[tuple[int, str]]:
    """(indent, content) of each non-blank line, comments removed."""
    rows = []
    for line in text.splitlines():
        content = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if content.strip():
            if "\t" in content[: len(content) - len(content.lstrip())]:
                raise ValueError("tabs in indentation")
            rows.append((len(content) - len(content.lstrip(" ")), content.strip()))
    return rows


def _scalar(text: str) -> Any:
    """A YAML scalar or inline list: numbers, booleans, null, quoted or bare strings."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_scalar(item.strip()) for item in inner.split(",")] if inner else []
    if text[:1] in "'\"" and text[-1:] == text[:1] and len(text) >= 2:
        return text[1:-1]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none", "~"):
        return None
    if _NUMBER.fullmatch(text):
        number = float(text)
        return int(text) if re.fullmatch(r"[-+]?\d+", text) else number
    if text.startswith(("{", "&", "*", "!", "|", ">")):
        raise ValueError(f"unsupported YAML value: {text!r}")
    return text


def config_from_taming_yaml(text: str) -> dict[str, Any]:
    """`VQGANConfig` fields from a taming VQModel or cond-transformer YAML.

    Reads `model.params.ddconfig`, `n_embed` and `embed_dim` (under
    `first_stage_config.params` for a cond transformer).
    """
    try:
        params = parse_yaml_subset(text)["model"]["params"]
        if "ddconfig" not in params:
            params = params["first_stage_config"]["params"]
        ddconfig = params["ddconfig"]
        if ddconfig.get("double_z"):
            raise ValueError("double_z: true is a KL autoencoder, not a VQ-GAN")
        fields = {
            key: ddconfig[key]
            for key in (
                "ch",
                "ch_mult",
                "num_res_blocks",
                "attn_resolutions",
                "resolution",
                "in_channels",
                "out_ch",
                "z_channels",
                "dropout",
            )
            if key in ddconfig
        }
        fields["embed_dim"] = params["embed_dim"]
        fields["codebook_size"] = params["n_embed"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot read the taming YAML: {exc}", YAML_HINT) from exc
    return fields
