"""llama.cpp's llama-server as a peer for `pdserve bench compare`: built from the llama-cpp-python sdist (its
vendored llama.cpp) by scripts/build_llama_server.sh, fed an f32 GGUF made by that tree's own
convert_hf_to_gguf.py, and launched on a free loopback port.

  .tools/llama.cpp/sdist/llama_cpp_python-V.tar.gz    the sdist, downloaded once
  .tools/llama.cpp/V/src/                              vendor/llama.cpp: the converter and gguf-py
  .tools/llama.cpp/V/bin/llama-server                  the build (Release, GGML_NATIVE, no curl)
  .tools/llama.cpp/V/models/NAME-f32.gguf              one GGUF per pdserve model directory

`python -m services.bench.llama_server convert SRC MODEL_DIR --outfile F --outtype f32` runs the converter with
two run-time patches (the vendored file is never edited): pdserve's byte-level BPE tokenizer is named "gpt-2"
(its pre-tokenizer is GPT-2's regex, but the converter recognises pre-tokenizers only by hashes of known
models' tokenizations), and a directory with no tokenizer.model skips the sentencepiece path without needing
the sentencepiece package.
"""

from __future__ import annotations

import asyncio
import os
import runpy
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.bench.launch import REPO, ServerProcess, free_port

TOOLS = REPO / ".tools" / "llama.cpp"
BUILD_SCRIPT = REPO / "scripts" / "build_llama_server.sh"
PRE_TOKENIZER = "gpt-2"


@dataclass(frozen=True)
class LlamaCpp:
    """One built version of llama.cpp under `root` (.tools/llama.cpp/VERSION)."""

    root: Path

    @property
    def version(self) -> str:
        return self.root.name

    @property
    def server(self) -> Path:
        return self.root / "bin" / "llama-server"

    @property
    def src(self) -> Path:
        return self.root / "src"

    def gguf_path(self, model_dir: Path) -> Path:
        return self.root / "models" / f"{model_dir.name}-f32.gguf"


def build(tools: Path = TOOLS, log: Path | None = None) -> LlamaCpp:
    """Builds llama-server unless it is there already (about 12 minutes on 2 cores); returns where it lives."""
    pip = Path(sys.executable).with_name("pip")
    cmd = ["bash", str(BUILD_SCRIPT), str(tools), str(pip if pip.exists() else "pip")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"building llama-server failed ({done.returncode}):\n{done.stderr[-3000:]}")
    server = Path(done.stdout.strip().splitlines()[-1])
    return LlamaCpp(server.parent.parent)


def convert_command(llama: LlamaCpp, model_dir: Path, outfile: Path) -> list[str]:
    """The argv that converts `model_dir` to an f32 GGUF at `outfile` with `llama`'s own converter."""
    return [sys.executable, "-m", "services.bench.llama_server", "convert", str(llama.src), str(model_dir),
            "--outfile", str(outfile), "--outtype", "f32"]


def convert(llama: LlamaCpp, model_dir: Path) -> Path:
    """The model's f32 GGUF, converted unless one newer than the model's files exists."""
    out = llama.gguf_path(model_dir)
    newest = max(p.stat().st_mtime for p in model_dir.iterdir() if p.is_file())
    if out.is_file() and out.stat().st_mtime >= newest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.gguf")
    done = subprocess.run(convert_command(llama, model_dir, tmp), cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    tmp.replace(out)
    return out


def server_args(llama: LlamaCpp, gguf: Path, port: int, alias: str, slots: int = 16, threads: int = 2,
                ctx_per_slot: int = 2048) -> list[str]:
    """llama-server's command line: `slots` parallel sequences of `ctx_per_slot` tokens each, `threads` cores."""
    return [str(llama.server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", alias,
            "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads),
            "--no-webui"]


@dataclass
class LlamaServer(ServerProcess):
    """A running llama-server."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def launch(llama: LlamaCpp, gguf: Path, alias: str, log_dir: Path, timeout: float = 120.0,
           **options: int) -> LlamaServer:
    """Starts llama-server and waits until /health answers 200; raises if it exits or never does."""
    import httpx

    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"llama-server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(server_args(llama, gguf, port, alias, **options), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = LlamaServer(process, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.http_url}/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"llama-server did not become healthy in {timeout:.0f}s:\n{server.log_tail()}")


async def complete(url: str, prompts: list[list[int]], max_tokens: list[int],
                   timeout_s: float = 1800.0) -> list[list[int]]:
    """Sends every prompt at once to llama-server's /completion (token ids in, greedy, EOS ignored) and returns
    each one's output token ids, in order."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=None)) as client:

        async def one(prompt: list[int], n: int) -> list[int]:
            body = {"prompt": prompt, "n_predict": n, "temperature": 0.0, "ignore_eos": True, "return_tokens": True}
            reply = await client.post("/completion", json=body)
            reply.raise_for_status()
            return [int(t) for t in reply.json()["tokens"]]

        return list(await asyncio.gather(*(one(p, n) for p, n in zip(prompts, max_tokens, strict=True))))


def _convert_main(argv: list[str]) -> None:
    """`convert SRC MODEL_DIR CONVERTER_ARGS...`: runs SRC/convert_hf_to_gguf.py with the module's patches."""
    src, converter_args = Path(argv[0]), argv[1:]
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    from conversion import base  # type: ignore[import-not-found]  # the vendored converter's package

    def gpt2_pre_tokenizer(self: object, tokenizer: object) -> str:
        return PRE_TOKENIZER

    create_sentencepiece = base.TextModel._create_vocab_sentencepiece

    def sentencepiece_if_present(self: object) -> object:
        if not (Path(self.dir_model) / "tokenizer.model").is_file():  # type: ignore[attr-defined]
            raise FileNotFoundError("no tokenizer.model")
        return create_sentencepiece(self)

    base.TextModel.get_vocab_base_pre = gpt2_pre_tokenizer
    base.TextModel._create_vocab_sentencepiece = sentencepiece_if_present
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *converter_args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "convert":
        sys.exit("usage: python -m services.bench.llama_server convert SRC MODEL_DIR [converter options]")
    _convert_main(sys.argv[2:])
