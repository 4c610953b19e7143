"""``edgeft run``: generate from an exported artifact on this host, as a phone or laptop app would.

- A ``.pte`` is driven by ExecuTorch's own ``TextLLMRunner`` (the runner the Android and iOS apps wrap: its
  tokenizer, prefill/decode loop, sampler and the program's metadata), a ``.gguf`` by llama.cpp through
  llama-cpp-python with the same interface; CI can run what the apps run without a phone.
- The prompt goes through the run's chat template when one sits beside the artifact (a GGUF's: its metadata);
  ``chat=False`` (``--raw``) sends the text as is.
- Timings: time to first token, prefill and decode tokens/s, from the runner's stats or the host clock
  (``timing_source`` says which).
- stdout carries only the generated text (the runner's C++ output is redirected); a token that is not valid UTF-8
  on its own stops generation with an error after the text before it was streamed (ExecuTorch 1.5.1's binding).

Timing rules and the binding's limits worked around: docs/devices.md.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeft.data.templates import adds_bos
from edgeft.errors import EdgeftError
from edgeft.rundir import RunDir

PTE_MAGIC = b"ET"  # bytes 4..6 of an ExecuTorch program (flatbuffer file identifier "ET12")
GGUF_MAGIC = b"GGUF"


def _kind(path: Path, expect: str | None = None) -> str:
    if expect not in (None, "pte", "gguf"):
        raise EdgeftError(f"unknown runtime {expect!r} (pte or gguf)")
    if expect and path.suffix != f".{expect}":
        raise EdgeftError(f"{path} is not a .{expect} file")
    if not path.exists():
        raise EdgeftError(f"{path} does not exist")
    if not path.is_file():
        raise EdgeftError(f"{path} is not a file")
    with path.open("rb") as f:
        head = f.read(8)
    if path.suffix == ".pte":
        if head[4:6] != PTE_MAGIC:
            raise EdgeftError(f"{path} is not an ExecuTorch program (no 'ET' identifier in its header)")
        return "pte"
    if path.suffix == ".gguf":
        if head[:4] != GGUF_MAGIC:
            raise EdgeftError(f"{path} is not a GGUF file (no 'GGUF' magic)")
        return "gguf"
    raise EdgeftError(f"{path} is not a .pte or .gguf file")


def _fflush_native() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _runner_output(verbose: bool) -> Iterator[None]:
    """Keep native stdout/stderr chatter away from the user; Python's sys.stdout/err still reach them.

    The file descriptors 1 and 2 go to /dev/null (``verbose``: fd 1 to stderr, so the runner's own echo and
    report land next to its logs), while ``sys.stdout``, if it writes to fd 1, is pointed at a duplicate of the
    original for the duration (the streamed text); ``sys.stderr`` likewise when ``verbose``, else to /dev/null
    (ExecuTorch's pybindings log through it, also when it is captured). A captured ``sys.stdout`` (pytest's
    capsys) is left alone.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    swapped: list[tuple[str, Any, Any]] = []
    try:
        for name, fd in (("stdout", saved[0]), ("stderr", saved[1] if verbose else devnull)):
            stream = getattr(sys, name)
            try:
                real = stream.fileno() in (1, 2)
            except (AttributeError, OSError, ValueError):
                real = False
            if real or (name == "stderr" and not verbose):
                # ExecuTorch's pybindings log through Python's sys.stderr: quiet unless verbose
                enc = getattr(stream, "encoding", None) or "utf-8"
                w = open(os.dup(fd), "w", encoding=enc, errors="replace", closefd=True)  # noqa: SIM115
                swapped.append((name, stream, w))
                setattr(sys, name, w)
        if verbose:
            os.dup2(saved[1], 1)
        else:
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        yield
    finally:
        _fflush_native()  # C stdio buffers would otherwise reach the restored descriptors at exit
        for name, old, w in swapped:
            w.flush()
            setattr(sys, name, old)
            w.close()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _read_template(d: Path) -> str | None:
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        t = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(t, str) and t:
            return t
    return None


