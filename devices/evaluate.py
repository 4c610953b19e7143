"""The evaluator: BF16 vs PTQ vs QAT, measured on the runtimes a device uses.

- Variants of a run (read through ``edgeft.rundir.RunDir``): ``bf16`` (the float model trained without QAT),
  ``ptq`` (that model quantized with the run's scheme), ``qat`` (the model trained with fake quantization,
  converted). Runtimes: ``eager`` (PyTorch), ``pte`` (ExecuTorch), ``gguf`` (llama.cpp at the scheme's width).
- Metrics: perplexity on held-out text, greedy exact-match accuracy and multiple-choice accuracy (length-normalised
  log-likelihood per token) on held-out questions, artifact size, host generation speed; ``data=`` swaps in the
  user's own held-out data (:func:`load_eval_data`). The report states how much of PTQ's degradation QAT
  recovered, with its paired 95% interval or "not resolved" (:mod:`edgeft.devices.recovery`), and per question
  each variant's answer (``QUESTIONS_FILE``).
- A run without a chat template is asked in plain text (``Question: ...`` / ``Answer:``); the report says which
  format was used (``prompt_format``).

The scoring rules in detail: docs/devices.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_path, write_json, write_text
from edgeft.rundir import QUESTIONS_FILE, Exports, RunDir

from .recovery import RULE, describe, recovery, recovery_table  # recovery: the point estimate, imported from here too
from .runtimes import Runtime, load_runtime

RUNTIMES = ("eager", "pte", "gguf")
# QUESTIONS_FILE's rows, one per variant, runtime and question: {"variant", "runtime", "kind": "exact" | "mc",
# "index" (the question's position in the evaluated set), "id" (question_id), "correct", and "got" (the decoded
# answer) or "picked" (the chosen index)}
PLAIN_FORMAT = "plain text (Question: ... / Answer:), the run has no chat template"
VARIANTS = ("bf16", "ptq", "qat")


def heldout_text() -> str:
    """The packaged held-out prose (comment lines removed)."""
    from importlib import resources

    text = resources.files("edgeft").joinpath("assets/heldout.txt").read_text(encoding="utf-8")
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("#")).strip()


def chunk_nll(rt: Runtime, chunks: list[list[int]]) -> dict[str, list]:
    """Each chunk's next-token NLL sum (from a fresh context) and predicted-token count: {"nll", "tokens"}."""
    nll, n = [], []
    for ids in chunks:
        logits = rt.logits(ids)[:-1].double()
        nll.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")))
        n.append(len(ids) - 1)
    return {"nll": nll, "tokens": n}


def perplexity(rt: Runtime, chunks: list[list[int]]) -> float:
    """exp(mean next-token NLL) over all predicted positions of the chunks, each from a fresh context."""
    c = chunk_nll(rt, chunks)
    return math.exp(sum(c["nll"]) / sum(c["tokens"]))


def text_chunks(tokenizer: Any, text: str, n_tokens: int, chunk: int) -> list[list[int]]:
    """Split the first ``n_tokens`` of ``text`` into chunks, each starting with the BOS the tokenizer adds."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # BOS when the tokenizer adds one
    step = chunk - len(prefix)
    return [prefix + ids[i : i + step] for i in range(0, len(ids), step) if len(ids[i : i + step]) > 1]


def _prompt_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The prompt turn(s) of an item: its own ``messages``, or a ``builtin:tasks`` row's user turn."""
    from edgeft.data import tasks

    return row["messages"] if "messages" in row else tasks.to_messages(row)[:1]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether prompts go through the run's chat template (else the plain-text format, see the module docstring)."""
    return bool(getattr(tokenizer, "chat_template", None))


