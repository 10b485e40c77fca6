"""Facts about a GGUF file, read with the gguf package without loading the weights."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from haifctl.errors import HaifError, InvalidInput, NotFound
from haifctl.files import open_regular

GGUF_MAGIC = b"GGUF"


class GGUFFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the registry records about a GGUF file."""

    architecture: str
    name: str | None
    parameter_count: int | None
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    file_type: str | None
    has_chat_template: bool
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    tensor_count: int
    size_bytes: int


def check_model_path(path: Path) -> Path:
    """Fail with a clear error unless ``path`` is a readable file that starts like a GGUF."""
    path = path.expanduser()
    if not path.exists():
        raise NotFound("file_not_found", f"no such file: {path}", "check the path and try again")
    try:
        # a FIFO, device or directory is refused before any read: reading a FIFO blocks
        with os.fdopen(open_regular(path), "rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise NotFound(
            "file_not_found", f"no such file: {path}", "check the path and try again"
        ) from None
    except OSError as exc:
        raise InvalidInput("unreadable_file", f"cannot read {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise InvalidInput(
            "not_gguf",
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)",
            "haifctl serves llama.cpp GGUF models; convert other formats with llama.cpp's "
            "convert_hf_to_gguf.py",
        )
    return path


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (IndexError, ValueError, TypeError):
        return None


def _token_text(reader: Any, key: str) -> str | None:
    token_id = _field(reader, key)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if not isinstance(token_id, int) or tokens is None or not 0 <= token_id < len(tokens.data):
        return None
    return bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8", errors="replace")


def read_facts(path: Path) -> GGUFFacts:
    """Read the metadata of the GGUF at ``path``; raise ``HaifError`` for anything malformed."""
    path = check_model_path(path)
    from gguf import GGUFReader, LlamaFileType

    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OSError, OverflowError) as exc:
        raise _corrupt(path, str(exc)) from None
    data_end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if data_end > size:
        raise _corrupt(path, f"tensor data needs {data_end} bytes but the file has {size}")

    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise _corrupt(path, "general.architecture is missing")

    def arch_int(key: str) -> int | None:
        value = _field(reader, f"{arch}.{key}")
        return int(value) if isinstance(value, int) else None

    file_type: str | None = None
    raw_type = _field(reader, "general.file_type")
    if isinstance(raw_type, int):
        try:
            file_type = LlamaFileType(raw_type).name.removeprefix("MOSTLY_")
        except ValueError:
            file_type = f"type {raw_type}"
    elif reader.tensors:
        # Older converters omit general.file_type: report the tensor type holding most bytes.
        by_bytes: Counter[str] = Counter()
        for tensor in reader.tensors:
            by_bytes[tensor.tensor_type.name] += int(tensor.n_bytes)
        file_type = by_bytes.most_common(1)[0][0]

    param_count = _field(reader, "general.parameter_count")
    if not isinstance(param_count, int):
        param_count = sum(int(t.n_elements) for t in reader.tensors) or None
    template = _field(reader, "tokenizer.chat_template")
    template = template if isinstance(template, str) and template.strip() else None
    name = _field(reader, "general.name")

    return GGUFFacts(
        architecture=arch,
        name=name if isinstance(name, str) else None,
        parameter_count=param_count,
        context_length=arch_int("context_length"),
        block_count=arch_int("block_count"),
        embedding_length=arch_int("embedding_length"),
        file_type=file_type,
        has_chat_template=template is not None,
        chat_template=template,
        bos_token=_token_text(reader, "tokenizer.ggml.bos_token_id"),
        eos_token=_token_text(reader, "tokenizer.ggml.eos_token_id"),
        tensor_count=len(reader.tensors),
        size_bytes=size,
    )


def _corrupt(path: Path, detail: str) -> HaifError:
    return InvalidInput(
        "gguf_invalid",
        f"{path} is not a valid GGUF file (truncated or corrupt: {detail})",
        "the download or copy may be incomplete; fetch the file again and compare its sha256",
    )