def _tokenizer_files(artifact: Path, tokenizer: str | os.PathLike | None) -> tuple[Path, Path]:
    """(tokenizer.json, its directory): ``tokenizer`` if given (a file or a directory), else beside the artifact."""
    if tokenizer is None:
        tok = artifact.parent / "tokenizer.json"
        if not tok.is_file():
            raise EdgeftError(f"no tokenizer.json beside {artifact}; pass --tokenizer FILE")
        return tok, tok.parent
    tok = Path(tokenizer)
    if tok.is_dir():
        tok = tok / "tokenizer.json"
    if not tok.is_file():
        raise EdgeftError(f"tokenizer {tokenizer} does not exist (expected a tokenizer.json or its directory)")
    return tok, tok.parent


def _hf_tokenizer(tok: Path, tok_dir: Path, artifact: Path) -> Any:
    """The HF tokenizer beside the artifact (BOS rule, chat template), with the run's template as fallback."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if tok.name == "tokenizer.json" and (tok_dir / "tokenizer_config.json").is_file():
            hf = AutoTokenizer.from_pretrained(str(tok_dir))
        else:
            hf = PreTrainedTokenizerFast(tokenizer_file=str(tok))
    except (OSError, ValueError) as e:
        raise EdgeftError(f"could not load the tokenizer {tok}: {str(e).splitlines()[0]}") from None
    if not getattr(hf, "chat_template", None):
        # an older export carries only tokenizer.json/tokenizer_config.json: the run keeps the template
        run = RunDir.of_artifact(artifact)
        for d in [tok_dir] + ([run.converted, run.model] if run is not None else []):
            t = _read_template(d)
            if t:
                hf.chat_template = t
                break
    return hf


def _render(prompt: str, template_owner: Any, chat: bool | None, where: str) -> tuple[str, bool]:
    has = bool(getattr(template_owner, "chat_template", None))
    if chat and not has:
        raise EdgeftError(f"--chat: no chat template found for {where} (use --raw)")
    if chat is False or not has:
        return prompt, False
    try:
        text = template_owner.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # a template that raises (jinja errors) on a plain user message
        raise EdgeftError(
            f"the chat template failed on the prompt: {str(e).splitlines()[0] if str(e) else e}"
        ) from None
    return text, True


class _Stream:
    """Counts and times pieces; holds back a special token until a later piece shows it was not the end."""

    def __init__(self, specials: set[str], on_text: Callable[[str], None] | None) -> None:
        self.specials = specials
        self.on_text = on_text
        self.pieces: list[str] = []
        self.times: list[float] = []
        self.held: str | None = None

    def __call__(self, piece: str) -> None:
        self.times.append(time.perf_counter())
        if self.held is not None:
            self._emit(self.held)
            self.held = None
        if piece in self.specials:
            self.held = piece
        else:
            self._emit(piece)

    def _emit(self, piece: str) -> None:
        self.pieces.append(piece)
        if self.on_text is not None:
            self.on_text(piece)


def _rate(n: int, seconds: float | None) -> float | None:
    return n / seconds if n > 0 and seconds and seconds > 0 else None


def _set_threads(threads: int | None) -> int | None:
    """ExecuTorch's threadpool (shared by its runtime and the LLM runner): resize it, report its size."""
    try:
        from executorch.extension.pybindings import _C
    except ImportError:
        return None
    if threads:
        _C._unsafe_reset_threadpool(int(threads))
    return int(_C._threadpool_get_thread_count())