def exact_match(rt: Runtime, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers vs exact answers; also generated tokens per second (prefill included)."""
    from edgeft.data import encode_prompt

    plain = not has_chat_template(tokenizer)
    stop = {tokenizer.eos_token_id}
    correct, n_tok, secs, samples, per_question = 0, 0, 0.0, [], []
    for r in rows:
        prompt = encode_prompt(tokenizer, _prompt_messages(r))
        t0 = time.perf_counter()
        out = rt.generate(prompt, max_new_tokens, stop)
        secs += time.perf_counter() - t0
        n_tok += max(1, len(out))
        answer = tokenizer.decode(out, skip_special_tokens=True)
        answer = (answer.strip().split("\n", 1)[0] if plain else answer).strip()  # plain text: the answer line
        ok = answer == r["answer"]
        correct += ok
        per_question.append({"correct": ok, "got": answer})
        if len(samples) < 5:
            samples.append({"question": r["question"], "expected": r["answer"], "got": answer})
    return {
        "accuracy": correct / len(rows),
        "n": len(rows),
        "tokens_per_s": n_tok / secs,
        "samples": samples,
        "per_question": per_question,
    }


def encode_choices(
    tokenizer: Any, messages: list[dict[str, str]], choices: list[str]
) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids, exactly as exact match encodes them, and each choice's continuation ids.

    A continuation is the choice's tokens as the tokenizer splits prompt + choice (lm-eval-harness's rule; the
    choice alone when that split would change the prompt's tokens), then the end-of-turn token (the EOS that the
    run's chat template installed), so every choice is scored as a complete answer. Without a chat template the
    continuation is the plain-text answer line, `` choice`` and its newline.
    """
    from edgeft.data.encode import encode_prompt, prompt_lead, prompt_text

    ctx = encode_prompt(tokenizer, messages)
    text, lead = prompt_text(tokenizer, messages), prompt_lead(tokenizer)
    plain = not has_chat_template(tokenizer)
    end = [] if (plain or tokenizer.eos_token_id is None) else [tokenizer.eos_token_id]
    conts = []
    for c in choices:
        answer = f" {c}\n" if plain else c
        whole = lead + list(tokenizer(text + answer, add_special_tokens=False)["input_ids"])
        cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else []
        if not cont:
            cont = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        conts.append(cont + end)
    return ctx, conts


def _token_logprobs(logits: torch.Tensor, cont: list[int]) -> torch.Tensor:
    return torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(cont)[:, None])[:, 0]


def continuation_logprobs(rt: Runtime, ctx: list[int], cont: list[int]) -> torch.Tensor:
    """log p(cont[i] | ctx + cont[:i]) for every continuation token, float64 [len(cont)], from one fresh pass."""
    return _token_logprobs(rt.logits(ctx + cont)[len(ctx) - 1 : len(ctx) + len(cont) - 1], cont)


def choice_scores(rt: Runtime, ctx: list[int], conts: list[list[int]]) -> list[float]:
    """Length-normalised log-likelihood of each continuation: mean log-probability per token.

    Through the runtime's ``continuation_logits`` (the prompt runs once) when it has one, else one full-sequence
    ``logits`` pass per continuation; both give the same rows.
    """
    shared = getattr(rt, "continuation_logits", None)
    if shared is None:
        return [float(continuation_logprobs(rt, ctx, c).mean()) for c in conts]
    return [float(_token_logprobs(rows, c).mean()) for rows, c in zip(shared(ctx, conts), conts)]


def multiple_choice(
    rt: Runtime,
    tokenizer: Any,
    items: list[dict[str, Any]],
    encoded: list[tuple[list[int], list[list[int]]]] | None = None,
) -> dict[str, Any]:
    """Accuracy of the argmax of :func:`choice_scores` against each item's ``label`` (first on ties).

    ``encoded``: the items' :func:`encode_choices` when already computed (the same for every runtime).
    """
    if encoded is None:
        encoded = [encode_choices(tokenizer, _prompt_messages(it), it["choices"]) for it in items]
    correct, samples, per_question = 0, [], []
    for it, (ctx, conts) in zip(items, encoded):
        scores = choice_scores(rt, ctx, conts)
        pick = max(range(len(scores)), key=scores.__getitem__)
        correct += pick == it["label"]
        per_question.append({"correct": pick == it["label"], "picked": pick})
        if len(samples) < 5:
            samples.append(
                {
                    "question": it["question"],
                    "choices": it["choices"],
                    "expected": it["label"],
                    "picked": pick,
                    "scores": [round(x, 4) for x in scores],
                }
            )
    return {"mc_accuracy": correct / len(items), "n": len(items), "samples": samples, "per_question": per_question}


