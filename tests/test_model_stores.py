"""Models other local tools already keep: real Ollama, LM Studio, llama.cpp and Hugging Face cache layouts, built
in tmp from the default GGUF (hard links where the file system allows, else copies), found by `fmchat models` and
run by name through the real CLI in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HF_REV = "0123456789abcdef0123456789abcdef01234567"
OLLAMA = "smollm2:135m"
LMSTUDIO = "lmstudio-community/SmolLM2-135M-Instruct-GGUF"
LLAMACPP = "unsloth_SmolLM2-135M-Instruct-GGUF_SmolLM2-135M-Instruct-Q4_1"
HF_GGUF = "bartowski/SmolLM2-135M-Instruct-GGUF"


def place(src: Path, dst: Path) -> Path:
    """``dst`` holding the bytes of ``src``: a hard link, or a copy where links are not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def ollama_pull(root: Path, gguf: Path, digest: str, model: str, tag: str, namespace: str = "library",
                host: str = "registry.ollama.ai") -> Path:  # fmt: skip
    """What `ollama pull` leaves: content-addressed blobs (model, template, config) and a manifest naming them."""
    blobs = root / "blobs"
    if not (blobs / f"sha256-{digest}").exists():
        place(gguf, blobs / f"sha256-{digest}")
    layers = [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": gguf.stat().st_size}
    ]
    for media, data in (("application/vnd.ollama.image.template", b"{{ .Prompt }}"),
                        ("application/vnd.docker.container.image.v1+json", b'{"model_format":"gguf","model_family":"llama"}')):  # fmt: skip
        h = hashlib.sha256(data).hexdigest()
        (blobs / f"sha256-{h}").write_bytes(data)
        layers.append({"mediaType": media, "digest": f"sha256:{h}", "size": len(data)})
    config = layers.pop()
    manifest = root / "manifests" / host / namespace / model / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                    "config": config, "layers": layers}))  # fmt: skip
    return blobs / f"sha256-{digest}"