def _run_pte(
    pte: Path,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    chat: bool | None,
    tokenizer: Any,
    on_text: Callable[[str], None] | None,
    verbose: bool,
    threads: int | None,
) -> dict[str, Any]:
    tok, tok_dir = _tokenizer_files(pte, tokenizer)
    hf = _hf_tokenizer(tok, tok_dir, pte)
    text, used_chat = _render(prompt, hf, chat, str(pte))
    bos = hf.bos_token
    num_bos = int(adds_bos(hf) and not (used_chat and bos and text.startswith(bos)))
    # the directory gives ExecuTorch's tokenizer tokenizer_config.json, which names BOS/EOS
    runner_tok = tok_dir if tok.name == "tokenizer.json" and (tok_dir / "tokenizer_config.json").is_file() else tok
    with _runner_output(verbose):
        from edgeft.devices.executorch_runtime import load_executorch_ops

        load_executorch_ops()
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

        pool = _set_threads(threads)
        try:
            runner = TextLLMRunner(str(pte), str(runner_tok))
        except RuntimeError as e:
            raise EdgeftError(f"ExecuTorch's runner could not load {pte.name} with {runner_tok}: {e}") from None
        cfg = GenerationConfig(
            echo=False, max_new_tokens=int(max_new_tokens), temperature=float(temperature), num_bos=num_bos, num_eos=0
        )
        specials = {s for s in hf.all_special_tokens if s}
        stream = _Stream(specials, on_text)
        stats: dict[str, Any] = {}

        def on_stats(s: Any) -> None:
            stats.update(json.loads(s.to_json_string()))

        t0 = time.perf_counter()
        try:
            runner.generate(text, cfg, token_callback=stream, stats_callback=on_stats)
        except UnicodeDecodeError:
            # the binding cannot hand a fragment of a multi-byte character (an emoji's first token) to Python;
            # the apps' JNI/Swift layers buffer such bytes. Finish on the same program in a token loop.
            del runner
            prompt_ids = ([hf.bos_token_id] if num_bos else []) + hf(text, add_special_tokens=False).input_ids
            loop = _token_loop(pte, prompt_ids, hf, max_new_tokens, temperature, "".join(stream.pieces), on_text)
            return {
                "runtime": "pte",
                "path": str(pte),
                "chat": used_chat,
                "prompt_text": text,
                "num_bos": num_bos,
                "threads": pool,
                "engine": "TextLLMRunner, then ExecuTorch token loop (non-UTF-8 token)",
                **loop,
            }
        except RuntimeError as e:
            raise EdgeftError(f"ExecuTorch's runner failed on {pte.name}: {e} (--verbose shows its log)") from None
    # a held special token was the end of sequence when it is the EOS or the runner stopped short of the limit
    stopped = "length"
    if stream.held is not None:
        if stream.held == hf.eos_token or len(stream.times) < max_new_tokens:
            stopped = "eos"
        else:
            stream._emit(stream.held)
    n_prompt = int(stats.get("prompt_tokens", 0))
    n_decode = int(stats.get("generated_tokens", max(len(stream.times) - 1, 0)))  # decode-loop tokens
    ms = {k: stats.get(k) for k in ("inference_start_ms", "prompt_eval_end_ms", "first_token_ms", "inference_end_ms")}
    prefill_s = (ms["prompt_eval_end_ms"] - ms["inference_start_ms"]) / 1000 if stats else None
    ttft_s = (ms["first_token_ms"] - ms["inference_start_ms"]) / 1000 if stats else None
    decode_s = (ms["inference_end_ms"] - ms["prompt_eval_end_ms"]) / 1000 if stats else None
    source = "runner stats"
    if not prefill_s or (n_decode and not decode_s):  # below the stats' 1 ms resolution
        source = "host clock"
        ttft_s = prefill_s = stream.times[0] - t0 if stream.times else None
        decode_s = stream.times[-1] - stream.times[0] if len(stream.times) > 1 else None
    return {
        "runtime": "pte",
        "engine": "TextLLMRunner",
        "path": str(pte),
        "text": "".join(stream.pieces),
        "chat": used_chat,
        "prompt_text": text,
        "num_bos": num_bos,
        "prompt_tokens": n_prompt,
        "generated_tokens": len(stream.pieces),
        "stopped": stopped,
        "ttft_s": ttft_s,
        "prefill_tokens_per_s": _rate(n_prompt, prefill_s),
        "decode_tokens": n_decode,
        "decode_tokens_per_s": _rate(n_decode, decode_s),
        "timing_source": source,
        "threads": pool,
        "token_times": [t - t0 for t in stream.times],
        "runner_stats": stats,
    }