# --- what to evaluate on ------------------------------------------------------------------------------


@dataclass
class EvalData:
    """Held-out text (perplexity), exact-match items and multiple-choice items, and where each came from.

    Items carry ``question`` (for samples), ``messages`` (the prompt turns; absent on ``builtin:tasks`` rows, whose
    prompt is :func:`edgeft.data.tasks.to_messages`'s user turn), and ``answer`` (exact match) or ``choices`` and
    ``label`` (multiple choice).
    """

    heldout: str
    tasks: list[dict[str, Any]]
    mc: list[dict[str, Any]]
    sources: dict[str, str] = field(default_factory=dict)
    # genre -> text of a held-out set with genres (``builtin:mixed-genre``): perplexity per genre, pooled overall
    heldout_genres: dict[str, str] = field(default_factory=dict)


def builtin_eval_data(limit: int = 60) -> EvalData:
    """The packaged held-out prose and the first ``limit`` ``builtin:tasks`` test questions (both task kinds)."""
    from edgeft.data import tasks

    return EvalData(
        heldout_text(),
        tasks.generate("test")[:limit],
        tasks.multiple_choice("test")[:limit],
        {"heldout": "packaged held-out prose", "tasks": "builtin:tasks test split", "mc": "builtin:tasks test split"},
    )


