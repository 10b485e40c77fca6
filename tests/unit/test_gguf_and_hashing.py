import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from haifctl.errors import InvalidInput, NotFound
from haifctl.gguf_info import read_facts
from haifctl.hashing import CHUNK, sha256_file
from haifctl.registry.service import BUILTIN_SHA256, parse_ref, version_key
from tests.gguf_fixtures import CHATML, copy_with_metadata


def test_facts_of_the_shipped_model(model_path: Path) -> None:
    facts = read_facts(model_path)
    assert facts.architecture == "llama"
    assert facts.context_length == 2048
    assert facts.block_count == 5
    assert facts.parameter_count == 292_800  # counted from the tensors: the file has no key
    assert facts.file_type == "F32"  # likewise inferred from the tensors
    assert facts.has_chat_template is False
    assert (facts.bos_token, facts.eos_token) == ("<s>", "</s>")
    assert facts.size_bytes == model_path.stat().st_size


def test_facts_read_from_metadata_when_present(model_path: Path, tmp_path: Path) -> None:
    path = copy_with_metadata(
        model_path,
        tmp_path / "chat.gguf",
        {"tokenizer.chat_template": CHATML, "general.file_type": 2, "general.parameter_count": 7},
    )
    facts = read_facts(path)
    assert facts.has_chat_template is True
    assert facts.chat_template == CHATML
    assert facts.file_type == "Q4_0"
    assert facts.parameter_count == 7


def test_not_gguf_missing_and_directories(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model")
    with pytest.raises(InvalidInput, match="not a GGUF file") as info:
        read_facts(text)
    assert "convert" in info.value.hint
    with pytest.raises(NotFound, match="no such file"):
        read_facts(tmp_path / "absent.gguf")
    with pytest.raises(InvalidInput, match="is a directory"):
        read_facts(tmp_path)


@pytest.mark.parametrize("keep", [4, 24, 600, 14_000, 600_000, -1])
def test_truncated_gguf_is_caught(model_path: Path, tmp_path: Path, keep: int) -> None:
    data = model_path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(InvalidInput, match="truncated or corrupt") as info:
        read_facts(cut)
    assert info.value.code == "gguf_invalid"


def test_sha256_streams_in_chunks(tmp_path: Path, model_path: Path) -> None:
    assert sha256_file(model_path) == BUILTIN_SHA256
    blob = tmp_path / "blob"
    data = bytes(range(256)) * (CHUNK // 256 * 2 + 7)
    blob.write_bytes(data)
    seen: list[int] = []
    assert sha256_file(blob, seen.append) == hashlib.sha256(data).hexdigest()
    assert sum(seen) == len(data)
    assert len(seen) == 3  # two full chunks and the rest: never the whole file at once


def test_hashing_a_large_file_keeps_memory_flat(tmp_path: Path) -> None:
    big = tmp_path / "sparse.bin"
    with big.open("wb") as fh:
        fh.truncate(512 * 1024 * 1024)  # sparse: 512 MiB without using the disk
    script = (
        "import resource, sys; from pathlib import Path; from haifctl.hashing import sha256_file;"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "sha256_file(Path(sys.argv[1]));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    grown_kib = int(subprocess.check_output([sys.executable, "-c", script, str(big)]))
    assert grown_kib < 32 * 1024, f"hashing grew the process by {grown_kib} KiB"


def test_versions_order_naturally() -> None:
    versions = ["1.10", "2", "1.9", "1.9.1", "10", "1.0-rc1", "1.0"]
    ordered = sorted(versions, key=version_key)
    assert ordered == ["1.0-rc1", "1.0", "1.9", "1.9.1", "1.10", "2", "10"]


def test_refs_parse() -> None:
    assert parse_ref("llama") == ("llama", None)
    assert parse_ref("llama:3.1") == ("llama", "3.1")
    for bad in ("", ":1", "llama:"):
        with pytest.raises(InvalidInput):
            parse_ref(bad)