def _token_loop(
    pte: Path,
    prompt_ids: list[int],
    hf: Any,
    max_new_tokens: int,
    temperature: float,
    shown: str,
    on_text: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Generation on ExecuTorch's runtime (``PteRuntime``: the same program and kernels) with HF detokenization.

    ``shown`` is the text the runner already streamed. Greedy decoding regenerates the same tokens and streams
    only what goes beyond it; sampling continues from it (re-tokenized).
    """
    import torch

    from edgeft.devices.executorch_runtime import PteRuntime

    rt = PteRuntime(pte)
    try:
        stop = set(rt.eos_ids) or ({hf.eos_token_id} if hf.eos_token_id is not None else set())
        base = shown if temperature > 0 else ""
        ids = list(prompt_ids) + (hf(base, add_special_tokens=False).input_ids if base else [])
        budget = min(max_new_tokens - (len(ids) - len(prompt_ids)), rt.max_context_len - len(ids))
        gen: list[int] = []
        times: list[float] = []
        stopped = "length"
        t0 = time.perf_counter()
        last = rt._prefill(ids)[-1]
        while len(gen) < budget:
            if temperature > 0:
                tok = int(torch.multinomial(torch.softmax(last / temperature, -1), 1))
            else:
                tok = int(torch.argmax(last))
            times.append(time.perf_counter())
            if tok in stop:
                stopped = "eos"
                break
            gen.append(tok)
            full = base + hf.decode(gen)
            if not full.endswith("\ufffd") and len(full) > len(shown):
                if on_text is not None:
                    on_text(full[len(shown) :])
                shown = full
            if len(gen) < budget:
                last = rt._step([tok], len(ids) + len(gen) - 1)[-1]
    finally:
        rt.close()
    n_decode = len(times) - 1
    return {
        "text": base + hf.decode(gen),
        "prompt_tokens": len(prompt_ids),
        "generated_tokens": len(ids) - len(prompt_ids) + len(gen),
        "stopped": stopped,
        "ttft_s": times[0] - t0 if times else None,
        "prefill_tokens_per_s": _rate(len(ids), times[0] - t0) if times else None,
        "decode_tokens": n_decode,
        "decode_tokens_per_s": _rate(n_decode, times[-1] - times[0]) if times else None,
        "timing_source": "host clock",
        "token_times": [t - t0 for t in times],
    }


def _run_gguf(
    path: Path,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    chat: bool | None,
    tokenizer: Any,
    on_text: Callable[[str], None] | None,
    verbose: bool,
    threads: int | None,
    ignore_eos: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    import numpy as np

    if tokenizer is not None:
        raise EdgeftError("--tokenizer applies to .pte files; a GGUF carries its own tokenizer")
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        raise EdgeftError("running a GGUF needs llama-cpp-python: pip install llama-cpp-python") from None
    with _runner_output(verbose):
        try:
            # the vocabulary alone: metadata, template and tokenization, before sizing the context
            vocab = Llama(model_path=str(path), vocab_only=True, verbose=verbose)
        except (ValueError, RuntimeError) as e:
            raise EdgeftError(f"llama.cpp could not load {path.name}: {e}") from None
    try:
        meta = dict(vocab.metadata)
        arch = meta.get("general.architecture", "")
        n_ctx_train = int(meta.get(f"{arch}.context_length", 0) or 0)  # vocab_only has no context to ask
        bos_id, eos_id = vocab.token_bos(), vocab.token_eos()
        eog = {t for t in (eos_id, vocab._model.token_eot()) if t >= 0}

        def piece(t: int) -> str:
            return vocab.detokenize([t], special=True).decode("utf-8", "replace") if t >= 0 else ""

        template = meta.get("tokenizer.chat_template")
        fmt = Jinja2ChatFormatter(template or "", eos_token=piece(eos_id), bos_token=piece(bos_id))

        class _Owner:  # the GGUF's template, rendered as llama-cpp-python's chat completion renders it
            chat_template = template

            @staticmethod
            def apply_chat_template(messages: list[dict[str, str]], **_: Any) -> str:
                return fmt(messages=messages).prompt

        text, used_chat = _render(prompt, _Owner, chat, str(path))
        add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        skip_bos = used_chat and bos_id >= 0 and text.startswith(piece(bos_id))
        ids = vocab.tokenize(text.encode("utf-8"), add_bos=add_bos and not skip_bos, special=True)
    finally:
        vocab.close()
    if n_ctx_train and len(ids) + max_new_tokens > n_ctx_train:
        raise EdgeftError(
            f"prompt ({len(ids)} tokens) + {max_new_tokens} new tokens exceed the model's context of {n_ctx_train}"
        )
    n_ctx = len(ids) + max_new_tokens
    with _runner_output(verbose):
        try:
            llm = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                verbose=verbose,
            )
        except (ValueError, RuntimeError) as e:
            raise EdgeftError(f"llama.cpp could not load {path.name}: {e}") from None
    try:
        n_vocab = llm.n_vocab()
        rng = np.random.default_rng(seed)

        def pick() -> int:
            # the last evaluated position's logits (logits_all=False keeps only those, in llama.cpp)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
            if temperature <= 0:
                return int(np.argmax(logits))
            z = logits.astype(np.float64) / temperature
            p = np.exp(z - z.max())
            return int(rng.choice(n_vocab, p=p / p.sum()))

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        times: list[float] = []
        stopped = "length"
        with _runner_output(verbose):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            tok = pick()
            while True:
                times.append(time.perf_counter())
                if not ignore_eos and tok in eog:
                    stopped = "eos"
                    break
                s = decoder.decode(llm.detokenize([tok]))
                pieces.append(s)
                if on_text is not None and s:
                    on_text(s)
                if len(pieces) >= max_new_tokens:
                    break
                llm.eval([tok])
                tok = pick()
            tail = decoder.decode(b"", final=True)
            if tail and on_text is not None:
                on_text(tail)
        n_threads = int(llm.n_threads)
    finally:
        llm.close()
    n_decode = len(times) - 1
    return {
        "runtime": "gguf",
        "path": str(path),
        "text": "".join(pieces) + tail,
        "chat": used_chat,
        "prompt_text": text,
        "prompt_tokens": len(ids),
        "generated_tokens": len(pieces),
        "stopped": stopped,
        "ttft_s": times[0] - t0,
        "prefill_tokens_per_s": _rate(len(ids), times[0] - t0),
        "decode_tokens": n_decode,
        "decode_tokens_per_s": _rate(n_decode, times[-1] - times[0]),
        "timing_source": "host clock",
        "threads": n_threads,
        "eog_ids": sorted(eog),
        "token_times": [t - t0 for t in times],
    }


def run_artifact(
    path: str | os.PathLike,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    chat: bool | None = None,
    tokenizer: str | os.PathLike | None = None,
    on_text: Callable[[str], None] | None = None,
    verbose: bool = False,
    threads: int | None = None,
    ignore_eos: bool = False,
    runtime: str | None = None,
) -> dict[str, Any]:
    """Generate from a ``.pte`` (ExecuTorch's TextLLMRunner) or ``.gguf`` (llama.cpp) and time it.

    ``chat``: None applies the chat template when there is one, True requires it, False sends the prompt raw.
    ``on_text`` receives each piece of generated text as it is produced (the end-of-sequence token excluded).
    ``ignore_eos`` (GGUF only: ExecuTorch 1.5.1's runner binding has no such option) generates exactly
    ``max_new_tokens``. ``runtime`` ("pte"/"gguf") insists on that kind of file instead of going by its suffix.
    Returns the text, token counts, time to first token, prefill and decode tokens/s
    (``None`` where there is nothing to time) and the per-token host timestamps.
    """
    p = Path(path)
    kind = _kind(p, runtime)
    if not prompt:
        raise EdgeftError("the prompt is empty")
    if max_new_tokens < 1:
        raise EdgeftError("--max-new-tokens must be at least 1")
    if temperature < 0:
        raise EdgeftError("--temperature must be >= 0 (0: greedy)")
    if threads is not None and threads < 1:
        raise EdgeftError("--threads must be at least 1")
    kw = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        chat=chat,
        tokenizer=tokenizer,
        on_text=on_text,
        verbose=verbose,
        threads=threads,
    )
    if kind == "pte":
        if ignore_eos:
            raise EdgeftError("ignore_eos: ExecuTorch's runner (1.5.1 Python binding) always stops at EOS")
        return _run_pte(p, prompt, **kw)
    return _run_gguf(p, prompt, ignore_eos=ignore_eos, **kw)