def _scalar_text(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return None
    s = str(v).strip()
    return s or None


def _task_item(row: Any, where: str) -> tuple[str, dict[str, Any]]:
    """One JSONL row as ("tasks" | "mc", item); a malformed row is one error naming its line."""
    if not isinstance(row, dict):
        raise EdgeftError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt = row.get("prompt", row.get("question"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise EdgeftError(f'{where}: needs a non-empty "prompt" (or "question") string')
    messages = [{"role": "user", "content": prompt}]
    if row.get("system") is not None:
        if not isinstance(row["system"], str):
            raise EdgeftError(f'{where}: "system" must be a string')
        messages.insert(0, {"role": "system", "content": row["system"]})
    if "answer" not in row:
        raise EdgeftError(f'{where}: needs an "answer" (text, or with "choices" the right choice\'s index or text)')
    answer = row["answer"]
    if "choices" not in row:
        text = _scalar_text(answer)
        if text is None:
            raise EdgeftError(f'{where}: "answer" must be a non-empty string or number')
        return "tasks", {"question": prompt, "messages": messages, "answer": text}
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise EdgeftError(f'{where}: "choices" must be a list of at least 2 answers')
    texts = [_scalar_text(c) for c in choices]
    if any(t is None for t in texts):
        raise EdgeftError(f"{where}: every choice must be a non-empty string or number")
    if len(set(texts)) != len(texts):
        raise EdgeftError(f'{where}: "choices" has duplicates')
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(texts):
            raise EdgeftError(f'{where}: "answer" index {answer} is outside the {len(texts)} choices')
        label = answer
    elif isinstance(answer, str) and answer.strip() in texts:
        label = texts.index(answer.strip())
    else:
        raise EdgeftError(f"{where}: \"answer\" must be a choice's index (0-based) or one of the choices' text")
    return "mc", {"question": prompt, "messages": messages, "choices": texts, "label": label}


def load_eval_data(paths: list[str | Path] | tuple[str | Path, ...] | None, limit: int = 60) -> EvalData:
    """The built-in evaluation data with the user's files in place of what they supply.

    - ``.txt``: held-out text for perplexity (several files are joined);
    - ``.jsonl``: task rows, ``{"prompt" (or "question"), "answer"}`` for exact match, or with ``"choices": [...]``
      (``answer``: the right choice's 0-based index or its text) for multiple choice; optional ``"system"``.

    - ``builtin:facts``: the second task set's test split (both kinds, first ``limit`` questions);
      ``builtin:mixed-genre``: held-out text of four genres (perplexity per genre, ``ppl_tokens`` each).

    Each kind a file supplies replaces the built-in one whole (``limit`` caps only built-in questions); every
    problem is one error naming the file and line.
    """
    data = builtin_eval_data(limit)
    texts: list[str] = []
    found: dict[str, list[dict[str, Any]]] = {"tasks": [], "mc": []}
    names: dict[str, list[str]] = {"heldout": [], "tasks": [], "mc": []}
    for p in paths or []:
        if str(p).startswith("builtin:"):
            _builtin_set(data, str(p), limit, found, names)
            continue
        path = Path(p).expanduser()
        if not path.is_file():
            raise EdgeftError(f"evaluation data file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            try:
                text = path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise EdgeftError(f"{path}: not UTF-8 text") from None
            if not text:
                raise EdgeftError(f"{path}: empty held-out text")
            texts.append(text)
            names["heldout"].append(str(path))
        elif suffix == ".jsonl":
            from edgeft.data.formats import read_rows  # the training reader: same line numbers, same errors

            n = 0
            for where, row in read_rows(path):
                kind, item = _task_item(row, where)
                found[kind].append(item)
                if str(path) not in names[kind]:
                    names[kind].append(str(path))
                n += 1
            if not n:
                raise EdgeftError(f"{path}: no task rows")
        else:
            raise EdgeftError(
                f"{path}: evaluation data must be .txt (held-out text) or .jsonl (prompt/answer or choices rows), "
                f"not {suffix or 'a file without a suffix'}"
            )
    if texts and data.heldout_genres:
        raise EdgeftError("give either held-out .txt files or builtin:mixed-genre, not both")
    if texts:
        data.heldout = "\n\n".join(texts)
    for kind in ("tasks", "mc"):
        if found[kind]:
            setattr(data, kind, found[kind])
    for kind, files in names.items():
        if files:
            data.sources[kind] = ", ".join(files)
    return data


def _builtin_set(data: EvalData, name: str, limit: int, found: dict[str, list], names: dict[str, list]) -> None:
    """Add a built-in evaluation set named in ``data=``: the ``builtin:facts`` test split or a held-out text set."""
    from edgeft.data import facts, heldout

    if name == facts.NAME:
        found["tasks"] += facts.generate("test")[:limit]
        found["mc"] += facts.multiple_choice("test")[:limit]
        names["tasks"].append(f"{name} test split")
        names["mc"].append(f"{name} test split")
    elif name == heldout.NAME:
        hs = heldout.load(name)
        data.heldout_genres = dict(hs.texts)
        data.heldout = "\n\n".join(hs.texts.values())
        names["heldout"].append(f"{name} ({', '.join(hs.texts)})")
    else:
        raise EdgeftError(f"unknown built-in evaluation set {name!r}; built-ins: {facts.NAME}, {heldout.NAME}")


def _variant_sources(run: RunDir) -> dict[str, tuple[Path, Exports]]:
    """(model directory, artifact directory) of each variant this run has."""
    from edgeft.models import float_dir

    out: dict[str, tuple[Path, Exports]] = {}
    base = run.baseline
    if base.has_converted():
        out["bf16"] = (float_dir(base), base.exports.float)
        out["ptq"] = (base.converted, base.exports)
    if run.scheme_record().get("plan"):
        out["qat"] = (run.converted, run.exports)
    elif "bf16" not in out:
        out["bf16"] = (run.converted, run.exports)
    return out


def _artifact(kind: str, src: Path, out_dir: Exports, max_seq_len: int) -> Path:
    """Export the variant's artifact for a runtime once (an existing, validated one is reused)."""
    from edgeft.exporters import default_gguf_quant, export_dir

    if kind == "pte":
        path = out_dir.pte()
        if not path.exists():
            export_dir("pte", src, out_dir, max_seq_len=max_seq_len)
        return path
    quant = default_gguf_quant(src)
    path = out_dir.gguf(quant)
    if not path.exists():
        export_dir("gguf", src, out_dir, quant=quant)
    return path


def _size(kind: str, src: Path, artifact: Path | None) -> int:
    if artifact is not None:
        return artifact.stat().st_size
    return sum(f.stat().st_size for f in src.glob("*.safetensors"))


def evaluate_run(
    run: Path,
    runtimes: tuple[str, ...] | list[str] = RUNTIMES,
    variants: tuple[str, ...] | list[str] | None = None,
    limit: int = 60,
    ppl_tokens: int = 2048,
    ppl_chunk: int = 256,
    max_new_tokens: int = 16,
    progress: bool = True,
    data: EvalData | list[str | Path] | tuple[str | Path, ...] | None = None,
    require_exports: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate every variant on every runtime; writes eval/report.{md,json}, eval/questions.jsonl (each question's
    result per variant and runtime, :data:`QUESTIONS_FILE`) and eval/metrics.png.

    The runtimes run the run's exported artifacts; one missing is exported here, unless ``require_exports`` (the
    CLI): then a runtime whose format the run was never exported to is an error naming the export command (the
    baseline's artifacts, which no command exports, are always made here).

    ``data``: the user's evaluation files (see :func:`load_eval_data`) or an :class:`EvalData`; default built-in.
    ``device``: where the eager runtime runs (default the CPU, the host as the .pte and GGUF runtimes run it;
    ``cuda`` on a GPU machine answers in a fraction of the time, with its own rounding: compare variants within one
    device). The report records it.
    """
    from transformers import AutoTokenizer

    from edgeft.data import encode_prompt

    device = eval_device(device)
    if not isinstance(data, EvalData):
        data = load_eval_data(data, limit)
    for r in runtimes:
        if r not in RUNTIMES:
            raise EdgeftError(f"unknown runtime {r!r}; choose from {', '.join(RUNTIMES)}")
    run = RunDir(run)
    if not run.has_converted():
        raise EdgeftError(f"{run.root} has no converted model; run `edgeft train` to completion first")
    from edgeft.integrity import check_safetensors_dir

    for v in run.variants():
        if v.converted.is_dir():
            check_safetensors_dir(v.converted, f"run `edgeft convert --run {run.root}` to write it again from model/")
    from edgeft.fsutil import remove_stale

    for d in (run.eval, *(v.exports.path for v in run.variants()), run.baseline.exports.float.path):
        remove_stale(d)  # what a killed eval or export left half-written
    if require_exports:
        ex = run.exports
        for kind in runtimes:
            if kind == "pte" and not ex.pte().exists() or kind == "gguf" and ex.newest_gguf() is None:
                raise EdgeftError(
                    f"{run.root} has no exported {kind}: run `edgeft export {kind} --run {run.root}` "
                    f"first, or leave {kind} out of --runtimes"
                )
    sources = _variant_sources(run)
    if variants:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise EdgeftError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        missing = [v for v in variants if v not in sources]
        if missing:
            raise EdgeftError(
                f"{run.root} has no {', '.join(missing)} variant (train with --qat and --ptq to get all three)"
            )
        sources = {v: sources[v] for v in variants}
    tokenizer = AutoTokenizer.from_pretrained(str(run.converted))
    # with genres: ppl_tokens of each genre, chunked apart so that no chunk spans two genres
    genre_chunks = {g: text_chunks(tokenizer, t, ppl_tokens, ppl_chunk) for g, t in data.heldout_genres.items()}
    chunks = (
        [c for cs in genre_chunks.values() for c in cs]
        if genre_chunks
        else text_chunks(tokenizer, data.heldout, ppl_tokens, ppl_chunk)
    )
    if not chunks:
        raise EdgeftError(f"held-out text ({data.sources.get('heldout')}) is shorter than 2 tokens")
    rows = data.tasks
    mc_encoded = [encode_choices(tokenizer, _prompt_messages(it), it["choices"]) for it in data.mc]
    # the longest sequence a runtime must hold: a prompt and its generation, or a prompt and its longest choice
    longest = max(
        [len(encode_prompt(tokenizer, _prompt_messages(r))) + max_new_tokens for r in rows]
        + [len(ctx) + max(map(len, conts)) for ctx, conts in mc_encoded]
        + [ppl_chunk]
    )
    max_seq_len = max(256, longest)

    results: list[dict[str, Any]] = []
    per_question: list[dict[str, Any]] = []  # eval/questions.jsonl: one row per variant, runtime and question
    task_ids, mc_ids = [question_id(r) for r in rows], [question_id(it) for it in data.mc]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sources) * len(runtimes), desc="eval", unit="run", dynamic_ncols=True)
    for variant, (src, art_dir) in sources.items():
        for kind in runtimes:
            if bar is not None:
                bar.set_postfix_str(f"{variant}/{kind}")
            artifact = None if kind == "eager" else _artifact(kind, src, art_dir, max_seq_len)
            opts = {"device": device} if kind == "eager" else {}
            if kind == "gguf" and longest > 1024:
                opts["n_ctx"] = longest
            rt = load_runtime(kind, artifact or src, **opts)
            try:
                t0 = time.perf_counter()
                ppl_chunks = chunk_nll(rt, chunks)  # per chunk, so the report can resample chunks
                ppl = math.exp(sum(ppl_chunks["nll"]) / sum(ppl_chunks["tokens"]))
                by_genre, k = {}, 0
                for g, cs in genre_chunks.items():  # chunks lists the genres' chunks in order
                    nll, n = ppl_chunks["nll"][k : k + len(cs)], ppl_chunks["tokens"][k : k + len(cs)]
                    by_genre[g], k = math.exp(sum(nll) / sum(n)), k + len(cs)
                em = exact_match(rt, tokenizer, rows, max_new_tokens)
                mc = multiple_choice(rt, tokenizer, data.mc, mc_encoded)
            finally:
                rt.close()
            results.append(
                {
                    "variant": variant,
                    "runtime": kind,
                    "artifact": str(artifact or src),
                    "size_mb": _size(kind, src, artifact) / 2**20,
                    "perplexity": ppl,
                    "ppl_chunks": ppl_chunks,
                    **({"perplexity_by_genre": by_genre} if by_genre else {}),
                    "accuracy": em["accuracy"],
                    "n_tasks": em["n"],
                    "mc_accuracy": mc["mc_accuracy"],
                    "n_mc": mc["n"],
                    "tokens_per_s": em["tokens_per_s"],
                    "seconds": time.perf_counter() - t0,
                    "samples": em["samples"],
                    "mc_samples": mc["samples"],
                }
            )
            per_question += [
                {"variant": variant, "runtime": kind, "kind": "exact", "index": i, "id": task_ids[i], **q}
                for i, q in enumerate(em["per_question"])
            ]
            per_question += [
                {"variant": variant, "runtime": kind, "kind": "mc", "index": i, "id": mc_ids[i], **q}
                for i, q in enumerate(mc["per_question"])
            ]
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    report = _report(
        run, results, ppl_tokens=sum(len(c) - 1 for c in chunks), limit=len(rows), data=data, questions=per_question
    )
    report["prompt_format"] = "chat template" if has_chat_template(tokenizer) else PLAIN_FORMAT
    report["eager_device"] = device
    if genre_chunks:
        report["heldout_genre_tokens"] = {g: sum(len(c) - 1 for c in cs) for g, cs in genre_chunks.items()}
        report["recovery_by_genre"] = genre_recovery(results)
    questions = "".join(json.dumps(q) + "\n" for q in per_question)
    # the report names its questions file by content: a questions.jsonl from another evaluation (one interrupted
    # between the two writes) does not match it
    report["questions"] = {
        "file": QUESTIONS_FILE,
        "rows": len(per_question),
        "sha256": hashlib.sha256(questions.encode()).hexdigest(),
    }
    run.eval.mkdir(exist_ok=True)
    write_text(run.eval_questions, questions)
    write_json(run.eval_report, report)
    write_text(run.eval_markdown, render_markdown(report))
    _plot(report, run.eval_plot)
    return report


def eval_device(device: str | None) -> str:
    """The eager runtime's torch device, checked before any model loads (one clear error for a missing GPU)."""
    device = str(device or "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EdgeftError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EdgeftError(f"--device {device}: this machine has no CUDA GPU that torch can use")
    if dev.type not in ("cpu", "cuda"):
        raise EdgeftError(f"--device {device}: the evaluator runs on cpu or cuda")
    return device


def question_id(item: dict[str, Any]) -> str:
    """A question's stable id: a hash of what the model is asked and what counts as right (the prompt turns, and the
    answer or the choices and label), so the same question has the same id in every run and evaluation."""
    key = {"messages": _prompt_messages(item)}
    key.update(
        {"choices": item["choices"], "label": item["label"]} if "choices" in item else {"answer": item["answer"]}
    )
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_questions(run: Path) -> list[dict[str, Any]] | None:
    """The per-question rows of ``run``'s last evaluation (eval/questions.jsonl), or None when it has none or its
    report.json does not name that file's content (an evaluation from before per-question results)."""
    path, rep = RunDir(run).eval_questions, RunDir(run).eval_report
    if not (path.exists() and rep.exists()):
        return None
    meta = json.loads(rep.read_text()).get("questions") or {}
    text = path.read_text()
    if meta.get("sha256") != hashlib.sha256(text.encode()).hexdigest():
        return None
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def pooled_perplexity(by_genre: dict[str, float], genre_chunks: dict[str, list[list[int]]]) -> float:
    """The perplexity over all genres' predicted tokens together, from each genre's perplexity and token count."""
    n = {g: sum(len(c) - 1 for c in cs) for g, cs in genre_chunks.items()}
    return math.exp(sum(math.log(by_genre[g]) * n[g] for g in by_genre) / sum(n.values()))


def genre_recovery(results: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per runtime and genre, the share of PTQ's perplexity degradation that QAT recovered."""
    by = {(r["variant"], r["runtime"]): r for r in results if "perplexity_by_genre" in r}
    out: dict[str, dict[str, float | None]] = {}
    for rt in sorted({r["runtime"] for r in results}, key=RUNTIMES.index):
        if all((v, rt) in by for v in VARIANTS):
            b, p, q = (by[(v, rt)]["perplexity_by_genre"] for v in VARIANTS)
            out[rt] = {g: recovery(b[g], p[g], q[g], higher_is_better=False) for g in b}
    return out


def _genre_markdown(report: dict[str, Any]) -> list[str]:
    """The per-genre perplexity table and recovery lines of a held-out set with genres (none without)."""
    tokens = report.get("heldout_genre_tokens")
    if not tokens:
        return []
    genres = list(tokens)
    lines = [
        "",
        "Perplexity per genre (" + ", ".join(f"{g} {n} tokens" for g, n in tokens.items()) + "):",
        "",
        "| variant | runtime | " + " | ".join(genres) + " |",
        "|---|---|" + "---:|" * len(genres),
    ]
    for r in report["results"]:
        pg = r.get("perplexity_by_genre") or {}
        lines.append(f"| {r['variant']} | {r['runtime']} | " + " | ".join(f"{pg[g]:.3f}" for g in genres) + " |")
    lines.append("")
    for rt, rec in (report.get("recovery_by_genre") or {}).items():
        lines.append(
            f"- {rt}: QAT recovered "
            + ", ".join(f"{describe(x, True)} ({g})" for g, x in rec.items())
            + " of PTQ's perplexity degradation."
        )
    return lines


def _report(
    run: RunDir,
    results: list[dict[str, Any]],
    ppl_tokens: int,
    limit: int,
    data: EvalData,
    questions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    from edgeft.config import load_yaml

    cfg = load_yaml(run.config_file)
    return {
        "run": str(run.root),
        "model": cfg.model.name,
        "data": cfg.data.path,
        "qat": cfg.qat.scheme,
        "mode": cfg.model.mode,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "heldout_tokens": ppl_tokens,
        "task_examples": limit,
        "mc_examples": len(data.mc),
        "mc_chance": sum(1 / len(it["choices"]) for it in data.mc) / len(data.mc),
        "eval_data": dict(data.sources),
        "results": results,
        # per runtime and metric: point, paired interval, resolved (recovery.recovery_table)
        "recovery": recovery_table(results, questions),
    }


def render_markdown(report: dict[str, Any]) -> str:
    src = report.get("eval_data") or {}
    has_mc = any("mc_accuracy" in r for r in report["results"])
    lines = [
        f"# edgeft evaluation: {report['model']} ({report['mode']}, QAT {report['qat'] or 'none'})",
        "",
        f"Perplexity on {report['heldout_tokens']} tokens of {src.get('heldout', 'held-out text')}; exact-match "
        f"accuracy on {report['task_examples']} questions of {src.get('tasks', '`builtin:tasks` test split')} (greedy)"
        + (
            f"; multiple-choice accuracy on {report['mc_examples']} questions of {src.get('mc', 'the task set')} "
            f"(length-normalised log-likelihood, chance {100 * report['mc_chance']:.0f}%)."
            if has_mc
            else "."
        ),
        *(
            [f"Questions asked in {report['prompt_format']}."]
            if report.get("prompt_format", "chat template") != "chat template"
            else []
        ),
        "",
        "| variant | runtime | perplexity | exact match | multiple choice | size (MB) | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        mc = f"{100 * r['mc_accuracy']:.1f}%" if "mc_accuracy" in r else "–"
        lines.append(
            f"| {r['variant']} | {r['runtime']} | {r['perplexity']:.3f} | {100 * r['accuracy']:.1f}% | {mc} "
            f"| {r['size_mb']:.1f} | {r['tokens_per_s']:.1f} |"
        )
    if report["recovery"]:
        lines += [
            "",
            "Share of PTQ's degradation that QAT recovered, (QAT − PTQ) / (BF16 − PTQ), with its paired 95% "
            "interval. " + RULE,
            "",
            "| runtime | perplexity | exact match | multiple choice |",
            "|---|---|---|---|",
        ]
    for rt, rec in report["recovery"].items():
        cells = [
            describe(rec[m], m == "perplexity") if m in rec else "–" for m in ("perplexity", "accuracy", "mc_accuracy")
        ]
        lines.append(f"| {rt} | " + " | ".join(cells) + " |")
    lines += _genre_markdown(report)
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    runtimes = sorted({r["runtime"] for r in results}, key=RUNTIMES.index)
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    panels = [("perplexity", "perplexity (lower is better)"), ("accuracy", "exact match (higher is better)")]
    if any("mc_accuracy" in r for r in results):
        panels.append(("mc_accuracy", "multiple choice (higher is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=110)
    width = 0.8 / max(1, len(variants))
    for ax, (metric, label) in zip(axes, panels):
        for i, v in enumerate(variants):
            vals = [
                next(
                    (r.get(metric, float("nan")) for r in results if r["variant"] == v and r["runtime"] == rt),
                    float("nan"),
                )
                for rt in runtimes
            ]
            ax.bar([x + i * width for x in range(len(runtimes))], vals, width, label=v)
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(runtimes))], runtimes)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{report['model']}: BF16 vs PTQ vs QAT ({report['qat'] or 'no QAT'})")
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