def hf_cache_repo(cache: Path, repo_id: str, gguf: Path, digest: str, filename: str) -> Path:
    """A hub-cache repo as huggingface_hub writes it: blobs/<sha256>, refs/main, snapshots/<rev>/<file> -> blob."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    place(gguf, repo / "blobs" / digest)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(HF_REV)
    link = repo / "snapshots" / HF_REV / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path("..") / ".." / "blobs" / digest)
    return link


def env_for(root: Path, **extra) -> dict[str, str]:
    """The stores under ``root`` (empty ones where a layout does not make them), for a subprocess."""
    return dict(os.environ, OLLAMA_MODELS=str(root / "ollama"), HOME=str(root / "home"), LLAMA_CACHE=str(root / "llama.cpp"),
                HF_HUB_CACHE=str(root / "hf"), COLUMNS="400", **extra)  # fmt: skip


def fmchat(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fmchat", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def gguf_digest(default_gguf) -> str:
    return sha256(default_gguf)


@pytest.fixture(scope="module")
def stores_root(tmp_path_factory, default_gguf, gguf_digest) -> Path:
    """One GGUF in each store: Ollama, LM Studio (with a vision projector beside it), llama.cpp, HF cache."""
    root = tmp_path_factory.mktemp("stores")
    ollama_pull(root / "ollama", default_gguf, gguf_digest, "smollm2", "135m")
    lms = root / "home" / ".lmstudio" / "models" / LMSTUDIO
    place(default_gguf, lms / "SmolLM2-135M-Instruct-Q4_1.gguf")
    place(default_gguf, lms / "mmproj-SmolLM2-135M-Instruct-f16.gguf")  # not a chat model: not listed
    place(default_gguf, root / "llama.cpp" / f"{LLAMACPP}.gguf")
    (root / "llama.cpp" / f"{LLAMACPP}.gguf.etag").write_text('"etag"')
    (root / "llama.cpp" / "manifest=unsloth=SmolLM2-135M-Instruct-GGUF=latest.json").write_text("{}")
    hf_cache_repo(root / "hf", HF_GGUF, default_gguf, gguf_digest, "SmolLM2-135M-Instruct-Q4_1.gguf")
    return root


def test_models_lists_each_store_with_its_name(stores_root, default_gguf):
    r = fmchat(env_for(stores_root), "models", "--json")
    assert r.returncode == 0, r.stderr
    listed = {(e["store"], e["name"]): e for e in json.loads(r.stdout)["gguf"]}
    assert set(listed) == {("ollama", OLLAMA), ("lmstudio", LMSTUDIO), ("llama.cpp", LLAMACPP), ("hf-cache", HF_GGUF)}
    for e in listed.values():
        assert e["size"] == default_gguf.stat().st_size and Path(e["path"]).is_file()
        assert e["model"] and "mmproj" not in e["path"]
    assert Path(listed["ollama", OLLAMA]["path"]).name.startswith("sha256-")
    assert "registry.ollama.ai/library/smollm2:135m" in listed["ollama", OLLAMA]["also"]
    r = fmchat(env_for(stores_root), "models")
    assert r.returncode == 0, r.stderr
    for store, name in listed:
        assert any(store in line and name in line for line in r.stdout.splitlines()), (store, name, r.stdout)


def test_run_by_store_name_converts_the_same_bytes_once(stores_root, gguf_digest):
    from fmchat.paths import cache_dir

    env = env_for(stores_root)
    first = fmchat(env, "run", "--model", OLLAMA, "Hi", "--max-new-tokens", "4", "--temperature", "0")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() and f"loaded {OLLAMA} (transformers" in first.stderr
    second = fmchat(env, "run", "--model", LMSTUDIO, "Hi", "--max-new-tokens", "4", "--temperature", "0")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == first.stdout.strip()  # greedy, same weights
    assert "converting" not in second.stderr and f"loaded {LMSTUDIO} (transformers" in second.stderr
    conversions = [d for d in (cache_dir() / "converted").iterdir() if gguf_digest[:20] in d.name]
    assert len(conversions) == 1 and conversions[0].name.endswith("-bf16")
    blob = fmchat(
        env, "run", "--model", OLLAMA, "--backend", "llamacpp", "Hi", "--max-new-tokens", "4"
    )  # no .gguf suffix
    assert blob.returncode == 0 and blob.stdout.strip(), blob.stderr


def test_unknown_and_ambiguous_names_are_one_line_errors(tmp_path, default_gguf):
    models = tmp_path / "home" / ".lmstudio" / "models"
    place(default_gguf, models / "alice" / "tiny-GGUF" / "tiny-Q4.gguf")
    (models / "bob" / "other-GGUF").mkdir(parents=True)
    (models / "bob" / "other-GGUF" / "tiny-Q4.gguf").write_bytes(b"GGUF" + bytes(60))  # another file, same name
    for spec, message in (("tiny-Q4", "is ambiguous, it names 2 GGUF files: lmstudio alice/tiny-GGUF"),
                          ("no-such-model", "unknown model 'no-such-model'")):  # fmt: skip
        r = fmchat(env_for(tmp_path), "run", "--model", spec, "Hi", "--max-new-tokens", "4")
        assert r.returncode == 2, (spec, r.stderr)
        errors = [line for line in r.stderr.splitlines() if line.startswith("fmchat: error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr, r.stderr
        assert spec != "tiny-Q4" or "lmstudio bob/other-GGUF" in errors[0]


def test_aliases_fall_back_to_a_store_gguf_of_that_model(tmp_path, default_gguf, gguf_digest, monkeypatch):
    """The default GGUF placed under Phi-3.5 / Qwen2.5 names: this checks resolution only (it is not Phi)."""
    from fmchat import models

    blob = ollama_pull(tmp_path / "ollama", default_gguf, gguf_digest, "phi3.5", "latest")
    ollama_pull(tmp_path / "ollama", default_gguf, gguf_digest, "qwen2.5", "0.5b")
    r = fmchat(env_for(tmp_path), "models", "--json")
    assert r.returncode == 0, r.stderr
    aliases = {row["alias"]: row for row in json.loads(r.stdout)["aliases"]}
    assert aliases["phi-3.5"]["available"] is True and aliases["phi-3.5"]["gguf"] == "ollama phi3.5"
    assert aliases["phi-3.5"]["where"].endswith(str(blob))
    assert aliases["qwen2.5-0.5b"]["gguf"] == "ollama qwen2.5:0.5b"
    assert aliases["llama-3.2-1b"]["available"] is False and aliases["llama-3.2-1b"]["gguf"] is None
    r = fmchat(env_for(tmp_path), "models")
    assert any("phi-3.5" in line and "ollama phi3.5" in line for line in r.stdout.splitlines()), r.stdout

    # In process: an LM Studio file named like Phi-3.5 mini; a Phi-3.5 vision file is another model.
    home = tmp_path / "lms-home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "no-llama.cpp"))
    vision = place(default_gguf, home / ".lmstudio" / "models" / "lmstudio-community" / "Phi-3.5-vision-instruct-GGUF" / "Phi-3.5-vision-instruct-Q4_K_M.gguf")  # fmt: skip
    assert models.resolve("phi-3.5").kind == "hub"
    mini = place(default_gguf, home / ".lmstudio" / "models" / "bartowski" / "Phi-3.5-mini-instruct-GGUF" / "Phi-3.5-mini-instruct-Q4_K_M.gguf")  # fmt: skip
    src = models.resolve("phi-3.5")
    assert src.kind == "gguf" and src.path == mini and src.store == "lmstudio bartowski/Phi-3.5-mini-instruct-GGUF"
    assert vision.exists() and models.resolve("Phi-3.5-vision-instruct-Q4_K_M").path == vision


def test_ollama_names_in_every_form(tmp_path, default_gguf, gguf_digest, monkeypatch):
    from fmchat import model_stores, models

    root = tmp_path / "ollama"
    blob = ollama_pull(root, default_gguf, gguf_digest, "smollm2", "latest")
    ollama_pull(root, default_gguf, gguf_digest, "smollm2", "135m", namespace="someone")
    ollama_pull(
        root, default_gguf, gguf_digest, "SmolLM2-135M-Instruct-GGUF", "Q4_1", namespace="bartowski", host="hf.co"
    )
    (root / "manifests" / "registry.ollama.ai" / "library" / "gone").mkdir(parents=True)
    (root / "manifests" / "registry.ollama.ai" / "library" / "gone" / "latest").write_text(
        json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "0" * 64}]})
    )  # blob missing
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    names = sorted(e.name for e in model_stores.ollama_models())
    assert names == ["hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_1", "smollm2", "someone/smollm2:135m"]
    for spec in (
        "smollm2",
        "smollm2:latest",
        "library/smollm2",
        "registry.ollama.ai/library/smollm2:latest",
        "SmolLM2",
    ):
        src = models.resolve(spec)
        assert (src.kind, src.path, src.name) == ("gguf", blob, "smollm2"), spec
    assert models.resolve("someone/smollm2:135m").store == "ollama someone/smollm2:135m"
    assert models.resolve(str(blob)).path == blob.resolve()  # the blob's path works too: a GGUF without the suffix


def test_conversion_key_is_the_content_not_the_path(tmp_path, default_gguf):
    from fmchat import model_stores
    from fmchat.backends.transformers.gguf import _gguf_key

    blob = place(default_gguf, tmp_path / "blobs" / "sha256-x")
    copy = tmp_path / "copy" / "SmolLM2-135M-Instruct-Q4_1.gguf"
    copy.parent.mkdir()
    shutil.copyfile(default_gguf, copy)
    key = _gguf_key(default_gguf)
    assert key.endswith("-bf16") and _gguf_key(blob) == key and _gguf_key(copy) == key
    # A file changed in place, even with its mtime set back, never reuses the old key (the remembered digest too).
    time.sleep(model_stores._SETTLE_S + 0.1)
    assert _gguf_key(copy) == key
    assert (model_stores.cache_dir() / "gguf-digests.json").is_file()
    st = copy.stat()
    with open(copy, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert copy.stat().st_size == st.st_size and copy.stat().st_mtime_ns == st.st_mtime_ns
    assert _gguf_key(copy) != key
